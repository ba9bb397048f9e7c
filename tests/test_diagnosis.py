"""Tool choice diagnosis (reasonrec.diagnosis, bench.routing's diagnosis): hand-computed numbers (Ray-free)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from reasonrec import diagnosis as dg
from reasonrec.planner import ToolAnswers

# 6 queries, 2 tools: "pop" (weak) is picked for q0-q3 where "sas" is right on q0 and q1.
PRIMARY = ["pop", "pop", "pop", "pop", "sas", "sas"]
RIGHT = {"pop": [0, 0, 0, 1, 0, 0], "sas": [1, 1, 0, 0, 1, 0]}
EH = ["low", "low", "low", "high", "high", "high"]


def _rows(rows, grouping, group):
    return {r["tool"]: r for r in rows if r["grouping"] == grouping and r["group"] == group}


def test_pick_table_weak_tool_picked_where_another_is_right():
    prob = {"pop": [0.9] * 4 + [0.1] * 2, "sas": [0.2] * 6}
    rows = dg.pick_table(PRIMARY, RIGHT, {"eh_bucket": EH}, prob=prob)
    assert [(r["grouping"], r["group"]) for r in rows[::2]] == [
        ("all", "all"),
        ("eh_bucket", "low"),
        ("eh_bucket", "high"),
    ]

    every = _rows(rows, "all", "all")
    pop, sas = every["pop"], every["sas"]
    assert pop["n_group"] == 6
    assert pop["system_right"] == pytest.approx(2 / 6)  # pop right on q3, sas on q4
    assert (pop["group_best_tool"], pop["group_best_right"]) == ("sas", pytest.approx(3 / 6))
    assert pop["group_oracle_right"] == pytest.approx(4 / 6)
    assert (pop["picked"], pop["share"], pop["right_when_picked"]) == (4, pytest.approx(4 / 6), pytest.approx(1 / 4))
    assert (pop["best_on_picks"], pop["best_on_picks_right"]) == ("sas", pytest.approx(2 / 4))
    assert pop["oracle_on_picks"] == pytest.approx(3 / 4)
    assert pop["tool_right_group"] == pytest.approx(1 / 6)
    assert pop["p_when_picked"] == pytest.approx(0.9)
    assert (sas["picked"], sas["right_when_picked"], sas["best_on_picks"]) == (2, pytest.approx(0.5), "sas")
    assert sas["tool_right_group"] == pytest.approx(0.5) and sas["p_when_picked"] == pytest.approx(0.2)

    low = _rows(rows, "eh_bucket", "low")
    assert low["pop"]["system_right"] == 0.0
    assert (low["pop"]["picked"], low["pop"]["right_when_picked"]) == (3, 0.0)
    assert (low["pop"]["best_on_picks"], low["pop"]["best_on_picks_right"]) == ("sas", pytest.approx(2 / 3))
    assert (low["sas"]["picked"], low["sas"]["share"], low["sas"]["right_when_picked"]) == (0, 0.0, None)
    assert low["sas"]["best_on_picks"] is None and low["sas"]["p_when_picked"] is None
    assert low["sas"]["tool_right_group"] == pytest.approx(2 / 3)

    high = _rows(rows, "eh_bucket", "high")
    assert high["pop"]["system_right"] == pytest.approx(2 / 3)
    assert (high["pop"]["group_best_tool"], high["pop"]["group_best_right"]) == ("pop", pytest.approx(1 / 3))  # tie
    assert (high["pop"]["picked"], high["pop"]["right_when_picked"]) == (1, 1.0)
    assert (high["sas"]["picked"], high["sas"]["right_when_picked"]) == (2, 0.5)


def test_pick_table_system_override_and_unknown_primary():
    rows = dg.pick_table(["pop", None, "sas"], {"pop": [1, 0, 0], "sas": [0, 1, 1]}, system=[True, True, False])
    every = _rows(rows, "all", "all")
    assert every["pop"]["system_right"] == pytest.approx(2 / 3)
    assert set(every) == {"pop", "sas", ""}
    none = every[""]
    assert (none["picked"], none["right_when_picked"], none["tool_right_group"]) == (1, 1.0, None)
    assert (none["best_on_picks"], none["best_on_picks_right"]) == ("sas", 1.0)
    with pytest.raises(ValueError):
        dg.pick_table(["pop"], {"pop": [1]}, {"eh": ["low", "high"]})


def test_cold_start_labels_partition():
    assert dg.cold_start_labels([1, 3, 4, 6, 7, 10, 0]).tolist() == [
        "1-3 coldest",
        "1-3 coldest",
        "4-6 medium",
        "4-6 medium",
        "7-10 warm",
        "7-10 warm",
        "unknown",
    ]


def test_reliability_calibrated_vs_over_confident():
    good = dg.reliability([0.25] * 4 + [0.75] * 4, [1, 0, 0, 0, 1, 1, 1, 0])
    assert good["ece"] == pytest.approx(0.0)
    assert good["brier"] == pytest.approx(0.1875)  # (3 * 0.25^2 + 0.75^2) * 2 / 8
    assert [(b["n"], b["mean_pred"], b["observed"]) for b in good["bins"] if b["n"]] == [
        (4, 0.25, 0.25),
        (4, 0.75, 0.75),
    ]
    assert len(good["bins"]) == 10 and good["bins"][0]["mean_pred"] is None

    bad = dg.reliability([0.9] * 10, [1] * 5 + [0] * 5)
    assert bad["ece"] == pytest.approx(0.4)
    assert bad["brier"] == pytest.approx(0.41)  # (5 * 0.1^2 + 5 * 0.9^2) / 10
    assert (bad["mean_pred"], bad["observed"]) == (pytest.approx(0.9), 0.5)
    assert bad["bins"][9]["n"] == 10

    mixed = dg.reliability([0.05, 0.05, 0.95, 0.95, 1.0, float("nan")], [0, 0, 1, 0, 1, 1], bins=10)
    # bin 0: P 0.05, observed 0; bin 9 (1.0 included): P 0.9667, observed 2/3; NaN left out.
    assert mixed["n"] == 5
    assert mixed["ece"] == pytest.approx(2 / 5 * 0.05 + 3 / 5 * abs(2.9 / 3 - 2 / 3))
    assert mixed["brier"] == pytest.approx((0.0025 * 3 + 0.9025 + 0.0) / 5)


def test_reliability_bins_agree_with_the_ece():
    rng = np.random.default_rng(0)
    p = rng.random(500)
    y = rng.random(500) < p**2
    for bins in (5, 10, 15):
        rel = dg.reliability(p, y, bins)
        weighted = sum(b["n"] / rel["n"] * abs(b["mean_pred"] - b["observed"]) for b in rel["bins"] if b["n"])
        assert rel["ece"] == pytest.approx(weighted)
        assert sum(b["n"] for b in rel["bins"]) == 500


def test_markdown_tables():
    rows = dg.pick_table(PRIMARY, RIGHT, {"eh_bucket": EH})
    md = dg.pick_markdown(rows, "sequential")
    assert "| all | 6 | 0.3333 | sas 0.5000 | 0.6667 |" in md
    assert "| eh_bucket: low | pop | 3 | 1.000 | 0.0000 |  | sas 0.6667 | 0.6667 | 0.0000 |" in md
    assert "| eh_bucket: low | sas |" not in md  # never picked there
    rel = dg.reliability([0.9] * 10, [1] * 5 + [0] * 5)
    cal = dg.calibration_markdown({"pop": rel})
    assert "| pop | 10 | 0.9000 | 0.5000 | 0.4000 | 0.4100 | [0.9, 1.0) (10, 0.900 -> 0.500) |" in cal
    assert "| [0.9, 1.0) | 10 | 0.9000 | 0.5000 | -0.4000 |" in dg.reliability_markdown(rel, "pop")


# ------------------------------------------------------------------ tools through the scoring path
class _Box:
    """Tool "a" ranks the user id first, tool "b" the user id sixth (outside a top 5)."""

    def __init__(self):
        self.batches = []

    def answer(self, task, users, hists, k=10, candidates=None, items=None):
        self.batches.append(len(users))
        out = ToolAnswers(task, ["a", "b"])
        out.items["a"] = np.array([[u, 100, 101, 102, 103, 104] for u in users], np.int64)
        out.items["b"] = np.array([[200, 201, 202, 203, 204, u] for u in users], np.int64)
        for n in out.names:
            out.margin[n] = np.full(len(users), 0.5)
        return out


class _Planner:
    names = ["a", "b"]

    def usable_prob(self, feats):
        return np.stack([feats[:, 0], 1 - feats[:, 0]], 1).astype(np.float64)  # P(a right) = EH


class _Users:
    EH = {1: 0.8, 2: 0.2, 3: 0.3}

    def __init__(self):
        self.splits = []

    def resolve(self, user_id, history=None, split="test"):
        self.splits.append(split)
        return SimpleNamespace(user_id=user_id, history=np.arange(3), eh=self.EH[user_id], bucket="low")


def _queries():
    # q10: a right; q11: nobody right; q12: b right (202 in its top 5).
    return [
        {"query_id": 10, "task": "sequential", "user_id": 1, "target": 1},
        {"query_id": 11, "task": "sequential", "user_id": 2, "target": 999},
        {"query_id": 12, "task": "sequential", "user_id": 3, "target": 202},
    ]


def test_answer_rightness_batches_through_the_scoring_path():
    box, users = _Box(), _Users()
    got = dg.answer_rightness(_queries(), box, _Planner(), users, np.ones(300), split="test", batch=2)
    assert box.batches == [2, 1] and set(users.splits) == {"test"}
    assert got["query_id"].tolist() == [10, 11, 12]
    assert got["right"]["a"].tolist() == [True, False, False]
    assert got["right"]["b"].tolist() == [False, False, True]
    assert got["prob"]["a"] == pytest.approx([0.8, 0.2, 0.3])
    assert got["learned"].tolist() == ["a", "b", "b"]


def test_bench_diagnose_task_on_stub_tools():
    from bench.routing import diagnose_task

    queries = pa.Table.from_pylist(
        [{**q, "label": None, "reference": None} for q in _queries()],
        schema=pa.schema(
            [
                ("query_id", pa.int64()),
                ("task", pa.string()),
                ("user_id", pa.int64()),
                ("target", pa.int64()),
                ("label", pa.int8()),
                ("reference", pa.string()),
            ]
        ),
    )

    def preds(primary):
        items = {
            "a": lambda u: [u, 100, 101, 102, 103],
            "b": lambda u: [200, 201, 202, 203, 204],
            "fusion": lambda u: [300, 301, 302, 303, 304],
        }
        return pa.table(
            {
                "query_id": [10, 11, 12],
                "task": ["sequential"] * 3,
                "primary_tool": primary,
                "items": [items[p](u) for p, u in zip(primary, [1, 2, 3])],
                "prob": pa.array([None] * 3, pa.float32()),
            }
        )

    users_table = pa.table({"user_id": [1, 2, 3], "n_train": [5, 1, 9], "eh_bucket": ["low", "high", "high"]})
    out, md = diagnose_task(
        "sequential",
        _queries(),
        {
            "learned": preds(["a", "a", "a"]),
            "learned, no guard": preds(["a", "b", "b"]),
            "fused": preds(["a", "fusion", "b"]),  # the fused ranking answered q11 (wrong)
        },
        queries,
        users_table,
        _Box(),
        _Planner(),
        _Users(),
        np.ones(300),
    )
    assert out["n"] == 3
    fixed, learned = out["choices"]["learned"], out["choices"]["learned, no guard"]
    assert fixed["primary_vs_system_mismatch"] == 0 and learned["primary_vs_system_mismatch"] == 0
    assert fixed["primary_is_highest_p"] == pytest.approx(1 / 3) and learned["primary_is_highest_p"] == 1.0
    a = _rows(fixed["picks"], "all", "all")["a"]
    assert (a["picked"], a["right_when_picked"], a["best_on_picks"]) == (3, pytest.approx(1 / 3), "a")
    assert a["system_right"] == pytest.approx(1 / 3) and a["group_oracle_right"] == pytest.approx(2 / 3)
    assert _rows(learned["picks"], "all", "all")["a"]["system_right"] == pytest.approx(2 / 3)
    high = _rows(learned["picks"], "eh_bucket", "high")["b"]
    assert (high["picked"], high["right_when_picked"]) == (2, 0.5)
    # Cold-start groups over the three users (by n_train): user 2 -> group 1, 1 -> 2, 3 -> 3: all coldest.
    assert {r["group"] for r in learned["picks"] if r["grouping"] == "cold_start"} == {"1-3 coldest"}
    assert out["calibration"]["a"]["n"] == 3
    assert out["calibration"]["a"]["brier"] == pytest.approx(((0.8 - 1) ** 2 + 0.2**2 + 0.3**2) / 3)
    fused = out["choices"]["fused"]
    assert fused["primary_not_a_tool"] == {"fusion": 1} and fused["primary_vs_system_mismatch"] == 0
    assert fused["primary_is_highest_p"] == 1.0  # over q10 (a) and q12 (b)
    f = _rows(fused["picks"], "all", "all")["fusion"]
    assert (f["picked"], f["right_when_picked"], f["tool_right_group"], f["best_on_picks"]) == (1, 0.0, None, "a")
    assert "1 queries answered by fusion (no tool)" in md
    assert "sequential, learned choice" in md and "sequential, b (picked as primary)" in md
