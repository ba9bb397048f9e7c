"""score.vlm_budget: the queries routed to the VLM compete for a fixed number of VLM calls by
expected gain; the rest keep their tool's answer (vlm_skipped); a resumed run spends none twice."""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import TINY_RUN, score_until_commit

from ray_jobs import score
from reasonrec.config import CONFIG_DIR, ConfigError, load_config
from reasonrec.hashing import splitmix64
from reasonrec.io import TMP_DIR
from reasonrec.scoring import (
    BUDGET_NOTE,
    ROUTED,
    apply_vlm_budget,
    build_router,
    passthrough,
    select_for_vlm_budget,
    vlm_gains,
)


def _routed(rows):
    return pa.Table.from_pylist(rows, schema=ROUTED)


ROWS = [
    # query_id, task, route, bucket, tool confidence
    (1, "sequential", "medium", "high", 0.1),  # gain 0.7 - 0.1 = 0.6
    (2, "sequential", "high", "low", 0.2),  # 0.3 - 0.2 = 0.1
    (3, "explanation", "medium", "low", None),  # inf
    (4, "ctr", "medium", "medium", 0.3),  # no estimate: 0.5 - 0.3 = 0.2
    (5, "sequential", "low", "high", 0.9),  # not routed to the VLM
    (6, "direct", "medium", "high", 0.4),  # 0.5 (neutral, no direct estimate) - 0.4 = 0.1: ties with 2
    (7, "explanation", "medium", "high", None),  # inf: ties with 3
    (8, "sequential", "rejected", None, None),  # rejected rows never compete
]
RIGHT = {"sequential": {"high": 0.7, "low": 0.3}, "ctr": {"low": 0.9}}


def _table():
    return _routed(
        [
            {
                "query_id": q,
                "task": t,
                "user_id": 0,
                "route": r,
                "eh_bucket": b,
                "tool_confidence": c,
                "rationale": "why",
                "primary_tool": None if t == "explanation" else "sasrec",
                "tool_items": [q, q + 1] if t in ("sequential", "direct") else None,
                "tool_prob": 0.25 if t == "ctr" else None,
                "items": [q] if r == "low" else None,
                "error": "bad" if r == "rejected" else None,
            }
            for q, t, r, b, c in ROWS
        ]
    )


def _by_hash(*ids):
    return sorted(ids, key=lambda q: int(splitmix64(q)))


def test_selection_ranks_by_expected_gain_explanations_first_ties_by_hash():
    table = _table()
    gains = dict(zip(table.column("query_id").to_pylist(), vlm_gains(table, RIGHT)))
    assert gains[1] == pytest.approx(0.6) and gains[2] == pytest.approx(0.1) and gains[4] == pytest.approx(0.2)
    assert gains[6] == pytest.approx(0.1) and math.isinf(gains[3]) and math.isinf(gains[7])
    # explanations first, then gain descending; ties (3 / 7, 2 / 6) by a hash of the query id
    order = [*_by_hash(3, 7), 1, 4, *_by_hash(2, 6)]
    for budget in (0, 1, 3, 5):
        got = select_for_vlm_budget(table, RIGHT, budget)
        assert got.column("query_id").to_pylist() == order[:budget]
        assert got.column("task").to_pylist() == [dict((q, t) for q, t, *_ in ROWS)[q] for q in order[:budget]]
    for budget in (6, 100, -1):  # more than the candidates, or unlimited: every VLM-routed query
        assert select_for_vlm_budget(table, RIGHT, budget).column("query_id").to_pylist() == order
    # The order of the input rows does not matter.
    shuffled = table.take(pa.array([7, 3, 0, 5, 1, 6, 2, 4]))
    assert select_for_vlm_budget(shuffled, RIGHT, 3).column("query_id").to_pylist() == order[:3]


