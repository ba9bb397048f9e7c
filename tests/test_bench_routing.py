"""bench.routing's choice bounds from the tools' own test answers (oracle, random expectation)."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from bench.routing import choice_bounds
from reasonrec.evaluation import read_split


def test_oracle_and_random_choices_from_the_tools_test_answers(tiny_run):
    cfg, store = tiny_run
    bounds = choice_bounds(store, k=5)
    preds = read_split(store, "train_tools", "predictions", ["user_id", "tool", "rank", "cand_rank", "n_candidates"])
    preds = preds.filter(pc.not_equal(preds.column("tool"), "ensemble"))
    for task, col in (("sequential", "rank"), ("direct", "cand_rank")):
        rows = preds.to_pylist()
        if task == "direct":
            rows = [r for r in rows if r["n_candidates"] > 0]
        by_user: dict[int, list[bool]] = {}
        by_tool: dict[str, list[bool]] = {}
        for r in rows:
            by_user.setdefault(r["user_id"], []).append(r[col] < 5)
            by_tool.setdefault(r["tool"], []).append(r[col] < 5)
        b = bounds[task]
        assert b["n"] == len(by_user) > 0
        assert b["oracle"] == np.mean([any(v) for v in by_user.values()])
        assert np.isclose(b["random"], np.mean([np.mean(v) for v in by_tool.values()]))
        best = max(np.mean(v) for v in by_tool.values())
        assert min(np.mean(v) for v in by_tool.values()) <= b["random"] <= best <= b["oracle"]
