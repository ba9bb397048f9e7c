"""Planner rules (Ray-free): tiers, the cap of 3 tools, tool-choice strategies, calibration,
persistence."""

from __future__ import annotations

import numpy as np
import pytest

from reasonrec.config import ConfigError, PlannerConfig, load_config
from reasonrec.metrics import auc
from reasonrec.planner import (
    FEATURES,
    TaskPlanner,
    ToolAnswers,
    assign_tier,
    explanation_decision,
    plan,
    query_features,
)

NAMES = ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize(
    "bucket,conf,tier",
    [
        ("low", 0.5, "low"),  # exactly at the bypass threshold: bypass
        ("low", 0.4999, "medium"),  # just below it, low EH: VLM alone
        ("medium", 0.99, "medium"),  # confident but not a low-EH user (paper rule)
        ("high", 0.2999, "high"),  # cold and unsure: VLM consults tools
        ("high", 0.3, "medium"),  # exactly at the consult threshold: not high risk
        ("high", 0.9, "medium"),  # cold but confident
        ("low", 0.1, "medium"),  # dense user, unsure: low EH is never high risk by default
    ],
)
def test_tier_edges_follow_the_paper_rule(bucket, conf, tier):
    assert assign_tier(bucket, conf, PlannerConfig()) == tier


def test_tier_buckets_and_modes_come_from_config():
    cfg = PlannerConfig(
        bypass_buckets=["low", "medium"],
        consult_buckets=["medium", "high"],
        bypass_confidence=0.7,
        consult_confidence=0.2,
    )
    assert assign_tier("medium", 0.7, cfg) == "low"
    assert assign_tier("medium", 0.1, cfg) == "high"
    assert assign_tier("high", 0.99, cfg) == "medium"
    assert [assign_tier("low", 0.99, cfg, m) for m in ("tools", "vlm", "vlm_tools")] == ["low", "medium", "high"]


@pytest.mark.parametrize(
    "aware,bucket,conf,p_vlm,margin,tier",
    [
        (True, "high", 0.40, 0.40, 0.0, "low"),  # tool exactly as likely right as the VLM: bypass
        (True, "high", 0.3999, 0.40, 0.0, "medium"),  # just below: the VLM answers (not < consult 0.3)
        (True, "high", 0.25, 0.40, 0.0, "high"),  # unsure and the VLM is better: VLM consults tools
        (True, "medium", 0.45, 0.40, 0.1, "medium"),  # the margin asks for a clear lead
        (True, "medium", 0.50, 0.40, 0.1, "low"),
        (True, "high", 0.90, None, 0.0, "medium"),  # no VLM estimate for the bucket: the paper rule
        (False, "high", 0.90, 0.10, 0.0, "medium"),  # switched off: the paper rule
    ],
)
def test_vlm_aware_bypass_when_the_tool_is_likelier_right(aware, bucket, conf, p_vlm, margin, tier):
    assert assign_tier(bucket, conf, PlannerConfig(vlm_aware=aware, vlm_margin=margin), vlm_right=p_vlm) == tier


def test_vlm_right_is_smoothed_per_bucket_saved_and_used_by_plan():
    x, usable = _world()
    cfg = PlannerConfig(confidence_rounds=20, vlm_aware=True)
    planner = TaskPlanner.fit("sequential", NAMES, x, usable, cfg)
    rep = planner.set_vlm_right(["low", "low", "high", "high", "high", "high"], [True, True, False, False, False, True])
    assert planner.vlm_right == {"low": 3 / 4, "medium": 1 / 2, "high": 2 / 6}  # (hits + 1) / (n + 2)
    assert rep["high"] == {"n": 4, "right": 1, "p_vlm_right": 2 / 6}
    again = TaskPlanner.from_state(planner.state(), cfg)
    assert again.vlm_right == planner.vlm_right
    # plan(): a high-EH query whose tool confidence beats the VLM's 1/3 is answered by the tool.
    xt = x[:40]
    conf = again.confidence(xt, again.choose(xt))
    ans = ToolAnswers(
        "sequential",
        NAMES,
        items={n: np.zeros((40, 10), np.int64) for n in NAMES},
        margin={n: np.zeros(40) for n in NAMES},
    )
    ds = plan(again, ans, xt, ["high"] * 40, np.full(40, 0.9), np.arange(40), cfg)
    for d, c in zip(ds, conf):
        assert d.tier == ("low" if c >= 2 / 6 else ("high" if c < cfg.consult_confidence else "medium"))
        if d.tier == "low":
            assert "P(VLM right)=0.33" in d.rationale
    assert {d.tier for d in ds} >= {"low"}