def test_tied_gains_spread_the_budget_over_the_whole_query_table():
    """Equal gains (e.g. many queries whose tool confidence rounds to the same value): the calls go
    to queries all over the id range (so over every shard and task), not to the lowest ids."""
    n = 10_000
    table = _routed(
        [
            {"query_id": q, "task": "sequential", "user_id": 0, "route": "medium", "eh_bucket": "low"}
            | {"tool_confidence": 0.1}
            for q in range(n)
        ]
    )
    got = np.array(select_for_vlm_budget(table, {}, 200).column("query_id").to_pylist())
    assert len(set(got)) == 200
    counts = np.bincount(got * 10 // n, minlength=10)  # calls per tenth of the id range
    assert counts.min() >= 8, counts  # about 20 each; by id, all 200 fell into the first tenth
    again = select_for_vlm_budget(table.take(pa.array(np.random.default_rng(0).permutation(n))), {}, 200)
    assert again.column("query_id").to_pylist() == got.tolist()  # deterministic, input order ignored


def test_skipped_rows_keep_their_tools_answer_and_need_no_vlm():
    out = passthrough(apply_vlm_budget(_table(), set()))  # budget 0: no VLM step needed
    rows = {r["query_id"]: r for r in out.to_pylist()}
    assert [q for q, r in rows.items() if r["vlm_skipped"]] == [1, 2, 3, 4, 6, 7]
    assert not any(r["vlm_called"] for r in rows.values())
    assert (rows[2]["items"], rows[4]["prob"], rows[4]["confidence"]) == ([2, 3], 0.25, pytest.approx(0.3))
    assert rows[3]["text"] is None and rows[3]["items"] is None and BUDGET_NOTE in rows[3]["rationale"]
    assert rows[2]["rationale"] == f"why{BUDGET_NOTE}: sasrec answers"
    assert rows[5]["items"] == [5] and rows[5]["rationale"] == "why"  # low tier untouched
    with pytest.raises(ValueError, match="no VLM step"):  # query 1 won a VLM call: it needs one
        passthrough(apply_vlm_budget(_table(), {1}))
    kept = apply_vlm_budget(_table(), {1}).to_pylist()[0]
    assert not kept["vlm_skipped"] and kept["items"] is None and kept["rationale"] == "why"
    line = score.progress_line(30, 120, 60.0, 7, budget_left=3)
    assert line.endswith("; VLM calls 7, VLM budget left 3")
    assert "VLM calls" not in score.progress_line(3, 10, 1.0, None)  # the routing pass
    with pytest.raises(ConfigError, match="score.vlm_budget"):
        load_config(CONFIG_DIR / "quickstart.yaml", ["score.vlm_budget=-2"])


def test_budget_goes_to_the_top_gains_once_across_a_resume(tiny_run, monkeypatch, caplog):
    """Routed mode with a budget smaller than the VLM-routed queries: exactly that many VLM calls,
    on the largest gains; the rest answered by their tool. Interrupted after its shards were
    written, some shards lost, the resumed run reuses the routed shards and the selection."""
    cfg, store = tiny_run
    base = store.read_json("score", "summary.json")
    queries = store.read_table("score", "queries")
    n_expl = int(pc.sum(pc.equal(queries.column("task"), "explanation")).as_py())
    assert base["vlm_calls"] - n_expl >= 2, base  # ranking / CTR queries routed to the VLM compete too
    budget = n_expl + (base["vlm_calls"] - n_expl) // 2
    c = load_config(
        CONFIG_DIR / "quickstart.yaml",
        TINY_RUN + [f"output_root={cfg.output_root}", f"score.vlm_budget={budget}", "score.stage_name=score_budget"],
    )
    assert score.config_hash(c) != score.config_hash(
        load_config(CONFIG_DIR / "quickstart.yaml", TINY_RUN + ["score.stage_name=score_budget"])
    )
    staging = store.path(TMP_DIR, score.staging_name(c, store))

    score_until_commit(c, monkeypatch)  # every shard written, then the job dies before it commits
    selection = pq.read_table(f"{staging}/vlm_budget.parquet", filesystem=store.arrow_fs)
    assert selection.num_rows == budget
    first = pq.read_table(f"{staging}/predictions", filesystem=store.arrow_fs)
    assert int(pc.sum(first.column("vlm_called")).as_py()) == budget
    lost = [p for p in store.fs.ls(f"{staging}/predictions", detail=False) if p.endswith(".parquet")][::2]
    assert len(lost) >= 2
    for p in lost:
        store.fs.rm(p)
    reused = []
    original = score._vlm_budget_selection
    monkeypatch.setattr(score, "_vlm_budget_selection", lambda *a: reused.append(original(*a)) or reused[-1])
    with caplog.at_level(logging.INFO, logger="reasonrec.score"):
        s = score.run(c)
    assert reused[0].equals(selection) and "reusing the selection" in caplog.text
    assert " routed (" not in caplog.text  # no shard routed twice
    assert s["shards_resumed"] == s["shards"] - len(lost)
    assert (s["vlm_budget"], s["vlm_calls"]) == (budget, budget)
    assert f"budget {budget}; {s['vlm_skipped']} VLM-routed" in score.format_summary(s)
    assert not store.fs.exists(staging)

    preds = store.read_table("score_budget", "predictions")
    ids = preds.column("query_id").to_pylist()
    assert len(ids) == len(set(ids)) == s["queries"] - s["rejected"] == queries.num_rows
    rows = {r["query_id"]: r for r in preds.to_pylist()}
    called = {q for q, r in rows.items() if r["vlm_called"]}
    assert called == set(selection.column("query_id").to_pylist())
    # The same tiers as the unbudgeted run; its VLM-routed queries are called or skipped, never both.
    clean = {r["query_id"]: r for r in store.read_table("score", "predictions").to_pylist()}
    assert {q: r["route"] for q, r in rows.items()} == {q: r["route"] for q, r in clean.items()}
    vlm_routed = {q for q, r in clean.items() if r["vlm_called"]}
    skipped = {q for q, r in rows.items() if r["vlm_skipped"]}
    assert called | skipped == vlm_routed and not called & skipped and s["vlm_skipped"] == len(skipped) > 0
    for q in skipped:
        r = rows[q]
        assert (r["items"], r["prob"], r["thought"]) == (r["tool_items"], r["tool_prob"], None)
        assert BUDGET_NOTE in r["rationale"] and (r["text"] is None)
    # Every explanation first, then the largest gains (P(VLM right) - tool confidence, from routing).
    assert {q for q, r in rows.items() if r["task"] == "explanation"} <= called
    router = build_router(c, store, c.score.split)
    routed = router(queries)
    gains = dict(
        zip(
            routed.column("query_id").to_pylist(),
            vlm_gains(routed, {t: p.vlm_right for t, p in router.planners.items()}),
        )
    )
    ranked = sorted(vlm_routed, key=lambda q: (-gains[q], int(splitmix64(q)), q))
    assert set(ranked[:budget]) == called
