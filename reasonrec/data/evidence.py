"""Evidence horizon (paper section 3.2): C(u) = 1 - |I_u| / max_u' |I_u'| over training interactions.

The normalizers all map a user's training count n to [0, 1] (1 = no evidence, cold). They are
computed from a *histogram* of counts (count value -> number of users), which the Ray job gets
from an aggregation; the histogram has at most max(n) distinct keys, so it is small however many
users there are, and the same functions run unchanged in the batch job and in Serve.

* ``max``      the paper's formula, exact.
* ``quantile`` like ``max`` with the maximum replaced by the q-quantile of counts (robust to one
               very heavy user); counts above the cap get C = 0.
* ``rank``     1 - mid-rank percentile of n among users: the share of users with more evidence.
* ``log``      1 - log(1 + n) / log(1 + max n): compresses the long tail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from reasonrec.vocab import EH_BUCKETS

FILE_NAME = "eh_normalizer.json"  # in the prepare stage's folder


@dataclass(frozen=True)
class EHNormalizer:
    """A fitted normalizer: ``kind`` plus the statistics it needs (picklable, tiny)."""

    kind: str
    max_count: int
    cap: float
    # for rank: sorted distinct counts and the mid-rank CDF at each
    values: tuple[int, ...] = ()
    midrank_cdf: tuple[float, ...] = ()

    def __call__(self, counts: np.ndarray) -> np.ndarray:
        n = np.asarray(counts, dtype=np.float64)
        if self.kind == "max":
            c = 1.0 - n / max(self.max_count, 1)
        elif self.kind == "quantile":
            c = 1.0 - np.minimum(n, self.cap) / max(self.cap, 1.0)
        elif self.kind == "log":
            c = 1.0 - np.log1p(n) / np.log1p(max(self.max_count, 1))
        elif self.kind == "rank":
            vals = np.asarray(self.values, dtype=np.float64)
            cdf = np.asarray(self.midrank_cdf, dtype=np.float64)
            # Counts unseen at fit time (e.g. an online user) interpolate between neighbours.
            c = 1.0 - np.interp(n, vals, cdf, left=0.0, right=1.0) if len(vals) else np.ones_like(n)
        else:
            raise ValueError(f"unknown evidence-horizon normalizer '{self.kind}'")
        return np.clip(c, 0.0, 1.0).astype(np.float32)

    def to_dict(self) -> dict:
        """The fitted statistics as JSON-ready values (the file format of :data:`FILE_NAME`)."""
        return {
            "kind": self.kind,
            "max_count": int(self.max_count),
            "cap": float(self.cap),
            "values": [int(v) for v in self.values],
            "midrank_cdf": [float(c) for c in self.midrank_cdf],
        }

    @classmethod
    def from_dict(cls, raw: dict) -> EHNormalizer:
        return cls(
            kind=raw["kind"],
            max_count=int(raw["max_count"]),
            cap=float(raw["cap"]),
            values=tuple(int(v) for v in raw.get("values", ())),
            midrank_cdf=tuple(float(c) for c in raw.get("midrank_cdf", ())),
        )

    def save(self, writer) -> None:
        """Write into a stage being committed (``ArtifactStore.stage_writer``'s writer)."""
        writer.write_json(FILE_NAME, self.to_dict())

    @classmethod
    def load(cls, store, stage: str = "prepare") -> EHNormalizer:
        """Read back what :meth:`save` wrote into ``stage`` of a run's ``ArtifactStore``."""
        with store.fs.open(store.path(stage, FILE_NAME), "r") as f:
            return cls.from_dict(json.load(f))


def fit_normalizer(kind: str, hist_counts: np.ndarray, hist_users: np.ndarray, quantile: float = 0.95) -> EHNormalizer:
    """Fit from a histogram: ``hist_counts[i]`` is a training-interaction count and ``hist_users[i]``
    how many users have it."""
    order = np.argsort(hist_counts)
    values = np.asarray(hist_counts, dtype=np.int64)[order]
    users = np.asarray(hist_users, dtype=np.int64)[order]
    if len(values) == 0:
        raise ValueError("cannot fit an evidence-horizon normalizer on zero users")
    total = users.sum()
    cum = np.cumsum(users)
    max_count = int(values[-1])
    # q-quantile of the per-user counts (lower interpolation: an observed count)
    idx = int(np.searchsorted(cum, quantile * total, side="left"))
    cap = float(values[min(idx, len(values) - 1)])
    below = cum - users
    midrank = (below + 0.5 * users) / total
    return EHNormalizer(
        kind=kind,
        max_count=max_count,
        cap=cap,
        values=tuple(int(v) for v in values),
        midrank_cdf=tuple(float(x) for x in midrank),
    )


def bucket(eh: np.ndarray, thresholds: tuple[float, float] | list[float] = (0.3, 0.7)) -> np.ndarray:
    """Paper buckets: low C < t0, medium t0 <= C <= t1, high C > t1."""
    lo, hi = thresholds
    eh = np.asarray(eh)
    low, medium, high = EH_BUCKETS
    out = np.where(eh < lo, low, np.where(eh > hi, high, medium))
    return out.astype(object)