def test_ctr_vlm_aware_bar_compares_auc_not_hits():
    """A VLM that always says "no click" is on the right side of 0.5 for most 1:4 CTR queries but
    ranks nothing (AUC 0.5): the tool keeps a bucket's CTR queries whenever its validation AUC is
    at least the VLM's; where the VLM ranks better there is no bar (paper rule); a bucket with
    too few of either label is judged on all buckets pooled."""
    x, usable = _world()
    cfg = PlannerConfig(confidence_rounds=20, vlm_aware=True)
    planner = TaskPlanner.fit("ctr", NAMES, x, usable, cfg)
    rng = np.random.default_rng(0)
    n = 300
    buckets = np.array(["low", "high", "medium"])[np.arange(n) % 3]
    labels = rng.random(n) < 0.2
    labels[buckets == "medium"] = False
    labels[np.flatnonzero(buckets == "medium")[:3]] = True  # 3 positives (< MIN_AUC_CLASS): pooled
    tool = np.clip(labels * 0.3 + rng.random(n) * 0.7, 0, 1)  # informative
    vlm = np.where(buckets == "high", np.clip(labels * 0.9 + rng.random(n) * 0.1, 0, 1), 0.2)  # better on high only
    vlm = [None if i == 0 else float(v) for i, v in enumerate(vlm)]  # a missing answer counts 0.5
    rep = planner.set_vlm_auc(buckets.tolist(), labels.tolist(), vlm, tool.tolist())
    assert planner.vlm_right == {"low": 0.0, "medium": 0.0}  # "high": VLM better, no bar
    assert rep["high"]["auc_vlm"] > rep["high"]["auc_tool"] and rep["high"]["bypass_bar"] is None
    assert rep["low"]["auc_vlm"] == pytest.approx(0.5, abs=0.02) and rep["medium"]["pooled"]
    assert not rep["low"]["pooled"] and not rep["high"]["pooled"]
    assert rep["medium"]["auc_tool"] == pytest.approx(auc(labels, tool))  # the pooled AUC, not its own
    again = TaskPlanner.from_state(planner.state(), cfg)
    assert again.vlm_right == planner.vlm_right and again.vlm_auc == planner.vlm_auc
    xt = x[:30]
    ans = ToolAnswers(
        "ctr", NAMES, prob={nm: np.full(30, 0.1) for nm in NAMES}, margin={nm: np.zeros(30) for nm in NAMES}
    )
    qb = ["low", "medium", "high"] * 10
    ds = plan(again, ans, xt, qb, np.full(30, 0.5), np.arange(30), PlannerConfig(vlm_aware=True, bypass_buckets=[]))
    for d, b in zip(ds, qb):
        if b == "high":
            assert d.tier != "low"
        else:
            assert d.tier == "low" and "validation AUC of the tool" in d.rationale


def test_more_than_three_tools_is_a_config_error():
    with pytest.raises(ConfigError, match="planner.max_tools"):
        load_config(None, ["planner.max_tools=4"])


