"""``vlm.sequential_pool``: sequential queries answered by scoring the tools' candidate pool instead
of decoding over the catalog trie (issue 33 item 3)."""

from __future__ import annotations

import json
from dataclasses import replace

import pyarrow.compute as pc
import pytest
import torch
from conftest import TINY_RUN

from ray_jobs import score
from reasonrec.config import CONFIG_DIR, ConfigError, load_config
from reasonrec.scoring import build_router, build_vlm_answerer

POOL = 3


class _Calls:
    """The real predictor, recording which method answered which examples."""

    def __init__(self, inner):
        self.inner, self.tok, self.calls = inner, inner.tok, []

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def recorded(examples, *a, **kw):
            self.calls.append((name, len(examples)))
            return fn(examples, *a, **kw)

        return recorded


def _router_and_answerer(cfg, store, mode: str, pool: int):
    """The batch job's router and VLM answerer for ``mode`` and ``vlm.sequential_pool=pool``
    (built as the scoring actors build them), the predictor wrapped to record its calls."""
    torch.manual_seed(0)
    c = replace(
        cfg,
        score=replace(cfg.score, mode=mode, count_flops=False),
        vlm=replace(cfg.vlm, sequential_pool=pool),
    )
    router = build_router(c, store)
    answerer = build_vlm_answerer(c, store, batch_size=4)
    answerer.predictor = _Calls(answerer.predictor)
    return router, answerer, answerer.catalog


def _expected_pool(row: dict, text: list[str], n: int) -> set[int]:
    """The union of the consulted tools' top-n as the router hands them over, written out plainly."""
    out = set((row["tool_items"] or [])[:n])
    for hint in json.loads(row["hints"]) if row["hints"] else []:
        for t in hint["items"][:n]:
            out |= {i for i, s in enumerate(text) if s.strip() == t.strip()}
    return out


@pytest.mark.parametrize("mode", ["vlm", "vlm_tools"])  # medium rows (primary tool only), high rows (hints)
def test_pool_answers_hold_only_pool_items_and_skip_the_trie(tiny_run, mode):
    cfg, store = tiny_run
    queries = store.read_table("score", "queries")
    queries = queries.filter(pc.equal(queries.column("task"), "sequential"))
    router, answerer, catalog = _router_and_answerer(cfg, store, mode, POOL)
    routed = router(queries)
    out = answerer(routed).to_pylist()
    rows = routed.to_pylist()
    assert [r["query_id"] for r in out] == [r["query_id"] for r in rows]  # each query once, in order
    assert all(r["vlm_called"] for r in out)
    for r, o in zip(rows, out):
        pool = _expected_pool(r, catalog.text, POOL)
        assert set(answerer.sequential_pool(r)) == pool and pool
        assert o["items"] and set(o["items"]) <= pool, r["query_id"]
        assert len(o["items"]) == min(len(pool), cfg.score.k)
    if mode == "vlm_tools":  # hints widen the pool beyond the primary tool's top-n
        assert any(len(answerer.sequential_pool(r)) > POOL for r in rows)
    # Every query scored once, by the pool: the trie's beam search never ran.
    names = {name for name, _ in answerer.predictor.calls}
    assert "rank_catalog" not in names
    assert sum(n for name, n in answerer.predictor.calls if name == "score_candidates") == len(rows)


def test_pool_off_decodes_over_the_trie(tiny_run):
    cfg, store = tiny_run
    queries = store.read_table("score", "queries")
    queries = queries.filter(pc.equal(queries.column("task"), "sequential")).slice(0, 4)
    router, answerer, _ = _router_and_answerer(cfg, store, "vlm", 0)
    answerer(router(queries))
    assert {name for name, _ in answerer.predictor.calls} == {"rank_catalog"}


def test_scoring_job_with_the_pool_scores_every_query_exactly_once(tiny_run):
    cfg, store = tiny_run
    c = load_config(
        CONFIG_DIR / "quickstart.yaml",
        TINY_RUN
        + [
            f"output_root={cfg.output_root}",
            # every tool task: the shared planner stage is re-fitted for the tasks scored, and a
            # later test of the session needs the planners of all three
            "score.tasks=[sequential,direct,ctr]",
            "score.mode=vlm",
            f"vlm.sequential_pool={POOL}",
            "score.stage_name=score_pool",
        ],
    )
    s = score.run(c)
    preds = store.read_table("score_pool", "predictions").to_pylist()
    queries = store.read_table("score_pool", "queries")
    ids = [r["query_id"] for r in preds]
    assert s["queries"] == queries.num_rows == len(preds) == len(set(ids)) > 0
    assert sorted(ids) == sorted(queries.column("query_id").to_pylist())
    assert s["vlm_calls"] == len(preds)
    # mode vlm: medium rows, whose sequential pool is the primary tool's top-POOL
    for r in (r for r in preds if r["task"] == "sequential"):
        assert r["vlm_called"] and r["items"] and set(r["items"]) <= set(r["tool_items"][:POOL]), r["query_id"]


def test_pool_size_must_not_be_negative():
    with pytest.raises(ConfigError, match="vlm.sequential_pool"):
        load_config(CONFIG_DIR / "quickstart.yaml", ["vlm.sequential_pool=-1"])
