"""The fused ranking of the tools' answers (reasonrec/fusion.py) and its guard in the planner
(Ray-free): candidates, features, ranking with fallback, a world where fusing wins, a world where
it cannot, persistence, and the CTR guard by AUC."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from reasonrec.config import PlannerConfig
from reasonrec.fusion import FusionRanker, candidate_features, candidates, feature_names
from reasonrec.planner import FEATURES, TaskPlanner, ToolAnswers, plan

NAMES = ["a", "b"]
N_ITEMS = 500
POP = np.linspace(10, 1, N_ITEMS)


def test_candidates_are_the_union_in_first_seen_order():
    items = {"a": np.array([[5, 3, 9], [1, 2, 3]]), "b": np.array([[3, 7, 5], [4, 5, 6]])}
    cand, valid = candidates(items, ["a", "b"], 3)
    assert cand.tolist() == [[5, 3, 9, 7, -1, -1], [1, 2, 3, 4, 5, 6]]
    assert valid.tolist() == [[True] * 4 + [False] * 2, [True] * 6]
    cand2, _ = candidates(items, ["a", "b"], 2)  # top 2 only
    assert cand2.tolist() == [[5, 3, 7, -1], [1, 2, 4, 5]]


def test_candidate_features_describe_each_tools_view():
    items = {"a": np.array([[5, 3, 9]]), "b": np.array([[3, 7, 5]])}
    scores = {"a": np.array([[3.0, 2.0, 1.0]]), "b": np.array([[0.9, 0.5, 0.1]])}
    cand, valid, x = candidate_features(
        items, scores, ["a", "b"], 3, POP, np.array([0.2]), np.array([4]), [np.array([9])]
    )
    f = {n: i for i, n in enumerate(feature_names(["a", "b"]))}
    assert x.shape == (1, 4, len(f)) and cand[0].tolist() == [5, 3, 9, 7]
    row = {c: x[0, j] for j, c in enumerate(cand[0].tolist())}
    assert row[5][f["a.rr"]] == 1.0 and abs(row[5][f["b.rr"]] - 1 / 3) < 1e-5
    assert row[7][f["a.rr"]] == 0.0 and row[7][f["a.z"]] == -3.0  # absent from a's list
    assert row[3][f["n_tools"]] == 1.0 and row[9][f["n_tools"]] == 0.5
    assert row[9][f["in_history"]] == 1.0 and row[5][f["in_history"]] == 0.0
    assert abs(row[3][f["log_hist"]] - np.log1p(4)) < 1e-5


def _agreement_world(n: int, seed: int, top: int = 10):
    """Two tools each list 10 random items; exactly one item is in both lists, at random ranks,
    and it is the truth. Each tool alone has it in its top 5 half the time; an item both tools
    propose is the answer, which only a ranker of their union can see."""
    rng = np.random.default_rng(seed)
    items, truth = {m: np.zeros((n, top), np.int64) for m in NAMES}, np.zeros(n, np.int64)
    for q in range(n):
        pool = rng.choice(N_ITEMS, 2 * top - 1, replace=False)
        t = pool[0]
        a, b = list(pool[1:top]), list(pool[top:])
        a.insert(rng.integers(0, top), t)
        b.insert(rng.integers(0, top), t)
        items["a"][q], items["b"][q], truth[q] = a, b, t
    scores = {m: -np.arange(top, dtype=np.float64)[None].repeat(n, 0) for m in NAMES}
    return items, scores, truth


def _fit_inputs(items, scores, truth, top_n=10):
    n = len(truth)
    hists = [np.array([], np.int64)] * n
    cand, valid, x = candidate_features(items, scores, NAMES, top_n, POP, np.full(n, 0.5), np.full(n, 3), hists)
    xs, ys = [], []
    for j in range(n):
        y = cand[j][valid[j]] == truth[j]
        xs.append(x[j][valid[j]] if y.any() else np.zeros((0, x.shape[2]), np.float32))
        ys.append(y if y.any() else np.zeros(0, bool))
    usable = {m: (items[m][:, :5] == truth[:, None]).any(1) for m in NAMES}
    feats = np.random.default_rng(0).random((n, len(FEATURES) + len(NAMES))).astype(np.float32)
    return feats, usable, (xs, ys)


def test_fusion_wins_where_the_tools_agree_and_answers_through_plan():
    items, scores, truth = _agreement_world(1200, seed=1)
    feats, usable, fusion = _fit_inputs(items, scores, truth)
    cfg = PlannerConfig(confidence_rounds=20, fusion_rounds=40)
    planner = TaskPlanner.fit("sequential", NAMES, feats, usable, cfg, fusion=fusion)
    g = planner.guard
    assert g["use"] == "fusion" and planner.uses_fusion
    assert g["fusion_right"] > 0.95 > 0.6 > g["fixed_right"]
    assert g["fusion_gain"] > g["z"] * g["fusion_se"] > 0

    # New queries: the fused answer (as the router computes it) finds what neither tool does.
    it, sc, tt = _agreement_world(300, seed=2)
    n = len(tt)
    ans = ToolAnswers("sequential", NAMES, items=it, scores=sc, margin={m: np.zeros(n) for m in NAMES})
    fused = planner.fuse(ans, np.full(n, 0.5), np.full(n, 3), [np.array([], np.int64)] * n, POP, 10)
    hit = (fused[:, :5] == tt[:, None]).any(1).mean()
    assert hit > 0.95 > 0.6 > max((it[m][:, :5] == tt[:, None]).any(1).mean() for m in NAMES)
    assert (fused >= 0).all() and all(len(set(r)) == 10 for r in fused.tolist())  # k distinct items

    ans.items["fusion"] = fused
    ds = plan(planner, ans, feats[:n], ["low"] * n, np.full(n, 0.1), np.arange(n), PlannerConfig(bypass_confidence=0))
    assert {d.primary for d in ds} == {"fusion"} and all(d.tools == ["fusion"] for d in ds)
    high = plan(
        planner, ans, feats[:n], ["high"] * n, np.full(n, 0.9), np.arange(n), PlannerConfig(consult_confidence=1.1)
    )
    assert all(d.tier == "high" and "fusion" not in d.tools for d in high)  # hints: the tools' own answers

    again = TaskPlanner.from_state(planner.state(), cfg)
    assert again.uses_fusion
    assert np.array_equal(again.fuse(ans, np.full(n, 0.5), np.full(n, 3), [np.array([], np.int64)] * n, POP, 10), fused)


def test_fusion_is_not_used_where_one_tool_is_always_right():
    """Tool a ranks the truth first every time: fusing cannot beat it, the guard keeps the fixed tool."""
    items, scores, truth = _agreement_world(1000, seed=3)
    items["a"][:, 0] = truth
    feats, usable, fusion = _fit_inputs(items, scores, truth)
    planner = TaskPlanner.fit("sequential", NAMES, feats, usable, PlannerConfig(confidence_rounds=20), fusion=fusion)
    assert planner.guard["use"] == "fixed" and planner.guard["fixed_tool"] == "a" and not planner.uses_fusion
    assert planner.guard["fusion_gain"] <= 0.0 and planner.guard["fixed_right"] == 1.0
    off = TaskPlanner.fit(
        "sequential", NAMES, feats, usable, PlannerConfig(confidence_rounds=5, fusion=False), fusion=fusion
    )
    assert off.fusion is None and "fusion_right" not in off.guard


def test_rank_appends_the_fallback_after_the_union():
    items, scores, truth = _agreement_world(200, seed=4)
    feats, usable, (xs, ys) = _fit_inputs(items, scores, truth)
    r = FusionRanker.fit(NAMES, 3, xs, ys, 10, 0)
    cand, valid, x = candidate_features(
        items, scores, NAMES, 3, POP, np.full(200, 0.5), np.full(200, 3), [np.array([], np.int64)] * 200
    )
    out = r.rank(cand, valid, x, items["a"], 10)
    for q in range(200):
        union = set(cand[q][valid[q]].tolist())
        head = out[q, : len(union)].tolist()
        assert set(head) == union  # the union first, in the ranker's order
        assert out[q, len(union) :].tolist() == [i for i in items["a"][q].tolist() if i not in union][: 10 - len(union)]


def test_ctr_fixed_ranking_and_guard_judge_by_auc():
    """Tool 'a' always says 0.1 or 0.2 (below 0.5: "right" on every negative of a 1:4 split, so
    the best hit rate) but ranks nothing; 'b' ranks well with probabilities around 0.6. By hits a
    would be the fixed tool; by AUC (the CTR metric) b is."""
    rng = np.random.default_rng(5)
    n = 1000
    labels = rng.random(n) < 0.2
    pa_ = rng.choice([0.1, 0.2], n)
    pb = np.clip(0.55 + 0.3 * labels + rng.normal(0, 0.1, n), 0, 1)
    usable = {"a": (pa_ >= 0.5) == labels, "b": (pb >= 0.5) == labels}
    assert usable["a"].mean() > usable["b"].mean()
    feats = rng.random((n, len(FEATURES) + 2)).astype(np.float32)
    planner = TaskPlanner.fit(
        "ctr", NAMES, feats, usable, PlannerConfig(confidence_rounds=20), ctr=(np.stack([pa_, pb], 1), labels)
    )
    assert NAMES[planner.fixed_ranking()[0]] == "b" and planner.rank_score["b"] > 0.9 > 0.6 > planner.rank_score["a"]
    g = planner.guard
    assert g["metric"] == "AUC" and g["fixed_tool"] == "b" and abs(g["fixed_right"] - planner.rank_score["b"]) < 0.05
    if g["use"] == "learned":  # only where mixing the tools' probabilities ranks better than b by > z SE
        assert g["gain"] > g["z"] * g["se"]
    else:
        assert g["use"] == "fixed"
    again = TaskPlanner.from_state(planner.state(), PlannerConfig())
    assert again.rank_score == planner.rank_score and NAMES[again.fixed_ranking()[0]] == "b"


def test_feature_rows_table_has_one_schema_for_every_task():
    from reasonrec.planner import FEATURE_ROWS

    # An empty batch and a full one concatenate (actors' outputs are joined on the driver).
    empty = pa.Table.from_pylist([], schema=FEATURE_ROWS)
    assert pa.concat_tables([empty, empty]).schema == FEATURE_ROWS