def _world(n=600, seed=0, p_right=None):
    """Features where tool 'a' can be right only when x0 > 0.5 and 'b' only when x0 <= 0.5, each
    with probability ``p_right(x)`` (default 1); c/d/e are noise."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, len(FEATURES) + len(NAMES))).astype(np.float32)
    lucky = rng.random(n) < (p_right(x) if p_right else 1.0)
    usable = {"a": (x[:, 0] > 0.5) & lucky, "b": (x[:, 0] <= 0.5) & lucky}
    for name in ("c", "d", "e"):
        usable[name] = rng.random(n) < 0.1
    return x, usable


def test_the_per_tool_models_fitted_on_threads_equal_one_at_a_time_fits():
    """TaskPlanner.fit fits the tools' usable models on a thread pool; each must be the model a
    lone fit on the same rows gives (same trees: its predictions bit for bit), tool by tool."""
    from reasonrec.planner import _fit_binary, _predict

    x, usable = _world()
    cfg = PlannerConfig(confidence_rounds=30)
    planner = TaskPlanner.fit("sequential", NAMES, x, usable, cfg)
    a = np.arange(len(x)) % 2 == 0  # the fit's cross-fitting half for the usable models
    for name in NAMES:
        alone = _fit_binary(x[a], usable[name][a], cfg.confidence_rounds, cfg.seed)
        got = planner.usable_models[name]
        assert got is not alone
        np.testing.assert_array_equal(_predict(got, x), _predict(alone, x))
    # and the tools differ from each other (the pool did not hand one model to every tool)
    assert not np.array_equal(_predict(planner.usable_models["a"], x), _predict(planner.usable_models["b"], x))


def test_learned_choice_picks_the_right_tool_and_caps_at_three():
    x, usable = _world()
    planner = TaskPlanner.fit("sequential", NAMES, x, usable, PlannerConfig(confidence_rounds=40))
    xt, ut = _world(seed=1)
    choice = planner.choose(xt)
    assert choice.shape == (len(xt), 3)  # the cap
    assert all(len(set(row)) == 3 for row in choice.tolist())  # no tool twice
    primary = np.array(NAMES)[choice[:, 0]]
    right = np.where(xt[:, 0] > 0.5, primary == "a", primary == "b")
    assert right.mean() > 0.9


def test_confidence_inputs_take_only_the_primary_tools_usable_model():
    """The confidence model's input is P(usable) of each row's primary tool: computed per distinct
    primary (one model call each), it equals the column of every tool's P(usable)."""
    x, usable = _world()
    planner = TaskPlanner.fit("sequential", NAMES, x, usable, PlannerConfig(confidence_rounds=40))
    xt, _ = _world(seed=2)
    rng = np.random.default_rng(0)
    for choice in (planner.choose(xt), rng.integers(0, len(NAMES), (len(xt), 3)), np.zeros((len(xt), 3), int)):
        rows = np.arange(len(xt))
        want = planner.usable_prob(xt)[rows, choice[:, 0]]
        assert np.array_equal(planner._usable_of(xt, choice[:, 0]), want)
        assert np.array_equal(planner._confidence_inputs(xt, choice)[:, -1], want.astype(np.float32))


def test_guard_keeps_a_learned_choice_that_beats_every_fixed_tool():
    """Tool 'a' is right for one half of the users (x0 > 0.5, e.g. warm), 'b' for the other (cold):
    the learned choice passes the guard and beats always-a and always-b on new queries."""
    x, usable = _world(n=1000)
    planner = TaskPlanner.fit("sequential", NAMES, x, usable, PlannerConfig(confidence_rounds=40))
    g = planner.guard
    assert g["use"] == "learned" and g["n"] == 500 and g["gain"] > g["z"] * g["se"] > 0
    xt, ut = _world(n=1000, seed=7)
    u = np.stack([ut[n] for n in NAMES], 1)
    learned = u[np.arange(len(xt)), planner.choose(xt)[:, 0]].mean()
    assert learned > 0.9 > 0.6 > max(ut["a"].mean(), ut["b"].mean())
    again = TaskPlanner.from_state(planner.state(), PlannerConfig(confidence_rounds=40))
    assert again.guard == g and np.array_equal(again.choose(xt), planner.choose(xt))


def test_guard_falls_back_to_the_tool_that_is_best_everywhere():
    """One tool is the likeliest right for every query whatever the features say: the learned choice
    cannot beat it, so the guard hands every query to it (the fixed choice), in plan() too."""
    rng = np.random.default_rng(11)
    n = 1000
    x = rng.random((n, len(FEATURES) + len(NAMES))).astype(np.float32)
    usable = {
        "a": rng.random(n) < 0.3,
        "b": rng.random(n) < 0.6,
        "c": rng.random(n) < 0.2,
        "d": rng.random(n) < 0.1,
        "e": rng.random(n) < 0.1,
    }
    cfg = PlannerConfig(confidence_rounds=40)
    planner = TaskPlanner.fit("sequential", NAMES, x, usable, cfg)
    g = planner.guard
    assert g["use"] == "fixed" and g["fixed_tool"] == "b" and "held-out validation queries" in g["why"]
    xt = rng.random((300, len(FEATURES) + len(NAMES))).astype(np.float32)
    choice = planner.choose(xt)
    assert (choice == choice[0]).all() and NAMES[choice[0, 0]] == "b"
    assert np.array_equal(choice, planner.choose(xt, how="fixed"))
    ans = ToolAnswers(
        "sequential",
        NAMES,
        items={m: np.tile(np.arange(10), (300, 1)) + i for i, m in enumerate(NAMES)},
        scores={m: -np.arange(10.0)[None].repeat(300, 0) for m in NAMES},
        margin={m: np.zeros(300) for m in NAMES},
    )
    ds = plan(planner, ans, xt, ["low"] * 300, np.full(300, 0.1), np.arange(300), PlannerConfig(bypass_confidence=0.0))
    assert {d.primary for d in ds} == {"b"} and all(d.tools == ["b"] for d in ds)
    # guard_z=-1: no guard.
    free = TaskPlanner.fit("sequential", NAMES, x, usable, PlannerConfig(confidence_rounds=40, guard_z=-1))
    assert free.guard is None


