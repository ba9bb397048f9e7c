"""Templates, user descriptions, chain-of-thought targets and the noisy-tools augmentation."""

from __future__ import annotations

import re

import numpy as np
import pytest

from reasonrec.prompts.cot import (
    ANSWER_MARKER,
    NoisyTools,
    compose_target,
    format_thought,
    parse_output,
    split_target,
    tool_alternatives,
)
from reasonrec.prompts.templates import (
    N_TEMPLATES,
    REQUIRED_SLOTS,
    TASKS,
    TEMPLATES,
    ItemRef,
    PromptInputs,
    RenderOptions,
    TemplateSampler,
    ToolHint,
    item_text,
    render_prompt,
)
from reasonrec.prompts.user_desc import ItemAttributes, describe_user, describe_users

# Item ids chosen so that no title/brand/category text contains them: any occurrence in a prompt
# would be a leaked numeric id.
IDS = [7301, 8812, 9923, 6647, 5519, 4408, 3377]
TITLES = [
    "nail lacquer simmer and shimmer",
    "red shatter crackle polish",
    "prestige beblesh balm",
    "volume mascara",
    "rose lip tint",
    "daily face cream",
    "argan hair oil",
]


def _refs(ids, photo=True):
    return [ItemRef(i, item_text(TITLES[IDS.index(i)], "OPI", "Nail Polish"), photo) for i in ids]


def _inputs():
    return PromptInputs(
        user_id=42,
        user_desc="likes Nail Polish; brand OPI",
        history=_refs(IDS[:5]),
        eh_value=0.82,
        eh_bucket="high",
        item=_refs([IDS[5]])[0],
        candidates=_refs(IDS[4:7]),
        rating=4.0,
        tool_hints=[ToolHint("sasrec", items=[TITLES[0], TITLES[1]]), ToolHint("dcnv2", prob=0.7)],
    )


def test_ten_distinct_templates_per_task_with_all_slots():
    for task in TASKS:
        temps = TEMPLATES[task]
        assert len(temps) == N_TEMPLATES == 10
        assert len(set(temps)) == 10
        for t in temps:
            for slot in REQUIRED_SLOTS[task]:
                assert t.count(slot) == 1, (task, slot, t)
            if task == "explanation":
                assert "{eh}" not in t


@pytest.mark.parametrize("task", TASKS)
def test_render_fills_slots_and_never_shows_numeric_ids(task):
    opts = RenderOptions(max_history_photos=3, max_candidate_photos=1)
    for tid in range(N_TEMPLATES):
        r = render_prompt(task, _inputs(), tid, opts)
        assert "{" not in r.text and "}" not in r.text
        assert "user_42" in r.text and "likes Nail Polish" in r.text
        for i in IDS:
            assert str(i) not in r.text
        n_img = r.text.count(opts.image_token)
        assert n_img == len(r.image_items)
        if task == "explanation":
            assert "0.82" not in r.text and "4-star" in r.text
            assert r.image_items == [IDS[5]]
        else:
            assert "0.82 (high)" in r.text
            assert "volume mascara" in r.text  # history item text
        if task == "sequential":
            # only the 3 most recent history items carry a photo, in history order
            assert r.image_items == IDS[2:5]
        if task == "direct":
            assert set(r.image_items) == set(IDS[2:5]) | {IDS[4]}
            assert "daily face cream" in r.text and "argan hair oil" in r.text
        if task == "ctr":
            assert IDS[5] in r.image_items and "0.70" in r.text
        if task in ("sequential", "direct"):
            assert "sasrec suggests" in r.text


def test_image_order_follows_placeholders():
    # direct template 1 lists candidates before the history: photo order must follow the text.
    opts = RenderOptions(max_history_photos=1, max_candidate_photos=1)
    r = render_prompt("direct", _inputs(), 1, opts)
    assert r.text.index("rose lip tint") < r.text.index("user_42")
    assert r.image_items == [IDS[4], IDS[4]]  # candidate (1) photo then the last history photo


def test_history_limits_and_item_text_sanitised():
    hist = [ItemRef(1000 + i, f"item{chr(97 + i)} <image>", True) for i in range(10)]
    r = render_prompt(
        "sequential",
        PromptInputs(1, "d", hist, 0.5, "medium"),
        0,
        RenderOptions(max_history_items=4, max_history_photos=2),
    )
    assert "itemf" not in r.text and "itemg" in r.text and "itemj" in r.text
    assert r.text.count("<image>") == 2 and r.image_items == [1008, 1009]
    assert item_text("x <b>", "Unknown", "Nails") == "x b [Nails]"


def test_template_mixture_vs_single_switch():
    keys = np.arange(5000)
    mix = TemplateSampler(mixture=True, seed=3).pick_many("sequential", keys)
    counts = np.bincount(mix, minlength=10)
    assert counts.min() > 400 and counts.max() < 600  # roughly uniform
    again = TemplateSampler(mixture=True, seed=3).pick_many("sequential", keys)
    assert np.array_equal(mix, again)  # deterministic
    other = TemplateSampler(mixture=True, seed=4).pick_many("sequential", keys)
    assert not np.array_equal(mix, other)
    single = TemplateSampler(mixture=False, single_template=7).pick_many("ctr", keys)
    assert set(single.tolist()) == {7}
    assert TemplateSampler(seed=3).pick("sequential", 17) == mix[17]


