"""Risk-aware planner (paper sections 3.3, 4.3, Appendix B): one implementation shared by the
batch-scoring job and the Serve app.

Per query, before any VLM runs:

1. every tool of the task answers (cheap): :class:`ToolBox` -> :class:`ToolAnswers`;
2. cheap features from those answers (:func:`query_features`): EH, history length, agreement
   between the tools' top answers, score margins, popularity of the agreed item;
3. tool choice (at most 3): ``learned`` = xgboost P(tool usable | features) per tool, trained on
   the "usable" labels of validation queries; or the paper's baselines ``random``, ``oracle``
   (the tools that ARE right: needs the truth, evaluation only) and ``fixed`` (the tools with the
   best validation usable rate; CTR: AUC). The first chosen tool is the primary. The learned
   choice is guarded (:meth:`TaskPlanner._guard`); for ranking tasks the guard also weighs the
   fused ranking of the tools' answers (:mod:`reasonrec.fusion`), which then is the primary;
4. confidence = calibrated P(the primary tool's answer is right) from an xgboost model on the same
   features plus the primary's own margin, trained on validation queries;
5. tier (:func:`assign_tier`): low risk -> the primary tool answers, the VLM is never called;
   medium -> the VLM alone; high risk -> the VLM with the chosen tools' answers in its prompt.

Every decision is recorded (:class:`Decision`): tier, confidence, tools used, rationale.
Explanation queries have no tools (paper): always the VLM alone.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reasonrec import gbdt
from reasonrec.config import PlannerConfig
from reasonrec.fusion import FusionRanker, candidate_features
from reasonrec.hashing import splitmix64
from reasonrec.prompts.templates import ToolHint
from reasonrec.tools.base import Tool
from reasonrec.vocab import EH_BUCKETS, RISK_TIERS

RANKING = ("sequential", "direct")
TIERS = RISK_TIERS
N_HINT_ITEMS = 5
MIN_AUC_CLASS = 5  # positives and negatives a bucket needs for its own CTR AUC comparison


# ------------------------------------------------------------------------------ tools
@dataclass
class ToolAnswers:
    """All tools' answers for a batch of queries of one task. Ranking: ``items``/``scores``
    [B, k] per tool (direct: the whole candidate list, ordered); CTR: ``prob`` [B] per tool.
    ``margin`` [B] is each tool's cheap confidence signal (Tool.confidence)."""

    task: str
    names: list[str]
    items: dict[str, np.ndarray] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    prob: dict[str, np.ndarray] = field(default_factory=dict)
    margin: dict[str, np.ndarray] = field(default_factory=dict)

    def correct(self, name: str, truth: np.ndarray, k: int) -> np.ndarray:
        """Per query: is tool ``name`` right? Ranking: the truth in its top ``k``; CTR: the
        predicted side of 0.5 equals the label."""
        if self.task == "ctr":
            return (self.prob[name] >= 0.5) == (np.asarray(truth) > 0)
        return (self.items[name][:, :k] == np.asarray(truth)[:, None]).any(1)

    def hint(self, name: str, row: int, item_text: Sequence[str], n: int = N_HINT_ITEMS) -> ToolHint:
        if self.task == "ctr":
            return ToolHint(name, prob=float(self.prob[name][row]))
        # Distinct texts: items that share a title are one answer to the VLM, and repeating it would
        # crowd the tool's other suggestions out of the hint.
        texts = dict.fromkeys(item_text[int(i)] for i in self.items[name][row])
        return ToolHint(name, items=list(texts)[:n])


class ToolBox:
    """The loaded tool repository; answers a batch of queries of one task with every tool that
    can do it. The majority-vote ensemble is kept apart (a baseline, not a tool to choose)."""

    def __init__(self, tools: Mapping[str, Tool]):
        self.tools = dict(tools)

    def names(self, task: str) -> list[str]:
        want = "ctr" if task == "ctr" else task
        return sorted(n for n, t in self.tools.items() if n != "ensemble" and want in t.tasks)

    def answer(
        self,
        task: str,
        users: np.ndarray,
        histories: list[np.ndarray],
        k: int = 10,
        candidates: np.ndarray | None = None,
        items: np.ndarray | None = None,
        names: Sequence[str] | None = None,
    ) -> ToolAnswers:
        names = list(names) if names is not None else self.names(task)
        out = ToolAnswers(task, names)
        for n in names:
            tool = self.tools[n]
            if task == "ctr":
                p = np.asarray(tool.predict_ctr(users, items, histories), np.float64)
                out.prob[n], out.margin[n] = p, Tool.confidence(p)
            elif task == "direct":
                s = np.asarray(tool.score_candidates(users, histories, candidates), np.float64)
                order = np.argsort(-s, axis=1, kind="stable")
                out.items[n] = np.take_along_axis(np.asarray(candidates, np.int64), order, 1)
                out.scores[n] = np.take_along_axis(s, order, 1)
                out.margin[n] = Tool.confidence(s)
            else:  # sequential: full-catalog top-k (history not excluded: the evaluation protocol)
                # The tool's own dtype (float32 for most): a float64 copy of the [B, n_items] block
                # would cost more than the top-k; float32 -> float64 is exact, so the order is the same.
                s = np.asarray(tool.score_items(users, histories))
                kk = min(k, s.shape[1])
                top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
                order = np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable")
                out.items[n] = np.take_along_axis(top, order, 1).astype(np.int64)
                out.scores[n] = np.take_along_axis(s, out.items[n], 1).astype(np.float64)
                out.margin[n] = Tool.confidence(s)
        return out