def test_guard_needs_held_out_queries():
    x, usable = _world(n=30)  # too few to split: nothing is held out to test the learned choice
    planner = TaskPlanner.fit("sequential", NAMES, x, usable, PlannerConfig(confidence_rounds=5))
    assert planner.guard["use"] == "fixed" and "no held-out" in planner.guard["why"]


def test_oracle_random_and_fixed_baselines():
    x, usable = _world()
    cfg = PlannerConfig(confidence_rounds=10)
    planner = TaskPlanner.fit("sequential", NAMES, x, usable, cfg)
    oracle = planner.choose(x, truth_usable=usable, how="oracle")
    prim = np.array(NAMES)[oracle[:, 0]]
    assert np.all(np.where(x[:, 0] > 0.5, prim == "a", prim == "b"))  # a usable tool always first
    with pytest.raises(ValueError, match="truth"):
        planner.choose(x, how="oracle")
    keys = np.arange(len(x))
    r1, r2 = planner.choose(x, keys=keys, how="random"), planner.choose(x, keys=keys, how="random")
    assert np.array_equal(r1, r2)  # seeded: reproducible
    assert len({tuple(r) for r in r1.tolist()}) > 10  # but varies across queries
    fixed = planner.choose(x, how="fixed")
    assert (fixed == fixed[0]).all() and set(np.array(NAMES)[fixed[0, :2]]) == {"a", "b"}


def test_fixed_choice_follows_a_given_order_and_its_confidence_learns_on_it():
    x, usable = _world()
    cfg = PlannerConfig(confidence_rounds=20, tool_choice="fixed")
    by_rate = TaskPlanner.fit("sequential", NAMES, x, usable, cfg)
    assert set(np.array(NAMES)[by_rate.choose(x)[0, :2]]) == {"a", "b"}
    # The VLM trained on hints ordered c, a (a tool it never saw, "zz", is skipped); the rest
    # follow by validation usable rate (b ~0.5 before d, e ~0.1).
    planner = TaskPlanner.fit("sequential", NAMES, x, usable, cfg, fixed_order=["c", "zz", "a"])
    choice = planner.choose(x)
    assert (choice == choice[0]).all() and list(np.array(NAMES)[choice[0]]) == ["c", "a", "b"]
    # The confidence is P(primary right) for c (usable ~10%), not for the by-rate primary (~50%).
    assert planner.confidence(x, choice).mean() < 0.25 < by_rate.confidence(x, by_rate.choose(x)).mean()
    again = TaskPlanner.from_state(planner.state(), cfg)
    assert again.fixed_order == ["c", "zz", "a"] and np.array_equal(again.choose(x), choice)


def test_confidence_is_calibrated_on_held_out_queries():
    def p_right(x):  # how likely the right tool is right depends on a cheap feature (x1)
        return 0.2 + 0.7 * x[:, 1]

    x, usable = _world(n=3000, p_right=p_right)
    planner = TaskPlanner.fit("sequential", NAMES, x, usable, PlannerConfig(confidence_rounds=60))
    xt, ut = _world(n=3000, seed=3, p_right=p_right)
    choice = planner.choose(xt)
    conf = planner.confidence(xt, choice)
    right = np.stack([ut[n] for n in NAMES], 1)[np.arange(len(xt)), choice[:, 0]]
    assert abs(conf.mean() - right.mean()) < 0.05
    assert np.corrcoef(conf, p_right(xt))[0, 1] > 0.8  # per query, not a constant
    from reasonrec.metrics import expected_calibration_error

    assert expected_calibration_error(conf, right) < 0.06


