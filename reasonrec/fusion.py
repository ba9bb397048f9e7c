"""Learning to rank the union of the tools' answers (the planner's ``fusion`` answer).

Picking one tool per query leaves most of the room unused: on the whole Beauty test set the truth
is in *some* tool's top 5 for 19% more sequential queries than SASRec alone finds. A query's
candidates here are the union of every tool's top ``top_n``; each candidate is described by each
tool's view of it (present in its top N, reciprocal rank, its score standardised within that
tool's top N) and by cheap shared signals (how many tools propose it, its best rank, its
popularity, whether the user already has it, the user's EH and history length). An xgboost ranker
(``rank:ndcg``, one group per query) learns on validation queries which tool to believe for which
item, and orders the union; items outside the union follow in the fallback tool's order.

One implementation for the batch job and Serve (:class:`reasonrec.scoring.Router` calls it on
the same :class:`~reasonrec.planner.ToolAnswers`). Ray-free, vectorised per batch: the only
per-query Python work is the "already in history" test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from reasonrec import gbdt

SHARED = ("n_tools", "best_rank", "mean_rr", "log_pop", "in_history", "eh", "log_hist")
PER_TOOL = ("rr", "z")  # reciprocal rank (0 when absent), score standardised in the tool's top N


def feature_names(names: Sequence[str]) -> list[str]:
    return [f"{n}.{f}" for n in names for f in PER_TOOL] + list(SHARED)


def candidates(items: dict[str, np.ndarray], names: Sequence[str], top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, U] candidate items (the union of each tool's top ``top_n``, -1 padded) and their mask.
    A candidate's column is where it first appears in tool order (deterministic)."""
    c = np.concatenate([np.asarray(items[n])[:, :top_n] for n in names], 1).astype(np.int64)
    order = np.argsort(c, axis=1, kind="stable")
    s = np.take_along_axis(c, order, 1)
    first = np.ones_like(s, bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    keep = np.zeros_like(first)
    np.put_along_axis(keep, order, first, 1)  # back to tool order
    # Compact each row: kept entries first (stable), padding after.
    pos = np.argsort(~keep, axis=1, kind="stable")
    cand = np.take_along_axis(np.where(keep, c, -1), pos, 1)
    valid = cand >= 0
    width = int(valid.sum(1).max()) if len(cand) else 0
    return cand[:, :width], valid[:, :width]


def candidate_features(
    items: dict[str, np.ndarray],
    scores: dict[str, np.ndarray],
    names: Sequence[str],
    top_n: int,
    popularity: np.ndarray,
    eh: np.ndarray,
    hist_len: np.ndarray,
    histories: Sequence[np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cand [B, U], valid [B, U], X [B, U, F]) with F = len(feature_names(names))."""
    cand, valid = candidates(items, names, top_n)
    B, U = cand.shape
    per_tool, ranks = [], []
    for n in names:
        top = np.asarray(items[n])[:, :top_n]
        sc = np.asarray(scores[n], np.float64)[:, : top.shape[1]]
        eq = cand[:, :, None] == top[:, None, :]  # [B, U, N]
        present = eq.any(2)
        rank = np.where(present, eq.argmax(2), top_n)
        mu, sd = sc.mean(1, keepdims=True), sc.std(1, keepdims=True) + 1e-9
        z = np.where(present, (np.take_along_axis(sc, np.minimum(rank, sc.shape[1] - 1), 1) - mu) / sd, -3.0)
        per_tool += [np.where(present, 1.0 / (rank + 1.0), 0.0), z]
        ranks.append(rank)
    r = np.stack(ranks, 2)  # [B, U, T]
    rr = 1.0 / (r + 1.0) * (r < top_n)
    pop = np.asarray(popularity, np.float64)
    in_hist = np.zeros((B, U))
    for b, h in enumerate(histories):
        if len(h):
            in_hist[b] = np.isin(cand[b], h)
    shared = [
        (r < top_n).sum(2) / max(len(names), 1),
        np.log1p(r.min(2)),
        rr.mean(2),
        np.log1p(pop[np.maximum(cand, 0)]),
        in_hist,
        np.broadcast_to(np.asarray(eh, np.float64)[:, None], (B, U)),
        np.broadcast_to(np.log1p(np.asarray(hist_len, np.float64))[:, None], (B, U)),
    ]
    x = np.stack(per_tool + shared, 2)
    # Rounded like the planner's features: batch size must not flip a split (online == batch).
    return cand, valid, np.round(x, 5).astype(np.float32)


@dataclass
class FusionRanker:
    """The fitted ranker of one ranking task."""

    names: list[str]
    top_n: int
    booster: Any

    @classmethod
    def fit(
        cls, names: Sequence[str], top_n: int, x: Sequence[np.ndarray], y: Sequence[np.ndarray], rounds: int, seed: int
    ) -> FusionRanker | None:
        """``x[q]`` [U_q, F] candidate features of query q, ``y[q]`` [U_q] 1 for the truth. Queries
        whose truth no tool proposed carry no pair and are left out. None when nothing to learn."""
        import xgboost as xgb

        keep = [q for q in range(len(x)) if len(y[q]) and 0 < y[q].sum() < len(y[q])]
        if len(keep) < 10:
            return None
        xs = np.concatenate([x[q] for q in keep])
        ys = np.concatenate([y[q] for q in keep]).astype(np.float32)
        qid = np.repeat(np.arange(len(keep)), [len(y[q]) for q in keep])
        params = {
            "objective": "rank:ndcg",
            "lambdarank_pair_method": "topk",
            "lambdarank_num_pair_per_sample": 8,
            "ndcg_exp_gain": False,
            "eval_metric": "ndcg@5",
            "max_depth": 4,
            "eta": 0.1,
            "min_child_weight": 5,
            "subsample": 0.9,
            "seed": seed,
            "nthread": 1,
        }
        booster = xgb.train(params, xgb.DMatrix(xs, label=ys, qid=qid), num_boost_round=rounds)
        return cls(list(names), int(top_n), booster)

    def score(self, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """[B, U] ranker scores, -inf where there is no candidate."""
        B, U, F = x.shape
        out = np.full((B, U), -np.inf)
        if valid.any():
            out[valid] = gbdt.predict(self.booster, x[valid])
        return out

    def rank(self, cand: np.ndarray, valid: np.ndarray, x: np.ndarray, fallback: np.ndarray, k: int) -> np.ndarray:
        """[B, k] items: the union by ranker score (ties: candidate order), then ``fallback``'s
        items [B, C] not in the union, in its order; -1 pads a row with fewer than k items."""
        s = self.score(x, valid)
        order = np.argsort(-s, axis=1, kind="stable")
        ranked = np.where(np.take_along_axis(valid, order, 1), np.take_along_axis(cand, order, 1), -1)
        fb = np.asarray(fallback, np.int64)
        extra = np.where((fb[:, :, None] == cand[:, None, :]).any(2), -1, fb)
        both = np.concatenate([ranked, extra], 1)
        pos = np.argsort(both < 0, axis=1, kind="stable")  # items first, padding last
        out = np.take_along_axis(both, pos, 1)[:, :k]
        if out.shape[1] < k:
            out = np.pad(out, ((0, 0), (0, k - out.shape[1])), constant_values=-1)
        return out

    def hits(self, x: Sequence[np.ndarray], y: Sequence[np.ndarray], k: int) -> np.ndarray:
        """Per query: is the truth in the fused top ``k``? (``x``/``y`` as in :meth:`fit`; a query
        whose truth no tool proposed is a miss.) Orders exactly as :meth:`rank` does."""
        out = np.zeros(len(x), bool)
        idx = [q for q in range(len(x)) if len(y[q]) and np.any(y[q])]
        if not idx:
            return out
        s = gbdt.predict(self.booster, np.concatenate([x[q] for q in idx]))
        bounds = np.cumsum([0] + [len(y[q]) for q in idx])
        for j, q in enumerate(idx):
            top = np.argsort(-s[bounds[j] : bounds[j + 1]], kind="stable")[:k]
            out[q] = bool(np.asarray(y[q])[top].any())
        return out

    # ----------------------------------------------------------------------- persistence
    def state(self) -> dict[str, Any]:
        return {"names": self.names, "top_n": self.top_n, "booster": json.loads(self.booster.save_raw("json").decode())}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> FusionRanker | None:
        if not state:
            return None
        import xgboost as xgb

        b = xgb.Booster()
        b.load_model(bytearray(json.dumps(state["booster"]).encode()))
        b.set_param({"nthread": 1})
        return cls(list(state["names"]), int(state["top_n"]), b)