def test_user_description_content():
    attrs = ItemAttributes.from_columns(
        brand=["OPI", "OPI", "Maybelline", None, "Loreal"],
        categories=[
            ["Makeup", "Nails", "Nail Polish"],
            ["Makeup", "Nails", "Nail Polish"],
            ["Makeup", "Eyes", "Mascara"],
            ["Skin Care", "Face"],
            ["Hair Care", "Oils"],
        ],
        price=[5.0, 6.0, 12.0, 40.0, None],
        styles={"colour": ["red", "red", "black", None, None]},
    )
    d = describe_user(np.array([0, 1, 2]), attrs)
    assert "Nail Polish" in d and "OPI" in d and "mostly red" in d
    assert d.index("Nail Polish") < d.index("Mascara")  # dominant first
    assert "budget prices" in d
    many = describe_users([np.array([0, 1, 2]), np.array([], dtype=np.int64), np.array([3, 3])], attrs)
    assert many[0] == d
    assert many[1].startswith("new user")
    assert "Face" in many[2] and "premium prices" in many[2]
    assert len(many[0]) <= 160
    import pyarrow as pa  # Arrow list column (a Ray Data batch) gives the same answers

    col = pa.chunked_array([pa.array([[0, 1, 2], []], pa.list_(pa.int64())), pa.array([[3, 3]], pa.list_(pa.int64()))])
    assert describe_users(col, attrs) == many


def test_cot_round_trip_and_format():
    t = compose_target("sequential", "rose lip tint", 0.534, "high", 0.82, ["sasrec", "bpr_mf"])
    assert t.splitlines()[0] == "EH: high (0.82); Tools: sasrec/bpr_mf; Confidence: 0.53"
    assert t.endswith(f"{ANSWER_MARKER} rose lip tint")
    p = parse_output(t, "sequential")
    assert p.complete and p.answer == "rose lip tint"
    assert p.thought.eh_bucket == "high" and p.thought.eh_value == pytest.approx(0.82)
    assert p.thought.tools == ["sasrec", "bpr_mf"] and p.thought.confidence == pytest.approx(0.53)
    head, ans = split_target(t)
    assert head + ans == t and head.endswith(ANSWER_MARKER) and ans == " rose lip tint"
    ctr = parse_output(compose_target("ctr", "yes", 0.9, "low", 0.1, []) + "<|im_end|> junk", "ctr")
    assert ctr.answer == "yes" and ctr.thought.tools == [] and ctr.complete
    ex = parse_output(compose_target("explanation", "Great colour.\nLasts long.", 0.4), "explanation")
    assert ex.answer == "Great colour.\nLasts long." and ex.thought.confidence == pytest.approx(0.4)
    assert format_thought("explanation", 1.7) == "Confidence: 1.00"


def test_parser_is_robust_to_junk():
    p = parse_output("blah EH : Medium (0.5) ;tools: none; confidence=73%\n answer: Volume Mascara!! \nmore", "direct")
    assert p.thought.eh_bucket == "medium" and p.thought.tools == [] and p.thought.confidence == pytest.approx(0.73)
    assert p.answer == "Volume Mascara!!"
    bad = parse_output("%%%% random tokens ###", "sequential")
    assert not bad.complete and bad.answer is None and bad.thought.confidence is None
    assert parse_output("", "ctr").answer is None
    c = parse_output("Confidence: 7.5 Answer: no", "ctr")
    assert c.thought.confidence == pytest.approx(0.075) and c.answer == "no"


def test_tool_alternatives_are_the_thoughts_training_writes():
    written = format_thought("sequential", 0.62, "high", 0.97, ["lightsans"]) + "\n" + ANSWER_MARKER
    alts = tool_alternatives(written, ["sasrec", "lightsans", "lightgcn"])
    # none, 3 singles, 3 pairs, the triple; each exactly the thought the instruction builder would
    # write for that usable set (tools in name order), with the written confidence kept
    sets = (
        [[]]
        + [[t] for t in ("lightgcn", "lightsans", "sasrec")]
        + [
            ["lightgcn", "lightsans"],
            ["lightgcn", "sasrec"],
            ["lightsans", "sasrec"],
            ["lightgcn", "lightsans", "sasrec"],
        ]
    )
    assert [full for _, full in alts] == [
        split_target(compose_target("sequential", "x", 0.62, "high", 0.97, s))[0] for s in sets
    ]
    for (head, full), s in zip(alts, sets):
        assert full.startswith(head) and head.endswith(";") and parse_output(full, "sequential").thought.tools == s
    assert len({head for head, _ in alts}) == 8
    # more shown tools than a thought names: subsets stop at three names
    assert len(tool_alternatives(written, ["a", "b", "c", "d"])) == 1 + 4 + 6 + 4
    assert tool_alternatives(written, []) == [] and tool_alternatives("Confidence: 0.5", ["sasrec"]) == []


def test_noisy_tools_fraction_and_corruption():
    nt = NoisyTools(fraction=0.25, seed=1)
    mask = nt.corrupted(np.arange(20000))
    assert abs(mask.mean() - 0.25) < 0.015
    hints = [ToolHint("sasrec", items=["rose lip tint", "volume mascara"]), ToolHint("dcnv2", prob=0.8)]
    distractors = TITLES
    n_bad = 0
    for key in range(400):
        shown, usable, bad = nt.apply(key, hints, ["sasrec"], ["rose lip tint"], distractors)
        if bad:
            n_bad += 1
            assert usable == []
            assert "rose lip tint" not in shown[0].items and len(shown[0].items) == 2
            assert shown[1].prob == pytest.approx(0.2)
        else:
            assert usable == ["sasrec"] and shown == hints
    assert 60 < n_bad < 140
    assert NoisyTools(0.0).apply(3, hints, ["x"])[2] is False
    assert re.search(r"\d", "".join(TEMPLATES["ctr"])) is None  # no digits hard-coded in templates
