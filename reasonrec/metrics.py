"""Ranking, CTR and text metrics, plus the paper's cold-start / evidence-horizon breakdowns.

Pure NumPy on arrays (no Ray, no torch), so the batch evaluation job and Serve share one
implementation.

Ranking (one held-out item per query, as in leave-one-out):
* ``rank`` is 0-based: 0 means the truth was scored highest.
* ``HR@K = 1[rank < K]``, ``NDCG@K = 1 / log2(rank + 2) if rank < K else 0`` (ideal DCG is 1).
* Ties are counted *pessimistically* by default: every other item scoring exactly the truth's
  score ranks ahead of it, so a constant scorer gets the worst rank instead of a lucky one.
  ``ties="optimistic"`` and ``ties="mean"`` (half the ties, fractional rank) exist for comparison.
  NaN scores count as -inf.

CTR: ``auc`` is the Mann-Whitney rank statistic with mid-ranks for tied scores (identical to
``sklearn.metrics.roc_auc_score``); ``log_loss`` clips probabilities to ``[eps, 1 - eps]``.

Text: ``bleu4`` is corpus BLEU-4 (Papineni et al. 2002) and ``sentence_bleu4`` per-sentence BLEU-4
with add-one smoothing on orders 2-4 (Lin & Och 2004), both through sacrebleu; ``rouge_l`` is the
ROUGE-L F1 per sentence (best over references), averaged, through rouge-score. Settings:
``BLEU_SETTINGS`` / ``ROUGE_SETTINGS``. Scores are in [0, 1] -- multiply by 100 for the paper's
tables.

Cold start: ``cold_start_groups`` splits users into ``n_groups`` equal-size groups by training
frequency (group 1 = coldest); the paper aggregates Coldest = groups 1-3, Medium = 4-6 and
Normal = 1-10 (everyone).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from reasonrec.vocab import EH_BUCKETS

TIES = ("pessimistic", "optimistic", "mean")

# ----------------------------------------------------------------------------------- ranking


def _clean_scores(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be [B, N], got shape {s.shape}")
    return np.where(np.isnan(s), -np.inf, s)


def rank_of_truth(scores: np.ndarray, truth: np.ndarray, ties: str = "pessimistic") -> np.ndarray:
    """0-based rank of column ``truth[b]`` within row ``scores[b]``.

    ``truth`` holds column indices (for a full-catalog score matrix these are item ids). Returns
    int64 ranks, or float64 for ``ties="mean"``.
    """
    s = _clean_scores(scores)
    truth = np.asarray(truth, dtype=np.int64).reshape(-1)
    if truth.shape[0] != s.shape[0]:
        raise ValueError(f"{s.shape[0]} score rows but {truth.shape[0]} truths")
    if truth.size and (truth.min() < 0 or truth.max() >= s.shape[1]):
        raise ValueError(f"truth column out of range [0, {s.shape[1]})")
    t = s[np.arange(s.shape[0]), truth][:, None]
    greater = (s > t).sum(axis=1)
    equal = (s == t).sum(axis=1) - 1  # the truth itself is not a tie
    if ties == "pessimistic":
        return (greater + equal).astype(np.int64)
    if ties == "optimistic":
        return greater.astype(np.int64)
    if ties == "mean":
        return greater + equal / 2.0
    raise ValueError(f"ties must be one of {TIES}, got '{ties}'")


def rank_full_catalog(
    scores: np.ndarray, truth_items: np.ndarray, exclude: Sequence[np.ndarray] | None = None, ties: str = "pessimistic"
) -> np.ndarray:
    """Full ranking: ``scores`` is [B, n_items]. Items in ``exclude[b]`` (usually the user's
    training history) are removed from the ranking -- except the truth itself, which may be a
    repeat purchase and must still be ranked."""
    s = _clean_scores(scores).copy()
    truth_items = np.asarray(truth_items, dtype=np.int64).reshape(-1)
    if exclude is not None:
        if len(exclude) != s.shape[0]:
            raise ValueError(f"{s.shape[0]} score rows but {len(exclude)} exclude lists")
        for b, seen in enumerate(exclude):
            seen = np.asarray(seen, dtype=np.int64)
            if seen.size:
                s[b, seen[seen != truth_items[b]]] = -np.inf
    return rank_of_truth(s, truth_items, ties=ties)


def rank_in_candidates(
    scores: np.ndarray, candidates: np.ndarray, truth_items: np.ndarray, ties: str = "pessimistic"
) -> np.ndarray:
    """Candidate-list ranking: ``scores[b, c]`` scores item ``candidates[b, c]``; each row must
    contain ``truth_items[b]`` exactly once (1 positive + sampled negatives)."""
    candidates = np.asarray(candidates, dtype=np.int64)
    truth_items = np.asarray(truth_items, dtype=np.int64).reshape(-1, 1)
    if candidates.shape != np.shape(scores):
        raise ValueError(f"scores {np.shape(scores)} and candidates {candidates.shape} differ in shape")
    hits = candidates == truth_items
    per_row = hits.sum(axis=1)
    if (per_row != 1).any():
        row = int(np.flatnonzero(per_row != 1)[0])
        raise ValueError(
            f"row {row}: truth item {int(truth_items[row, 0])} appears {int(per_row[row])} "
            f"times in its candidate list (need exactly once)"
        )
    return rank_of_truth(scores, hits.argmax(axis=1), ties=ties)


def hit_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-query HR@K (float 0/1)."""
    return (np.asarray(ranks, dtype=np.float64) < k).astype(np.float64)