def answer_rows(toolbox, task: str, rows: Sequence[Mapping[str, Any]], states: Sequence[Any], k: int) -> ToolAnswers:
    """``toolbox.answer`` (:class:`ToolBox` or Serve's remote one) for QUERIES rows of one task
    (direct: one candidate-list length) and their resolved users (``UserDirectory.resolve``): the
    one place that turns query rows into a tools call (router, planner fit, diagnosis)."""
    return toolbox.answer(
        task,
        np.array([s.user_id for s in states], np.int64),
        [s.history for s in states],
        k,
        candidates=np.array([r["candidates"] for r in rows], np.int64) if task == "direct" else None,
        items=np.array([r["item_id"] for r in rows], np.int64) if task == "ctr" else None,
    )


# --------------------------------------------------------------------------- features
FEATURES = ("eh", "log_hist", "agree_top1", "mean_margin", "max_margin", "log_pop_top1", "spread")


def query_features(answers: ToolAnswers, eh: np.ndarray, hist_len: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """[B, len(FEATURES) + n_tools]: the shared features, then each tool's margin (tool order =
    ``answers.names``). Ranking: agreement = share of tools whose top-1 is the most voted top-1;
    spread = number of distinct top-1 items / tools. CTR: agreement = 1 - 2 * std of the tools'
    probabilities; spread = mean probability."""
    B, names = len(eh), answers.names
    margins = np.stack([answers.margin[n] for n in names], 1) if names else np.zeros((B, 0))
    if answers.task == "ctr":
        probs = np.stack([answers.prob[n] for n in names], 1)
        agree = 1.0 - 2.0 * probs.std(1)
        pop = np.zeros(B)
        spread = probs.mean(1)
    else:
        top1 = np.stack([answers.items[n][:, 0] for n in names], 1)
        agree, pop, spread = np.zeros(B), np.zeros(B), np.zeros(B)
        for b in range(B):
            vals, counts = np.unique(top1[b], return_counts=True)
            agree[b] = counts.max() / len(names)
            pop[b] = np.log1p(popularity[vals[counts.argmax()]])
            spread[b] = len(vals) / len(names)
    base = np.stack(
        [
            np.asarray(eh, np.float64),
            np.log1p(np.asarray(hist_len, np.float64)),
            agree,
            margins.mean(1),
            margins.max(1),
            pop,
            spread,
        ],
        1,
    )
    # Rounded: a tool's scores for a batch of one and a batch of many can differ in the last
    # float bits, which must not flip an xgboost split (online and batch answers must match).
    return np.round(np.concatenate([base, margins], 1), 5).astype(np.float32)


# ------------------------------------------------------------------------------ model
def _fit_binary(x: np.ndarray, y: np.ndarray, rounds: int, seed: int) -> Any:
    import xgboost as xgb

    params = {
        "objective": "binary:logistic",
        "max_depth": 3,
        "eta": 0.1,
        "min_child_weight": 5,
        "subsample": 0.9,
        "seed": seed,
        "nthread": 1,
        "eval_metric": "logloss",
    }
    return xgb.train(params, xgb.DMatrix(x, label=y.astype(np.float32)), num_boost_round=rounds)


def _predict(booster: Any, x: np.ndarray) -> np.ndarray:
    return gbdt.predict(booster, x)


def _nan0(v: float) -> float:
    return 0.0 if np.isnan(v) else float(v)


def _hit_gain(v: np.ndarray, base: np.ndarray, labels: Any, seed: int) -> dict[str, Any]:
    """Paired comparison of per-query hits: mean difference and its standard error."""
    d = np.asarray(v, np.float64) - np.asarray(base, np.float64)
    n = len(d)
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else None
    return {
        "value": float(np.mean(v)) if n else 0.0,
        "base": float(np.mean(base)) if n else 0.0,
        "gain": float(d.mean()) if n else 0.0,
        "se": se,
    }


def _auc_gain(v: np.ndarray, base: np.ndarray, labels: np.ndarray, seed: int, reps: int = 200) -> dict[str, Any]:
    """AUC of scores ``v`` minus AUC of ``base`` on the same queries, SE by a paired bootstrap
    (AUC is not a mean over queries: no per-query difference to average)."""
    from reasonrec.metrics import auc

    y = np.asarray(labels, bool)
    value, ref = _nan0(auc(y, v)), _nan0(auc(y, base))
    n = len(y)
    if n < 2 or y.all() or not y.any():
        return {"value": value, "base": ref, "gain": value - ref, "se": None}
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(reps):
        i = rng.integers(0, n, n)
        a, b = auc(y[i], v[i]), auc(y[i], base[i])
        if not (np.isnan(a) or np.isnan(b)):
            diffs.append(a - b)
    se = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None
    return {"value": value, "base": ref, "gain": value - ref, "se": se}


@dataclass
class Decision:
    tier: str
    tools: list[str]  # tools used: the primary for low risk, up to max_tools for high, none for medium
    confidence: float  # calibrated P(primary tool right)
    rationale: str
    primary: str = ""  # the planner's first-choice tool, whatever the tier (its answer is
    # what the VLM agrees with or overrules: Table 7); "fusion" when the fused ranking answers


class TaskPlanner:
    """Fitted planner for one task: per-tool usable models, the confidence model, fixed ranking."""

    def __init__(
        self,
        task: str,
        names: list[str],
        cfg: PlannerConfig,
        usable_models: dict[str, Any],
        confidence_model: Any,
        usable_rate: dict[str, float],
        calibration: dict[str, Any],
        vlm_right: Mapping[str, float] | None = None,
        vlm_auc: Mapping[str, dict] | None = None,
        fixed_order: Sequence[str] | None = None,
        guard: Mapping[str, Any] | None = None,
        fusion: FusionRanker | None = None,
        rank_score: Mapping[str, float] | None = None,
    ):
        self.task, self.names, self.cfg = task, names, cfg
        self.usable_models, self.confidence_model = usable_models, confidence_model
        self.usable_rate, self.calibration = usable_rate, calibration
        # EH bucket -> the bar P(tool right) must reach for the VLM-aware bypass, measured on
        # validation queries: ranking, the VLM's hit rate; CTR, 0 where the tool ranks at least as
        # well (AUC) as the VLM, absent where the VLM is better (:meth:`set_vlm_auc`).
        self.vlm_right: dict[str, float] = dict(vlm_right or {})
        self.vlm_auc: dict[str, dict[str, float]] = dict(vlm_auc or {})  # CTR only: the evidence
        # The ``fixed`` choice's ranking when it must follow another one (the order the VLM's
        # training prompts showed the tools in); None: by validation usable rate.
        self.fixed_order: list[str] | None = list(fixed_order) if fixed_order is not None else None
        # The learned choice's guard (:meth:`fit`): whether it kept the learned choice or fell back to
        # the fixed one, and the held-out evidence. None: no guard (the learned choice stands).
        self.guard: dict[str, Any] | None = dict(guard) if guard is not None else None
        # Ranking tasks: the learned ranker over the union of the tools' top answers
        # (reasonrec/fusion.py); it answers only where the guard chose it (:attr:`uses_fusion`).
        self.fusion = fusion
        # CTR: each tool's validation AUC, which ranks the fixed choice (a hit -- the side of 0.5 --
        # rewards a tool that always says "no click"); None: the usable rate ranks it.
        self.rank_score: dict[str, float] | None = dict(rank_score) if rank_score is not None else None

    @property
    def uses_fusion(self) -> bool:
        return self.fusion is not None and self.guard is not None and self.guard["use"] == "fusion"

    def set_vlm_right(self, buckets: Sequence[str], right: Sequence[bool]) -> dict[str, dict[str, float]]:
        """Estimate P(VLM right) per EH bucket from validation answers, Laplace-smoothed
        ((hits + 1) / (n + 2): a bucket with few answers stays near 0.5, i.e. no strong claim
        either way). Returns the counts for the report."""
        b, r = np.asarray(buckets, object), np.asarray(right, bool)
        report = {}
        for bucket in EH_BUCKETS:
            sel = b == bucket
            n, hits = int(sel.sum()), int(r[sel].sum())
            self.vlm_right[bucket] = (hits + 1) / (n + 2)
            report[bucket] = {"n": n, "right": hits, "p_vlm_right": self.vlm_right[bucket]}
        return report

    def set_vlm_auc(
        self,
        buckets: Sequence[str],
        labels: Sequence[bool],
        vlm_prob: Sequence[float | None],
        tool_prob: Sequence[float],
    ) -> dict[str, dict[str, float]]:
        """CTR is judged by AUC, which no per-query hit measures: a VLM that always answers "no
        click" is on the right side of 0.5 for ~80% of 1:4 queries while ranking nothing. So per EH
        bucket the validation AUC of the VLM and of the primary tool are compared on the same
        queries; where the tool's is at least the VLM's, the bar is 0 (the tool keeps the bucket's
        CTR queries), else there is no bar (the paper rule decides). A bucket with fewer than
        ``MIN_AUC_CLASS`` queries of either label is judged by all buckets pooled (an AUC on 3
        positives flips with one query). A missing VLM probability counts as 0.5 (no
        information). Returns the AUCs for the report."""
        from reasonrec.metrics import auc

        b = np.asarray(buckets, object)
        y = np.asarray(labels, bool)
        v = np.array([0.5 if p is None else p for p in vlm_prob], np.float64)
        t = np.asarray(tool_prob, np.float64)
        pooled = {"vlm": auc(y, v), "tool": auc(y, t)}
        self.vlm_right, self.vlm_auc, report = {}, {}, {}
        for bucket in EH_BUCKETS:
            sel = b == bucket
            enough = min(int(y[sel].sum()), int((~y[sel]).sum())) >= MIN_AUC_CLASS
            got = {"vlm": auc(y[sel], v[sel]), "tool": auc(y[sel], t[sel])} if enough else pooled
            if not np.isnan(got["vlm"]):  # else no labelled evidence at all: the paper rule
                self.vlm_auc[bucket] = {**got, "pooled": got is pooled}
                if got["tool"] >= got["vlm"]:
                    self.vlm_right[bucket] = 0.0
            a = self.vlm_auc.get(bucket, {})
            report[bucket] = {
                "n": int(sel.sum()),
                "auc_vlm": a.get("vlm"),
                "auc_tool": a.get("tool"),
                "pooled": a.get("pooled"),
                "bypass_bar": self.vlm_right.get(bucket),
            }
        return report

    def vlm_basis(self, bucket: str) -> str:
        """Why the VLM-aware rule bypassed a query of this bucket (for its rationale)."""
        if bucket in self.vlm_auc:
            a = self.vlm_auc[bucket]
            where = "all buckets" if a.get("pooled") else f"{bucket} EH"
            return f"; validation AUC of the tool {a['tool']:.2f} >= the VLM's {a['vlm']:.2f} ({where})"
        return f" >= P(VLM right)={self.vlm_right[bucket]:.2f}"

    # ---------------------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        task: str,
        names: list[str],
        features: np.ndarray,
        usable: Mapping[str, np.ndarray],
        cfg: PlannerConfig,
        fixed_order: Sequence[str] | None = None,
        fusion: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None = None,
        ctr: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> TaskPlanner:
        """Fit on validation queries: ``usable[name]`` says whether each tool was right.
        ``fixed_order``: see the constructor (set before the confidence model learns on the
        choices). ``fusion`` (ranking): per query the candidate features and truth labels of the
        tools' union (:func:`feature_rows`); the ranker learns on one half, the guard tests it on
        the other. ``ctr``: the tools' probabilities [n, tools] and the labels [n]: the fixed
        ranking and the guard then judge by AUC, the CTR metric."""
        usable = {n: np.asarray(usable[n], bool) for n in names}
        rate = {n: float(u.mean()) if len(u) else 0.0 for n, u in usable.items()}
        # Cross-fitting: the tool-choice models learn on one half, the confidence model on the
        # other half's out-of-sample choices (in-sample choices look better than they are and
        # made the confidence over-confident: held-out ECE 0.09 vs about 0.03 cross-fitted).
        half = np.arange(len(features)) % 2 == 0
        if half.sum() < 20 or (~half).sum() < 20:
            half = np.ones(len(features), bool)
        a, b = half, (~half if (~half).any() else half)
        # A label with one class has no model: its constant rate is the prediction. One model per
        # tool, fitted on threads (xgboost releases the GIL; each model uses one thread and its
        # own seed, so the models do not depend on the thread count).
        xa = features[a]

        def fit_one(y: np.ndarray) -> Any:
            return _fit_binary(xa, y[a], cfg.confidence_rounds, cfg.seed) if 0 < y[a].sum() < a.sum() else None

        with ThreadPoolExecutor(max_workers=min(len(usable), os.cpu_count() or 1) or 1) as pool:
            models = dict(zip(usable, pool.map(fit_one, usable.values())))
        rank_score = None
        if ctr is not None:
            from reasonrec.metrics import auc

            probs, labels = np.asarray(ctr[0], np.float64), np.asarray(ctr[1], bool)
            rank_score = {n: _nan0(auc(labels, probs[:, i])) for i, n in enumerate(names)}
        ranker = None
        if fusion is not None and cfg.fusion and cfg.tool_choice == "learned" and cfg.guard_z >= 0:
            ia = np.flatnonzero(a)
            ranker = FusionRanker.fit(
                names,
                cfg.fusion_top_n,
                [fusion[0][i] for i in ia],
                [fusion[1][i] for i in ia],
                cfg.fusion_rounds,
                cfg.seed,
            )
        # The fixed choice ranks the tools by their usable rate (CTR: AUC) over every fitting query.
        planner = cls(
            task, names, cfg, models, None, rate, {}, fixed_order=fixed_order, fusion=ranker, rank_score=rank_score
        )
        sub = {n: u[b] for n, u in usable.items()}
        fused_b = None
        if ranker is not None:
            ib = np.flatnonzero(b)
            fused_b = ranker.hits([fusion[0][i] for i in ib], [fusion[1][i] for i in ib], cfg.correct_k)
        if cfg.tool_choice == "learned" and cfg.guard_z >= 0:
            ctr_b = None if ctr is None else (probs[b], labels[b])
            planner.guard = planner._guard(features[b], sub, not (a & b).any(), fused_b, ctr_b)
        choice = planner.choose(features[b], truth_usable=sub)
        conf_x = planner._confidence_inputs(features[b], choice)
        # The confidence is P(the answer given is right): the fused one's where fusion answers.
        y = fused_b if planner.uses_fusion else planner._primary_right(sub, choice)
        planner.confidence_model = (
            _fit_binary(conf_x, y, cfg.confidence_rounds, cfg.seed) if 0 < y.sum() < len(y) else None
        )
        planner.calibration = {
            "fit_rows": int(len(y)),
            "fit_positive_rate": float(y.mean()) if len(y) else 0.0,
            "usable_rate": rate,
            **({"auc": rank_score} if rank_score is not None else {}),
        }
        return planner

    def _guard(
        self,
        features: np.ndarray,
        usable: Mapping[str, np.ndarray],
        held_out: bool,
        fused: np.ndarray | None = None,
        ctr: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """Keep the learned choice (or the fused ranking, ``fused``: its hits on these queries) only
        where it beats the best fixed tool (the ``fixed`` choice's primary) on held-out validation
        queries by more than its noise: the mean paired difference of their hits > ``guard_z``
        standard errors (CTR, ``ctr`` = probabilities and labels: the AUC difference, its SE from a
        paired bootstrap). Of the two, the larger gain wins. Else (or with no held-out half to test
        on) the fixed choice answers: a choice learned from features that separate users but not
        tools must not lose to always asking the best tool."""
        rows = np.arange(len(features))
        u = np.stack([usable[n] for n in self.names], 1)
        learned_choice = self.choose(features, how="learned")[:, 0]
        fixed_first = int(self.fixed_ranking()[0])
        n = len(features)
        if ctr is not None:
            probs, labels = ctr
            cands = {"learned": probs[rows, learned_choice]}
            base = probs[:, fixed_first]
            metric = "AUC"
            compare = _auc_gain
        else:
            cands = {"learned": u[rows, learned_choice].astype(np.float64)}
            if fused is not None:
                cands["fusion"] = np.asarray(fused, np.float64)
            base = u[:, fixed_first].astype(np.float64)
            labels, metric = None, f"hit@{self.cfg.correct_k}"
            compare = _hit_gain
        evidence = {c: compare(v, base, labels, self.cfg.seed) for c, v in cands.items()}
        testable = held_out and n > 1
        passing = {
            c: e
            for c, e in evidence.items()
            if testable and e["se"] is not None and e["gain"] > self.cfg.guard_z * e["se"]
        }
        use = max(passing, key=lambda c: passing[c]["gain"]) if passing else "fixed"
        fixed_name = self.names[fixed_first]
        if not testable:
            why = "no held-out validation queries to test it on"
        else:
            parts = [
                f"{c} {e['value']:.4f} (gain {e['gain']:+.4f} {'>' if c in passing else '<='} "
                f"{self.cfg.guard_z:g} x SE {e['se'] if e['se'] is not None else float('nan'):.4f})"
                for c, e in evidence.items()
            ]
            why = f"{metric} on {n} held-out validation queries: {fixed_name} {evidence['learned']['base']:.4f}; " + (
                "; ".join(parts)
            )
        learned = evidence["learned"]
        out = {
            "use": use,
            "fixed_tool": fixed_name,
            "metric": metric,
            "n": n,
            "learned_right": learned["value"] if n else None,
            "fixed_right": learned["base"] if n else None,
            "gain": learned["gain"],
            "se": learned["se"],
            "z": self.cfg.guard_z,
            "why": why,
        }
        if "fusion" in evidence:
            f = evidence["fusion"]
            out.update({"fusion_right": f["value"] if n else None, "fusion_gain": f["gain"], "fusion_se": f["se"]})
        return out

    # --------------------------------------------------------------------------- inference
    def usable_prob(self, features: np.ndarray) -> np.ndarray:
        cols = [
            (_predict(m, features) if m is not None else np.full(len(features), self.usable_rate[n]))
            for n, m in zip(self.names, (self.usable_models.get(n) for n in self.names))
        ]
        return np.stack(cols, 1) if cols else np.zeros((len(features), 0))

    def choose(
        self,
        features: np.ndarray,
        truth_usable: Mapping[str, np.ndarray] | None = None,
        keys: np.ndarray | None = None,
        how: str | None = None,
    ) -> np.ndarray:
        """[B, m] tool indices (into ``names``), primary first, m = min(max_tools, n tools)."""
        how = how or self.cfg.tool_choice
        B, m = len(features), min(self.cfg.max_tools, len(self.names))
        if how == "learned" and self.guard is not None and self.guard["use"] in ("fixed", "fusion"):
            # The guard found the learned choice no better than the best fixed tool (or the fused
            # ranking answers: the fixed ranking then names the tools a hint shows).
            how = "fixed"
        if how == "learned":
            p = self.usable_prob(features)
            return np.argsort(-p, axis=1, kind="stable")[:, :m]
        if how == "fixed":
            return np.tile(self.fixed_ranking()[:m], (B, 1))
        if how == "random":
            keys = np.arange(B) if keys is None else np.asarray(keys)
            h = splitmix64(
                (
                    keys.astype(np.int64)[:, None] * 131 + np.arange(len(self.names))[None, :] + self.cfg.seed * 7919
                ).astype(np.uint64)
            )
            return np.argsort(h, axis=1, kind="stable")[:, :m].astype(np.int64)
        if how == "oracle":
            if truth_usable is None:
                raise ValueError("oracle tool choice needs the truth (evaluation only)")
            # Usable tools first, then by validation usable rate (ties keep tool order).
            u = np.stack([truth_usable[n] for n in self.names], 1).astype(np.float64)
            key = u * 10.0 + np.array([self.usable_rate[n] for n in self.names])[None, :]
            return np.argsort(-key, axis=1, kind="stable")[:, :m]
        raise ValueError(f"unknown tool choice '{how}'")

    def fixed_ranking(self) -> np.ndarray:
        """Tool indices of the ``fixed`` choice, best first: ``fixed_order``'s tools (those this
        planner has), then the others by validation usable rate (ties keep tool order)."""
        score = self.rank_score if self.rank_score is not None else self.usable_rate
        by_rate = np.argsort([-score[n] for n in self.names], kind="stable")
        if self.fixed_order is None:
            return by_rate
        index = {n: i for i, n in enumerate(self.names)}
        first = [index[n] for n in dict.fromkeys(self.fixed_order) if n in index]
        return np.array(first + [i for i in by_rate if i not in first], np.int64)

    def _usable_of(self, features: np.ndarray, tool: np.ndarray) -> np.ndarray:
        """P(usable) of tool ``tool[b]`` (index into ``names``) for each row b: ``usable_prob``'s
        column, computed only for the tools asked (one model call per distinct tool: a fixed choice
        asks one model, not every tool's)."""
        out = np.empty(len(features), np.float64)
        for i in np.unique(tool):
            rows = tool == i
            name = self.names[int(i)]
            model = self.usable_models.get(name)
            out[rows] = _predict(model, features[rows]) if model is not None else self.usable_rate[name]
        return out

    def _confidence_inputs(self, features: np.ndarray, choice: np.ndarray) -> np.ndarray:
        rows = np.arange(len(features))
        primary = choice[:, 0]
        margins = features[:, len(FEATURES) :]
        extra = np.stack([margins[rows, primary], self._usable_of(features, primary)], 1)
        return np.concatenate([features[:, : len(FEATURES)], extra], 1).astype(np.float32)

    def _primary_right(self, usable: Mapping[str, np.ndarray], choice: np.ndarray) -> np.ndarray:
        u = np.stack([usable[n] for n in self.names], 1)
        return u[np.arange(len(choice)), choice[:, 0]]

    def fuse(
        self,
        answers: ToolAnswers,
        eh: np.ndarray,
        hist_len: np.ndarray,
        histories: Sequence[np.ndarray],
        popularity: np.ndarray,
        k: int,
    ) -> np.ndarray:
        """[B, k] the fused ranking of the tools' answers (-1 pads); the fallback after the union
        is the fixed choice's tool."""
        assert self.fusion is not None
        f = self.fusion
        cand, valid, x = candidate_features(
            answers.items, answers.scores, f.names, f.top_n, popularity, eh, hist_len, histories
        )
        return f.rank(cand, valid, x, answers.items[self.names[int(self.fixed_ranking()[0])]], k)

    def confidence(self, features: np.ndarray, choice: np.ndarray) -> np.ndarray:
        if self.confidence_model is None:
            return np.full(len(features), self.calibration.get("fit_positive_rate", 0.0))
        return _predict(self.confidence_model, self._confidence_inputs(features, choice))

    # ----------------------------------------------------------------------- persistence
    def state(self) -> dict[str, Any]:
        def dump(m):
            return None if m is None else json.loads(m.save_raw("json").decode())

        return {
            "task": self.task,
            "names": self.names,
            "usable_rate": self.usable_rate,
            "calibration": self.calibration,
            "confidence_model": dump(self.confidence_model),
            "usable_models": {n: dump(m) for n, m in self.usable_models.items()},
            "vlm_right": self.vlm_right,
            "vlm_auc": self.vlm_auc,
            "fixed_order": self.fixed_order,
            "guard": self.guard,
            "fusion": None if self.fusion is None else self.fusion.state(),
            "rank_score": self.rank_score,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], cfg: PlannerConfig) -> TaskPlanner:
        import xgboost as xgb

        def load(d):
            if d is None:
                return None
            b = xgb.Booster()
            b.load_model(bytearray(json.dumps(d).encode()))
            b.set_param({"nthread": 1})
            return b

        return cls(
            state["task"],
            list(state["names"]),
            cfg,
            {n: load(d) for n, d in state["usable_models"].items()},
            load(state["confidence_model"]),
            dict(state["usable_rate"]),
            dict(state["calibration"]),
            state.get("vlm_right"),
            state.get("vlm_auc"),
            state.get("fixed_order"),
            state.get("guard"),
            FusionRanker.from_state(state.get("fusion")),
            state.get("rank_score"),
        )


# ------------------------------------------------------------------------------ tiers
def assign_tier(
    bucket: str, confidence: float, cfg: PlannerConfig, mode: str = "routed", vlm_right: float | None = None
) -> str:
    """The paper's rule, thresholds from config; ``mode`` forces the comparison baselines
    (tools only -> low, VLM alone -> medium, VLM + tools always -> high). With
    ``cfg.vlm_aware`` and this bucket's bar ``vlm_right`` (:attr:`TaskPlanner.vlm_right`: the
    VLM's estimated P(right) for ranking, 0 for CTR where the tool ranks at least as well), a
    query whose tool is at least that likely right (+ ``vlm_margin``) is low risk as well."""
    if mode != "routed":
        return {"tools": "low", "vlm": "medium", "vlm_tools": "high"}[mode]
    if bucket in cfg.bypass_buckets and confidence >= cfg.bypass_confidence:
        return "low"
    if cfg.vlm_aware and vlm_right is not None and confidence >= vlm_right + cfg.vlm_margin:
        return "low"
    if bucket in cfg.consult_buckets and confidence < cfg.consult_confidence:
        return "high"
    return "medium"


def rationale(
    tier: str,
    bucket: str,
    eh: float,
    confidence: float,
    tools: Sequence[str],
    cfg: PlannerConfig,
    cold_user: bool = False,
    mode: str = "routed",
    vlm_basis: str = "",
) -> str:
    who = "unknown user treated as cold; " if cold_user else ""
    head = f"{who}EH {bucket} ({eh:.2f}), P(tool right)={confidence:.2f}"
    if mode != "routed":
        return f"{head}; forced by mode '{mode}'"
    if tier == "low" and not (bucket in cfg.bypass_buckets and confidence >= cfg.bypass_confidence):
        return (
            f"{head}{vlm_basis}{f' (+ margin {cfg.vlm_margin:g})' if cfg.vlm_margin else ''}: "
            f"{tools[0]} answers, VLM bypassed"
        )
    if tier == "low":
        return f"{head} >= {cfg.bypass_confidence:g}: {tools[0]} answers, VLM bypassed"
    if tier == "high":
        return f"{head} < {cfg.consult_confidence:g}: VLM consults {'/'.join(tools)} and may overrule them"
    return f"{head}: VLM answers alone"


def plan(
    task_planner: TaskPlanner,
    answers: ToolAnswers,
    features: np.ndarray,
    buckets: Sequence[str],
    eh: np.ndarray,
    keys: np.ndarray,
    cfg: PlannerConfig,
    mode: str = "routed",
    cold: Sequence[bool] | None = None,
    truth: np.ndarray | None = None,
) -> list[Decision]:
    """Decisions for a batch of queries of one task (ranking or CTR)."""
    truth_usable = (
        {n: answers.correct(n, truth, cfg.correct_k) for n in answers.names}
        if cfg.tool_choice == "oracle" and truth is not None
        else None
    )
    choice = task_planner.choose(features, truth_usable=truth_usable, keys=keys)
    conf = task_planner.confidence(features, choice)
    cold = cold if cold is not None else [False] * len(features)
    # The fused ranking answers (as the primary) where the guard chose it; the router puts it in
    # ``answers.items["fusion"]`` (:meth:`TaskPlanner.fuse`). The oracle is an upper bound over tools.
    fused = task_planner.uses_fusion and cfg.tool_choice == "learned"
    if fused and "fusion" not in answers.items:
        raise ValueError("the planner answers with its fused ranking: put TaskPlanner.fuse's items in answers.items")
    out = []
    for b in range(len(features)):
        tools = [task_planner.names[i] for i in choice[b]]
        vlm_right = task_planner.vlm_right.get(buckets[b])
        tier = assign_tier(buckets[b], float(conf[b]), cfg, mode, vlm_right)
        # High risk shows the VLM the chosen tools' own answers (what its instructions showed).
        first = ["fusion"] if fused else tools[:1]
        used = first if tier == "low" else (tools if tier == "high" else [])
        out.append(
            Decision(
                tier,
                used,
                float(conf[b]),
                rationale(
                    tier,
                    buckets[b],
                    float(eh[b]),
                    float(conf[b]),
                    first + tools[1:] if tier == "low" else tools,
                    cfg,
                    bool(cold[b]),
                    mode,
                    task_planner.vlm_basis(buckets[b]) if tier == "low" and vlm_right is not None else "",
                ),
                primary=first[0],
            )
        )
    return out


def explanation_decision(bucket: str, eh: float, cold_user: bool = False) -> Decision:
    who = "unknown user treated as cold; " if cold_user else ""
    return Decision("medium", [], float("nan"), f"{who}EH {bucket} ({eh:.2f}): explanations are written by the VLM")


# ------------------------------------------------------------------------------ loading
def load_toolbox(store, names: Sequence[str] | None = None, holdout: bool = False) -> ToolBox:
    """Every tool the ``train_tools`` stage saved (members before the ensemble); ``holdout``: the
    copies trained without each user's last ``tools.holdout_items`` items (``tools/holdout/``)."""
    from reasonrec.tools.persist import load_tool

    store.require("train_tools")
    if names is None:
        names = store.read_json("train_tools", "metrics.json").get("holdout_tools" if holdout else "tools", [])
    parts = ("tools", "holdout") if holdout else ("tools",)
    tools: dict[str, Tool] = {}
    for n in sorted(names, key=lambda n: n == "ensemble"):
        tools[n] = load_tool(store.url("train_tools", *parts, n), store.storage, members=tools)
    return ToolBox(tools)


def load_planners(store, cfg: PlannerConfig) -> dict[str, TaskPlanner]:
    """The fitted per-task planners of a run (the ``planner`` stage)."""
    store.require(STAGE)
    state = store.read_json(STAGE, "planner.json")
    return {task: TaskPlanner.from_state(s, cfg) for task, s in state["tasks"].items()}


# ------------------------------------------------------------------------------ the planner stage's fit
STAGE = "planner"  # the stage holding the fitted planners (ray_jobs.fit_planner writes it)
# Bump when the VLM-aware criterion changes, so fitted planners are refitted (2: CTR by AUC; 3: small buckets pooled).
VLM_RULE_VERSION = 3


def fit_tasks(tasks: Sequence[str]) -> list[str]:
    """The tasks a planner is fitted for: all but explanation (no tools)."""
    return [t for t in tasks if t != "explanation"]


FEATURE_ROWS = pa.schema(
    [
        ("query_id", pa.int64()),
        ("task", pa.string()),
        ("names", pa.list_(pa.string())),
        ("features", pa.list_(pa.float32())),
        ("usable", pa.list_(pa.bool_())),
        # CTR: each tool's probability and the label (the fixed ranking and guard judge by AUC).
        ("probs", pa.list_(pa.float64())),
        ("label", pa.bool_()),
        # Ranking with fusion: the union's candidate features, flattened [U * F], and which candidate
        # is the truth [U]; empty where no tool proposed the truth (no pair to learn from).
        ("fusion_x", pa.list_(pa.float32())),
        ("fusion_y", pa.list_(pa.bool_())),
    ]
)


def feature_rows(
    rows: Sequence[Mapping[str, Any]],
    toolbox: ToolBox,
    users,
    catalog,
    k: int,
    correct_k: int,
    fusion_top_n: int = 0,
) -> pa.Table:
    """Validation query rows (QUERIES, with truth) -> a :data:`FEATURE_ROWS` table: per query the
    tools' names, the planner features, which tools are usable (right in their top ``correct_k``;
    CTR: the label's side), CTR's probabilities and label, and with ``fusion_top_n`` > 0 the
    fused ranking's training rows (ranking tasks)."""
    out = []
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], len(r["candidates"] or [])), []).append(r)
    for (task, _), sub in groups.items():
        st = [users.resolve(r["user_id"], None, "valid") for r in sub]
        hists = [s.history for s in st]
        ans = answer_rows(toolbox, task, sub, st, max(k, fusion_top_n))
        truth = np.array([r["label" if task == "ctr" else "target"] for r in sub])
        eh, hist_len = np.array([s.eh for s in st]), np.array([len(h) for h in hists])
        feats = query_features(ans, eh, hist_len, catalog.popularity)
        ok = np.stack([ans.correct(n, truth, correct_k) for n in ans.names], 1)
        fx, fy = [[] for _ in sub], [[] for _ in sub]
        if fusion_top_n > 0 and task != "ctr" and ans.names:
            cand, valid, x = candidate_features(
                ans.items, ans.scores, ans.names, fusion_top_n, catalog.popularity, eh, hist_len, hists
            )
            for j in range(len(sub)):
                y = cand[j][valid[j]] == truth[j]
                if y.any():
                    fx[j], fy[j] = x[j][valid[j]].ravel().tolist(), y.tolist()
        probs = np.stack([ans.prob[n] for n in ans.names], 1) if task == "ctr" else None
        for j, r in enumerate(sub):
            out.append(
                {
                    "query_id": r["query_id"],
                    "task": task,
                    "names": ans.names,
                    "features": feats[j].tolist(),
                    "usable": ok[j].tolist(),
                    "probs": probs[j].tolist() if probs is not None else [],
                    "label": bool(truth[j]) if task == "ctr" else None,
                    "fusion_x": fx[j],
                    "fusion_y": fy[j],
                }
            )
    return pa.Table.from_pylist(out, schema=FEATURE_ROWS)