def test_state_round_trip_gives_identical_decisions():
    x, usable = _world()
    cfg = PlannerConfig(confidence_rounds=20)
    planner = TaskPlanner.fit("direct", NAMES, x, usable, cfg)
    again = TaskPlanner.from_state(planner.state(), cfg)
    c1, c2 = planner.choose(x), again.choose(x)
    assert np.array_equal(c1, c2)
    assert np.allclose(planner.confidence(x, c1), again.confidence(x, c2))


def _answers(b=4):
    items = {n: np.tile(np.arange(10), (b, 1)) + i for i, n in enumerate(NAMES)}
    return ToolAnswers(
        "sequential",
        NAMES,
        items=items,
        scores={n: -np.arange(10.0)[None].repeat(b, 0) for n in NAMES},
        margin={n: np.full(b, 0.1 * i) for i, n in enumerate(NAMES)},
    )


def test_plan_records_tier_tools_and_rationale():
    x, usable = _world()
    cfg = PlannerConfig(
        confidence_rounds=10,
        bypass_confidence=0.0,
        bypass_buckets=["low"],
        consult_buckets=["high"],
        consult_confidence=1.01,
    )
    planner = TaskPlanner.fit("sequential", NAMES, x, usable, cfg)
    ans = _answers()
    feats = query_features(ans, np.array([0.1, 0.5, 0.9, 0.9]), np.array([20, 5, 1, 1]), np.ones(20))
    assert feats.shape == (4, len(FEATURES) + len(NAMES))
    ds = plan(
        planner,
        ans,
        feats,
        ["low", "medium", "high", "high"],
        np.array([0.1, 0.5, 0.9, 0.9]),
        np.arange(4),
        cfg,
        cold=[False, False, False, True],
    )
    assert [d.tier for d in ds] == ["low", "medium", "high", "high"]
    assert len(ds[0].tools) == 1 and ds[1].tools == [] and len(ds[2].tools) == 3  # low: primary only
    assert "VLM bypassed" in ds[0].rationale and "consults" in ds[2].rationale
    assert ds[3].rationale.startswith("unknown user treated as cold")
    e = explanation_decision("high", 0.9)
    assert e.tier == "medium" and e.tools == []


def test_correct_means_truth_in_top_k_or_right_side_of_half():
    ans = _answers(2)
    assert ans.correct("a", np.array([4, 7]), 5).tolist() == [True, False]
    ctr = ToolAnswers("ctr", ["x"], prob={"x": np.array([0.7, 0.2, 0.5])})
    assert ctr.correct("x", np.array([1, 1, 0]), 5).tolist() == [True, False, False]


def test_hint_shows_distinct_texts_in_rank_order():
    """Items that share a title are one answer to the VLM: a hint lists each text once, in the
    tool's order, and fills its five slots from further down the ranking."""
    text = ["A", "A", "B", "C", "B", "D", "E", "F"]
    ans = ToolAnswers("sequential", ["t"], items={"t": np.array([[0, 1, 2, 4, 3, 5, 6, 7]])})
    assert ans.hint("t", 0, text).items == ["A", "B", "C", "D", "E"]


def test_gbdt_predict_equals_xgboost_dmatrix_predict():
    """reasonrec.gbdt.predict (in place, no DMatrix) gives xgboost's own DMatrix predictions bit for
    bit: missing values, a booster trained with early stopping (the same trees used) and feature names."""
    import xgboost as xgb

    from reasonrec import gbdt

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5))
    x[rng.random(x.shape) < 0.1] = np.nan
    y = (np.nan_to_num(x[:, 0]) + rng.normal(size=600) > 0).astype(np.float32)
    names = [f"f{i}" for i in range(5)]
    params = {"objective": "binary:logistic", "max_depth": 3, "nthread": 1}
    train = xgb.DMatrix(x[:400], y[:400], feature_names=names)
    valid = xgb.DMatrix(x[400:], y[400:], feature_names=names)
    booster = xgb.train(params, train, 300, evals=[(valid, "v")], early_stopping_rounds=3, verbose_eval=False)
    assert booster.best_iteration + 1 < booster.num_boosted_rounds()  # stopped early
    want = booster.predict(xgb.DMatrix(x, feature_names=names)).astype(np.float64)
    got = gbdt.predict(booster, x)
    assert got.dtype == np.float64 and np.array_equal(got, want)