def ndcg_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-query NDCG@K with one relevant item: 1/log2(rank+2) inside the top K."""
    r = np.asarray(ranks, dtype=np.float64)
    return np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)


def mrr(ranks: np.ndarray) -> np.ndarray:
    """Per-query reciprocal rank."""
    return 1.0 / (np.asarray(ranks, dtype=np.float64) + 1.0)


def ranking_metrics(ranks: np.ndarray, ks: Iterable[int] = (5, 10)) -> dict[str, float]:
    """Means over queries: ``{"hr@5": ..., "ndcg@5": ..., ...}`` (NaN when there are no queries)."""
    ranks = np.asarray(ranks)
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = float(hit_at_k(ranks, k).mean()) if ranks.size else float("nan")
        out[f"ndcg@{k}"] = float(ndcg_at_k(ranks, k).mean()) if ranks.size else float("nan")
    return out


# --------------------------------------------------------------------------------------- CTR


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # boundaries of runs of equal values
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1..end
    ranks_sorted = np.repeat(avg, ends - starts)
    out = np.empty(len(x), dtype=np.float64)
    out[order] = ranks_sorted
    return out


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC = P(score of a random positive > a random negative), ties count one half.
    NaN when only one class is present."""
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _midranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy with probabilities clipped to [eps, 1-eps]."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), eps, 1.0 - eps)
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and probs {p.shape} differ in shape")
    if y.size == 0:
        return float("nan")
    return float(-(y * np.log(p) + (1.0 - y) * np.log1p(-p)).mean())


def ctr_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    return {"auc": auc(labels, probs), "logloss": log_loss(labels, probs)}


# -------------------------------------------------------------------------------------- text


def _as_refs(ref: str | Sequence[str]) -> list[str]:
    return [ref] if isinstance(ref, str) else list(ref)