def _fusion_data(t: pa.Table, names: Sequence[str]) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """Per row of a task's :data:`FEATURE_ROWS` the fused ranking's (x [U, F], y [U]); None
    when the table has no fusion rows."""
    from reasonrec.fusion import feature_names

    ys = t.column("fusion_y").to_pylist()
    if not any(ys):
        return None
    f = len(feature_names(names))
    xs = [np.asarray(v, np.float32).reshape(-1, f) for v in t.column("fusion_x").to_pylist()]
    return xs, [np.asarray(v, bool) for v in ys]


def fit_planners(
    feats: pa.Table, tasks: Sequence[str], cfg: PlannerConfig, trained_order: Mapping[str, Sequence[str]]
) -> tuple[dict, dict, dict, dict]:
    """Fit one :class:`TaskPlanner` per task on the :func:`feature_rows` table ``feats`` (sorted
    by query id), holding out a ``calibration_holdout`` share to report calibration on.
    Returns (state for planner.json, calibration report, fixed tool choice, guards) by task."""
    from reasonrec.metrics import expected_calibration_error

    state, report, fixed, guard = {"tasks": {}}, {}, {}, {}
    for task in tasks:
        t = feats.filter(pc.equal(feats.column("task"), task))
        if t.num_rows == 0:
            continue
        names = t.column("names")[0].as_py()
        x = np.array(t.column("features").to_pylist(), np.float32)
        u = np.array(t.column("usable").to_pylist(), bool)
        fusion = _fusion_data(t, names) if task != "ctr" else None
        ctr = None
        if task == "ctr":
            ctr = (np.array(t.column("probs").to_pylist(), np.float64), np.array(t.column("label").to_pylist(), bool))
        hold = np.random.default_rng(cfg.seed).random(len(x)) < cfg.calibration_holdout
        fit_rows = ~hold if (~hold).sum() >= 10 else np.ones(len(x), bool)
        fit_idx = np.flatnonzero(fit_rows)
        planner = TaskPlanner.fit(
            task,
            names,
            x[fit_rows],
            {n: u[fit_rows, i] for i, n in enumerate(names)},
            cfg,
            fixed_order=trained_order.get(task),
            fusion=None if fusion is None else ([fusion[0][i] for i in fit_idx], [fusion[1][i] for i in fit_idx]),
            ctr=None if ctr is None else (ctr[0][fit_rows], ctr[1][fit_rows]),
        )
        if hold.any():
            choice = planner.choose(
                x[hold],
                truth_usable={n: u[hold, i] for i, n in enumerate(names)},
                keys=t.column("query_id").to_numpy()[hold],
            )
            conf = planner.confidence(x[hold], choice)
            if planner.uses_fusion:
                ih = np.flatnonzero(hold)
                right = planner.fusion.hits([fusion[0][i] for i in ih], [fusion[1][i] for i in ih], cfg.correct_k)
            else:
                right = u[hold][np.arange(hold.sum()), choice[:, 0]]
            report[task] = {
                "holdout_rows": int(hold.sum()),
                "ece": expected_calibration_error(conf, right),
                "brier": float(np.mean((conf - right) ** 2)),
                "mean_confidence": float(conf.mean()),
                "primary_right_rate": float(right.mean()),
            }
        state["tasks"][task] = planner.state()
        fixed[task] = [names[i] for i in planner.fixed_ranking()[: cfg.max_tools]]
        if planner.guard is not None:
            guard[task] = planner.guard
    return state, report, fixed, guard


