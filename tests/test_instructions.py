"""The instruction builder on the shared tiny run: what the ``instructions`` stage wrote, and the
training-prefix augmentation through both passes (label with the tools, render)."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ray_jobs import build_instructions
from reasonrec.data.catalog import load_context
from reasonrec.data.queries import prefix_position, prepared_queries
from reasonrec.instructions import confidence_table, hint_keep_rates, label_batch, render_batch, tool_ranking
from reasonrec.planner import ToolBox, load_toolbox
from reasonrec.prompts.cot import parse_output
from reasonrec.prompts.templates import DEFAULT_IMAGE_TOKEN, TemplateSampler
from reasonrec.prompts.user_desc import describe_users
from reasonrec.tools import tool_class
from reasonrec.tools.data import hold_out_last, load_tool_data


def _tables(store):
    return {n: store.read_table("prepare", n) for n in ("loo", "direct_candidates", "ctr", "explanation")}


def _prompt_context(cfg, store):
    """(catalog, users, prompt builder) of the run, as the instructions stage loads them."""
    ic = cfg.instructions
    return load_context(
        store,
        cfg.vlm,
        cfg.data.eh_thresholds,
        TemplateSampler(ic.template_mixture, ic.single_template, ic.seed),
        ic.prompt_candidates,
    )


def test_stage_tags_phase_confidence_tools_and_photos(tiny_run):
    cfg, store = tiny_run
    ex = store.read_table("instructions", "examples").to_pylist()
    conf = store.read_json("instructions", "summary.json")["confidence_table"]
    buckets = dict(zip(*store.read_table("prepare", "users", columns=["user_id", "eh_bucket"]).to_pydict().values()))
    n_items = store.read_table("prepare", "items", columns=["item_id"]).num_rows
    tools = set(store.read_json("train_tools", "metrics.json")["tools"])
    assert {e["task"] for e in ex} == set(cfg.instructions.tasks)
    by_task: dict[str, set] = {}
    for e in ex:
        assert e["phase"] == buckets[e["user_id"]]  # curriculum tag = the user's EH bucket
        parsed = parse_output(e["target"], e["task"])
        assert parsed.complete, e["target"]
        # The confidence target is an entry of the fitted table (2 decimals), per task.
        assert any(
            abs(parsed.thought.confidence - v) < 0.0051 for k, v in conf.items() if k.split("|")[0] == e["task"]
        ), e["target"]
        by_task.setdefault(e["task"], set()).add(round(parsed.thought.confidence, 2))
        # Photos are item ids, one per placeholder, never bytes.
        assert e["prompt"].count(DEFAULT_IMAGE_TOKEN) == len(e["image_items"])
        assert all(0 <= i < n_items for i in e["image_items"])
        assert set(e["tools_usable"]) <= tools
        if e["noisy_tools"]:
            assert e["tools_usable"] == [] and "none" in e["target"]
    # Calibrated by group, not a constant.
    assert any(len(v) > 1 for v in by_task.values()), by_task
    # The tools' order for hint_order=usable_rate, fitted on the validation rows, is recorded.
    rank = store.read_json("instructions", "summary.json")["tool_ranking"]
    assert set(rank) <= set(cfg.instructions.tasks) - {"explanation"} and rank
    assert all(r and set(r) <= tools and len(set(r)) == len(r) for r in rank.values()), rank


def test_train_prefixes_predict_each_earlier_item_from_the_items_before_it(tiny_run):
    cfg, store = tiny_run
    tables = _tables(store)
    n_items = store.read_table("prepare", "items", columns=["item_id"]).num_rows
    train = dict(zip(*tables["loo"].select(["user_id", "train_items"]).to_pydict().values()))
    base = prepared_queries(tables, "sequential", "train", n_items)
    aug = prepared_queries(tables, "sequential", "train", n_items, prefixes=2)
    # The last-item examples keep their ids and rows; the extra ones add earlier positions.
    assert aug.slice(0, base.num_rows).drop_columns(["history"]).equals(base.drop_columns(["history"]))
    assert base.column("history").null_count == base.num_rows
    extra = aug.slice(base.num_rows).to_pylist()
    assert len(extra) == sum(min(2, max(len(t) - 2, 0)) for t in train.values())
    assert len({r["query_id"] for r in aug.to_pylist()}) == aug.num_rows
    for r in extra:
        t = train[r["user_id"]]
        assert 1 <= len(r["history"]) <= len(t) - 2
        assert r["history"] == t[: len(r["history"])] and r["target"] == t[len(r["history"])]
    # Direct training lists: the prefix's target is among its candidates, history excluded.
    direct = prepared_queries(tables, "direct", "train", n_items, cfg.data.direct_negatives, prefixes=1)
    for r in direct.to_pylist():
        assert r["target"] in r["candidates"] and len(set(r["candidates"])) == len(r["candidates"])

    # Both passes use the prefix, not the user's full history.
    ic = cfg.instructions
    catalog, users, prompts = _prompt_context(cfg, store)
    rows = pa.Table.from_pylist(extra[:8], schema=aug.schema)
    labeled = label_batch(rows, "train", load_toolbox(store), users, catalog, ic)
    assert labeled.column("history").to_pylist() == [r["history"] for r in extra[:8]]
    stats = labeled.to_pydict()
    conf = confidence_table(stats["task"], stats["eh_bucket"], stats["len_bin"], stats["ref_right"])
    out = render_batch(labeled, conf, prompts, users, catalog, ic).to_pylist()
    for r, e in zip(extra[:8], out):
        assert parse_output(e["target"], "sequential").answer == catalog.text[r["target"]]
        # The user description summarises the prefix, not items bought after it.
        assert describe_users([np.array(r["history"])], catalog.attrs)[0] in e["prompt"]
        shown = r["history"][-cfg.vlm.max_history_items :]
        assert catalog.text[shown[-1]] in e["prompt"]
        later = [i for i in train[r["user_id"]][len(r["history"]) :] if i not in r["history"]]
        assert not any(
            catalog.text[i] in e["prompt"].split("Tool hints")[0]
            for i in later
            if catalog.text[i] not in {catalog.text[h] for h in r["history"]}
        ), e["prompt"]
    assert np.all(labeled.column("len_bin").to_numpy() <= np.log2(1 + max(len(r["history"]) for r in extra[:8])))


def test_tool_ranking_orders_by_usable_rate_per_task():
    task = ["sequential"] * 4 + ["direct"] * 2 + ["explanation"]
    usable = [["b", "a"], ["b"], ["c", "b"], [], ["a"], ["a", "c"], []]
    assert tool_ranking(task, usable) == {"sequential": ["b", "a", "c"], "direct": ["a", "c"]}
    pinned = tool_ranking(task, usable, first=["c", "b"])
    assert pinned == {"sequential": ["c", "b", "a"], "direct": ["c", "a"]}  # pinned lead where present


def test_tool_order_pins_the_stages_ranking_and_an_unknown_name_is_an_error(tiny_run, tmp_path):
    cfg, store = tiny_run
    run_dir = tmp_path / cfg.run_name  # a copy of the tiny run's inputs: its own stage stays as it is
    for stage in ("prepare", "train_tools"):
        shutil.copytree(Path(store.path(stage)), run_dir / stage)
    fitted = store.read_json("instructions", "summary.json")["tool_ranking"]["sequential"]
    assert len(fitted) > 1
    ic = replace(cfg.instructions, tasks=["sequential"], hint_order="usable_rate", tool_order=[fitted[-1]])
    pinned = replace(cfg, output_root=str(tmp_path), instructions=ic)
    build_instructions.run(pinned)
    got = json.loads((run_dir / "instructions" / "summary.json").read_text())["tool_ranking"]["sequential"]
    assert got == [fitted[-1]] + fitted[:-1]  # the pinned tool leads, the rest keep their order
    with pytest.raises(ValueError, match="tool_order names .'no_such_tool'."):
        build_instructions.run(replace(pinned, instructions=replace(ic, tool_order=["no_such_tool"])))


def test_hint_fraction_and_usable_rate_order_choose_the_shown_tools(tiny_run):
    cfg, store = tiny_run
    tables = _tables(store)
    n_items = store.read_table("prepare", "items", columns=["item_id"]).num_rows
    ic = cfg.instructions
    catalog, users, prompts = _prompt_context(cfg, store)
    queries = prepared_queries(tables, "sequential", "train", n_items).slice(0, 24)
    labeled = label_batch(queries, "train", load_toolbox(store), users, catalog, ic)
    stats = labeled.to_pydict()
    conf = confidence_table(stats["task"], stats["eh_bucket"], stats["len_bin"], stats["ref_right"])
    rank = tool_ranking(stats["task"], stats["usable"])
    names = load_toolbox(store).names("sequential")
    # A ranking that differs from the tools' name order, so the test sees which one is used.
    order = rank["sequential"] + sorted(set(names) - set(rank["sequential"]))
    order = order[::-1]
    every = replace(ic, hint_fraction=1.0, hint_order="usable_rate", noisy_tools_fraction=0.0)
    with pytest.raises(ValueError, match="usable_rate"):
        render_batch(labeled, conf, prompts, users, catalog, every)
    out = render_batch(labeled, conf, prompts, users, catalog, every, {"sequential": order}).to_pylist()
    for e in out:
        shown = re.findall(r"(\w+) suggests", e["prompt"].split("Tool hints: ")[1])
        assert shown == order[: ic.max_tool_hints], e["prompt"]
    none = render_batch(labeled, conf, prompts, users, catalog, replace(ic, hint_fraction=0.0)).to_pylist()
    assert not any("Tool hints" in e["prompt"] for e in none)
    half = render_batch(labeled, conf, prompts, users, catalog, ic).to_pylist()  # default: random, ~half
    assert 0 < sum("Tool hints" in e["prompt"] for e in half) < len(half)


def test_hint_keep_rates_bring_each_tools_training_rate_to_its_validation_rate():
    keep = hint_keep_rates(
        ["sequential"] * 6 + ["ctr"] * 2 + ["direct"],
        ["train"] * 4 + ["valid"] * 2 + ["train", "valid", "train"],
        [["a", "b"], ["a"], ["a"], ["a"], ["a", "b"], [], ["x"], [], ["a"]],
    )
    # a: right on 4 of 4 training rows, 1 of 2 validation rows; b: 1/4 vs 1/2 (not raised);
    # direct has no validation rows (nothing to match); CTR is not a ranking task.
    assert keep == {"sequential": {"a": 0.5, "b": 1.0}, "direct": {"a": 1.0}}


def test_hint_calibration_ranks_the_truth_out_of_a_share_of_right_training_hints(tiny_run):
    cfg, store = tiny_run
    tables = _tables(store)
    n_items = store.read_table("prepare", "items", columns=["item_id"]).num_rows
    ic = cfg.instructions
    catalog, users, prompts = _prompt_context(cfg, store)
    toolbox = load_toolbox(store)
    labeled = label_batch(
        prepared_queries(tables, "sequential", "train", n_items, prefixes=3), "train", toolbox, users, catalog, ic
    )
    stats = labeled.to_pydict()
    conf = confidence_table(stats["task"], stats["eh_bucket"], stats["len_bin"], stats["ref_right"])
    rank = {"sequential": toolbox.names("sequential")}
    shown = rank["sequential"][: ic.max_tool_hints]
    every = replace(ic, hint_fraction=1.0, hint_order="usable_rate", noisy_tools_fraction=0.0)
    calib = replace(every, hint_calibration=True)
    with pytest.raises(ValueError, match="hint_calibration"):
        render_batch(labeled, conf, prompts, users, catalog, calib, rank)
    plain = render_batch(labeled, conf, prompts, users, catalog, every, rank).to_pylist()
    keep_all = {"sequential": {n: 1.0 for n in shown}}
    assert render_batch(labeled, conf, prompts, users, catalog, calib, rank, keep_all).to_pylist() == plain
    half = render_batch(
        labeled, conf, prompts, users, catalog, calib, rank, {"sequential": {n: 0.5 for n in shown}}
    ).to_pylist()
    kept = demoted = 0
    for r, p, h in zip(labeled.to_pylist(), plain, half):
        truth = catalog.text[r["target"]]
        before = parse_output(p["target"], "sequential").thought.tools
        after = parse_output(h["target"], "sequential").thought.tools
        assert set(after) <= set(before)
        for hint in json.loads(r["hints"]):
            if hint["name"] not in before:
                assert f"{hint['name']} suggests {'; '.join(hint['items'][:5])}" in h["prompt"]
            elif hint["name"] in after:
                kept += 1
                assert f"{hint['name']} suggests {'; '.join(hint['items'][:5])}" in h["prompt"]
            else:
                # Shown as if the tool had ranked the truth lower: its next text takes the place.
                demoted += 1
                rest = [t for t in hint["items"] if t != truth][:5]
                assert f"{hint['name']} suggests {'; '.join(rest)}." in h["prompt"], (truth, h["prompt"])
    assert kept + demoted >= 20 and 0.25 <= demoted / (kept + demoted) <= 0.75, (kept, demoted)
    # Validation rows are the tools' out-of-sample answers: never changed.
    valid = label_batch(
        prepared_queries(tables, "sequential", "valid", n_items).slice(0, 16), "valid", toolbox, users, catalog, ic
    )
    drop_all = {"sequential": {n: 0.0 for n in shown}}
    assert (
        render_batch(valid, conf, prompts, users, catalog, calib, rank, drop_all).to_pylist()
        == render_batch(valid, conf, prompts, users, catalog, every, rank).to_pylist()
    )


def test_holdout_tools_give_the_hints_of_held_out_transitions_and_no_others(tiny_run):
    cfg, store = tiny_run
    tables = _tables(store)
    n_items = store.read_table("prepare", "items", columns=["item_id"]).num_rows
    ic = replace(cfg.instructions, hint_fraction=1.0, noisy_tools_fraction=0.0)
    catalog, users, prompts = _prompt_context(cfg, store)
    # Popularity without each user's last training item: its counts differ from the full tool's.
    held = tool_class("popularity")({})
    held.fit(hold_out_last(load_tool_data(store), 1))
    holdout, full = ToolBox({"popularity": held}), load_toolbox(store)
    queries = prepared_queries(tables, "sequential", "train", n_items, prefixes=1)
    labeled = label_batch(queries, "train", full, users, catalog, ic, holdout, 1)
    assert sorted(labeled.column("query_id").to_pylist()) == sorted(queries.column("query_id").to_pylist())
    k = dict(
        zip(
            queries.column("query_id").to_pylist(),
            prefix_position(queries.column("query_id").to_numpy(), queries.column("task").to_pylist(), "train"),
        )
    )
    assert set(k.values()) == {0, 1}
    # What each toolbox alone says about the last-item (k = 0) queries.
    last = queries.filter(pa.array([k[q] == 0 for q in queries.column("query_id").to_pylist()]))
    by_held = {r["query_id"]: r for r in label_batch(last, "train", holdout, users, catalog, ic).to_pylist()}
    by_full = {r["query_id"]: r for r in label_batch(last, "train", full, users, catalog, ic).to_pylist()}
    for r in labeled.to_pylist():
        if k[r["query_id"]] == 0:  # predicts the held-out item: the held-out tools label it
            assert json.loads(r["hints"]) == json.loads(by_held[r["query_id"]]["hints"]) != []
            assert r["usable"] == by_held[r["query_id"]]["usable"] and set(r["usable"]) <= {"popularity"}
        else:  # in-sample for every tool: usable tools kept, no hints
            assert r["hints"] == "[]"
    # The full toolbox has more tools than the held-out one, so the hints show which one answered.
    assert all(
        [h["name"] for h in json.loads(by_held[q]["hints"])]
        == ["popularity"]
        != [h["name"] for h in json.loads(by_full[q]["hints"])]
        for q in by_held
    )
    stats = labeled.to_pydict()
    conf = confidence_table(stats["task"], stats["eh_bucket"], stats["len_bin"], stats["ref_right"])
    for r, e in zip(labeled.to_pylist(), render_batch(labeled, conf, prompts, users, catalog, ic).to_pylist()):
        assert ("Tool hints" in e["prompt"]) == (k[r["query_id"]] == 0), e["prompt"]
    # Validation rows are out-of-sample for the full tools already: the held-out copies are not used.
    valid = prepared_queries(tables, "sequential", "valid", n_items).slice(0, 8)
    assert label_batch(valid, "valid", full, users, catalog, ic, holdout, 1).equals(
        label_batch(valid, "valid", full, users, catalog, ic)
    )