def _ref_streams(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """sacrebleu's layout: one stream per reference slot. A hypothesis with fewer references
    repeats its first one, which changes neither the clipped counts nor the closest length."""
    refs = [_as_refs(r) or [""] for r in references]
    width = max((len(r) for r in refs), default=1)
    return [[r[k] if k < len(r) else r[0] for r in refs] for k in range(width)]


# BLEU through sacrebleu (the field's reference implementation), not hand-written: tokenisation
# and smoothing choices make BLEU numbers incomparable otherwise. Settings (also in the report's
# protocol line): 13a tokenizer, lower-cased, corpus BLEU unsmoothed (Papineni et al. 2002),
# sentence BLEU with add-one smoothing on orders >= 2 (Lin & Och 2004). Scores in [0, 1].
BLEU_SETTINGS = "sacrebleu BLEU-4, tok 13a, lowercase; corpus unsmoothed, sentence add-one (n >= 2)"
ROUGE_SETTINGS = "rouge-score ROUGE-L F1 (beta 1), its default tokenizer (lower-case alphanumerics), no stemming"


def bleu4(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU-4 in [0, 1]; ``references[i]`` is one string or a list of strings."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return float("nan")
    bleu = BLEU(tokenize="13a", lowercase=True, smooth_method="none", max_ngram_order=max_n)
    return float(bleu.corpus_score(list(hypotheses), _ref_streams(references)).score) / 100.0


def sentence_bleu4(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], max_n: int = 4) -> np.ndarray:
    """Per-sentence smoothed BLEU-4 (add-one on orders >= 2), for per-query breakdowns."""
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    bleu = BLEU(
        tokenize="13a",
        lowercase=True,
        smooth_method="add-k",
        smooth_value=1,
        max_ngram_order=max_n,
        effective_order=False,
    )
    # sacrebleu logs a recommendation (effective_order) per sentence; add-one smoothing over all
    # four orders is the intended definition here, so the advice is silenced for this loop.
    log = logging.getLogger("sacrebleu")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        scores = [bleu.sentence_score(h, _as_refs(r)).score / 100.0 for h, r in zip(hypotheses, references)]
    finally:
        log.setLevel(level)
    return np.array(scores, dtype=np.float64)


def rouge_l_scores(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> np.ndarray:
    """Per-sentence ROUGE-L F-measure (best over references), through Google's rouge-score."""
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return np.array(
        [
            max((scorer.score(r, h)["rougeL"].fmeasure for r in _as_refs(ref)), default=0.0)
            for h, ref in zip(hypotheses, references)
        ],
        dtype=np.float64,
    )


def rouge_l(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean ROUGE-L F1 in [0, 1]."""
    s = rouge_l_scores(hypotheses, references)
    return float(s.mean()) if s.size else float("nan")


def text_metrics(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    return {"bleu4": bleu4(hypotheses, references), "rouge_l": rouge_l(hypotheses, references)}


# ------------------------------------------------------------------ cold start and breakdowns

# The paper's aggregations over the 10 frequency groups.
COLD_START_AGGREGATES: dict[str, tuple[int, ...]] = {
    "coldest": (1, 2, 3),
    "medium": (4, 5, 6),
    "normal": tuple(range(1, 11)),
}


def cold_start_groups(n_train: np.ndarray, n_groups: int = 10) -> np.ndarray:
    """Group 1..n_groups per user, equal-size by training frequency (group 1 = fewest training
    interactions). Users are sorted by count with ties broken by position (stable), then cut into
    ``n_groups`` contiguous chunks whose sizes differ by at most one (earlier groups get the extra
    user), so equal counts can straddle a group boundary -- equal size is the paper's definition."""
    n = np.asarray(n_train).reshape(-1)
    order = np.argsort(n, kind="stable")
    groups = np.empty(n.shape[0], dtype=np.int64)
    for g, idx in enumerate(np.array_split(order, n_groups), start=1):
        groups[idx] = g
    return groups


def segment_masks(
    eh_bucket: np.ndarray | None = None,
    cs_group: np.ndarray | None = None,
    aggregates: Mapping[str, tuple[int, ...]] = COLD_START_AGGREGATES,
) -> dict[str, np.ndarray]:
    """Boolean masks per segment: ``eh:<bucket>`` for each bucket present, ``cs:<g>`` for each
    group present and ``cs:<aggregate>`` for the paper's aggregations."""
    masks: dict[str, np.ndarray] = {}
    if eh_bucket is not None:
        eb = np.asarray(eh_bucket).astype(str)
        known = EH_BUCKETS
        for b in list(known) + sorted(set(eb.tolist()) - set(known)):
            m = eb == b
            if m.any():
                masks[f"eh:{b}"] = m
    if cs_group is not None:
        cg = np.asarray(cs_group, dtype=np.int64)
        for g in sorted(set(cg.tolist())):
            masks[f"cs:{g}"] = cg == g
        for name, gs in aggregates.items():
            masks[f"cs:{name}"] = np.isin(cg, gs)
    return masks


def breakdown(
    metrics: Mapping[str, np.ndarray], eh_bucket: np.ndarray | None = None, cs_group: np.ndarray | None = None
) -> dict[str, dict[str, float]]:
    """Mean of each per-query metric array overall (``"all"``) and per segment (see
    :func:`segment_masks`); each segment also carries ``"n"``, its number of queries.

    ``eh_bucket``/``cs_group`` are per query (map users to queries first)."""
    arrays = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in metrics.items()}
    lengths = {a.shape[0] for a in arrays.values()}
    if len(lengths) > 1:
        raise ValueError(f"metric arrays differ in length: {sorted(lengths)}")
    q = lengths.pop() if lengths else 0
    masks = {"all": np.ones(q, dtype=bool)}
    for key, m in segment_masks(eh_bucket, cs_group).items():
        if m.shape[0] != q:
            raise ValueError(f"segment labels have {m.shape[0]} rows but metrics have {q}")
        masks[key] = m
    out: dict[str, dict[str, float]] = {}
    for key, m in masks.items():
        row = {name: (float(a[m].mean()) if m.any() else float("nan")) for name, a in arrays.items()}
        row["n"] = int(m.sum())
        out[key] = row
    return out


def breakdown_fn(
    fn: Callable[[np.ndarray], Mapping[str, float]],
    n_rows: int,
    eh_bucket: np.ndarray | None = None,
    cs_group: np.ndarray | None = None,
) -> dict[str, dict[str, float]]:
    """Like :func:`breakdown` for metrics that are not per-query means (AUC, corpus BLEU):
    ``fn(mask)`` computes the metrics on the selected rows."""
    masks = {"all": np.ones(n_rows, dtype=bool), **segment_masks(eh_bucket, cs_group)}
    out: dict[str, dict[str, float]] = {}
    for key, m in masks.items():
        row = dict(fn(m)) if m.any() else {}
        row["n"] = int(m.sum())
        out[key] = row
    return out


def expected_calibration_error(
    confidence: Sequence[float | None], correct: Sequence[bool | int], n_bins: int = 10
) -> float:
    """ECE with equal-width bins: sum_b |B|/n * |acc(B) - conf(B)|. Entries whose confidence is
    missing (None / NaN, e.g. no verbalised value produced) are ignored; NaN if none remain."""
    conf = np.array([np.nan if c is None else float(c) for c in confidence], dtype=np.float64)
    corr = np.asarray(correct, dtype=np.float64)
    ok = np.isfinite(conf)
    conf, corr = np.clip(conf[ok], 0.0, 1.0), corr[ok]
    if len(conf) == 0:
        return float("nan")
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(corr[sel].mean() - conf[sel].mean())
    return float(ece)