def vlm_fit_sample(queries: pa.Table, tasks: Sequence[str], n: int) -> pa.Table:
    """The first ``n`` queries of each task: the ones the VLM answers for the VLM-aware bypass."""
    return pa.concat_tables([queries.filter(pc.equal(queries.column("task"), t)).slice(0, n) for t in tasks])


def vlm_right_rows(batch: pa.Table, routed: pa.Table, scored: Sequence[Mapping[str, Any]], correct_k: int) -> pa.Table:
    """One row per validation query the VLM answered (``routed`` under ``vlm_tools``, ``scored``
    its answers): ranking -- was the truth in the VLM's top ``correct_k``? CTR: the VLM's and the
    primary tool's probabilities with the label (compared by AUC per bucket, :meth:`TaskPlanner.set_vlm_auc`)."""
    right = [
        q["task"] != "ctr" and q["target"] in (a["items"] or [])[:correct_k] for q, a in zip(batch.to_pylist(), scored)
    ]
    return pa.table(
        {
            "task": batch.column("task"),
            "bucket": routed.column("eh_bucket"),
            "right": right,
            "label": batch.column("label"),
            "vlm_prob": [a["prob"] for a in scored],
            "tool_prob": routed.column("tool_prob"),
        }
    )


def set_vlm_right(state: dict, got: pa.Table, cfg: PlannerConfig) -> dict[str, Any]:
    """Put the VLM's validation record (:func:`vlm_right_rows` of every task) into each task's
    planner state (``vlm_right``: hit rate per EH bucket; CTR: its AUC against the tool's).
    Updates ``state`` in place; returns the report by task."""
    report = {}
    for task in state["tasks"]:
        t = got.filter(pc.equal(got.column("task"), task))
        planner = TaskPlanner.from_state(state["tasks"][task], cfg)
        buckets = t.column("bucket").to_pylist()
        report[task] = (
            planner.set_vlm_auc(
                buckets,
                t.column("label").to_pylist(),
                t.column("vlm_prob").to_pylist(),
                t.column("tool_prob").to_pylist(),
            )
            if task == "ctr"
            else planner.set_vlm_right(buckets, t.column("right").to_pylist())
        )
        state["tasks"][task] = planner.state()
    return report
