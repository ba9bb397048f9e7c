"""The tool interface every classical recommender implements, and the registry that finds tools by name.

A *tool* is a cheap model the planner delegates to (paper section 3.3 "skill repository"). All
inputs are NumPy arrays of dense ids (as written by ``prepare``); nothing here knows of Ray.

Tasks:
* ``sequential``: top-K over the whole catalog from a user's history (full ranking);
* ``direct``: scores for a given candidate list;
* ``ctr``: click probability for (user, item) rows.

Unknown users (id outside the training range, or -1) and empty histories are valid inputs: every
tool defines a fallback (popularity-like scores) instead of crashing inside torch. Item ids outside
``[0, n_items)`` raise :class:`ToolInputError` naming the offending id.
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np


class ToolInputError(ValueError):
    """Bad input to a tool (unknown item id, duplicate candidates, shape mismatch)."""


@dataclass
class ToolData:
    """Everything tools train on, built from the ``prepare`` outputs (see reasonrec/tools/data.py).

    ``train_seqs[u]`` is user u's training history in time order (int64 item ids); users with no
    training items have an empty array. ``valid_item``/``test_item`` are -1 where the user has none.
    ``ctr_*`` hold the CTR split rows (user, item, label) per split name.
    """

    n_users: int
    n_items: int
    train_seqs: list[np.ndarray]
    valid_item: np.ndarray
    test_item: np.ndarray
    item_text: list[str] | None = None  # title + brand + categories, for semantic tools
    item_category: np.ndarray | None = None  # first category index per item (-1 unknown), CTR side feature
    item_brand: np.ndarray | None = None  # brand index per item (-1 unknown)
    ctr: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    direct_valid: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # users, candidates[B,C], positive

    @property
    def item_popularity(self) -> np.ndarray:
        counts = np.zeros(self.n_items, dtype=np.float64)
        for seq in self.train_seqs:
            np.add.at(counts, seq, 1.0)
        return counts


class Tool(abc.ABC):
    """Base class. Subclasses set ``name`` (registry key) and ``tasks``; implement ``fit``,
    ``score_items`` (or ``predict_ctr`` for CTR-only tools), ``state``/``from_state``."""

    name: ClassVar[str]
    tasks: ClassVar[tuple[str, ...]]

    def __init__(self, params: dict[str, Any] | None = None):
        self.params = dict(params or {})
        self.n_items: int = 0
        self.n_users: int = 0

    # ---------------------------------------------------------------------------- training
    @abc.abstractmethod
    def fit(
        self, data: ToolData, reporter: Callable[[int, dict], None] | None = None, start_epoch: int = 0
    ) -> dict[str, float]:
        """Train on ``data`` (early-stopping on its validation targets); return validation metrics.
        ``reporter(epoch, metrics)`` is called once per epoch on every rank (Ray Train
        reports/checkpoints through it). ``start_epoch > 0`` resumes: a tool loaded from a
        checkpoint continues from its current weights (see ``reasonrec.tools.training``)."""

    # --------------------------------------------------------------------------- inference
    def score_items(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        """Scores over the whole catalog, shape [B, n_items], higher is better."""
        raise NotImplementedError(f"tool '{self.name}' does not rank items")

    def recommend(
        self, users: np.ndarray, histories: list[np.ndarray], k: int = 10, exclude_seen: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over the whole catalog: (items [B,k] int64, scores [B,k] float32)."""
        scores = np.asarray(self.score_items(users, histories), dtype=np.float32).copy()
        if exclude_seen:
            for row, hist in enumerate(histories):
                if len(hist):
                    scores[row, np.asarray(hist, dtype=np.int64)] = -np.inf
        k = min(k, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        items = np.take_along_axis(top, order, axis=1).astype(np.int64)
        return items, np.take_along_axis(scores, items, axis=1)

    def score_candidates(self, users: np.ndarray, histories: list[np.ndarray], candidates: np.ndarray) -> np.ndarray:
        """Scores for each row's candidate list, shape [B, C]."""
        candidates = np.asarray(candidates, dtype=np.int64)
        self.check_items(candidates)
        for row in candidates:
            if len(np.unique(row)) != len(row):
                raise ToolInputError(f"candidate list has duplicate items: {row.tolist()[:20]}")
        return np.take_along_axis(np.asarray(self.score_items(users, histories)), candidates, axis=1)

    def predict_ctr(self, users: np.ndarray, items: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        """P(click) per (user, item) row, shape [B]. Ranking tools default to a sigmoid of the score.
        A user's CTR rows share one history: the catalog is scored once per distinct (user,
        history) of the batch, not once per row (a user's scores do not depend on the batch)."""
        items = np.asarray(items, dtype=np.int64)
        self.check_items(items)
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        distinct: dict[tuple[int, bytes], int] = {}
        row_of = np.array(
            [
                distinct.setdefault((int(u), np.asarray(h, np.int64).tobytes()), len(distinct))
                for u, h in zip(users, histories)
            ],
            dtype=np.int64,
        )
        first = np.unique(row_of, return_index=True)[1]
        scores = np.asarray(self.score_items(users[first], [histories[r] for r in first]))
        s = scores[row_of, items]
        return 1.0 / (1.0 + np.exp(-s))

    @staticmethod
    def confidence(scores: np.ndarray, chunk_rows: int = 256) -> np.ndarray:
        """Cheap per-query confidence from a score row: softmax mass of the top item minus the
        runner-up (a margin in [0, 1]); for probabilities [B], distance from 0.5 scaled to [0, 1].
        Rows go in chunks (a float64 copy of ``chunk_rows`` rows at a time, not of the whole
        [B, n_items] block) and the two largest masses come from a partition, not a full sort:
        O(n_items) per row, the same values as sorting."""
        scores = np.asarray(scores)
        if scores.ndim == 1:
            return np.abs(scores.astype(np.float64) - 0.5) * 2.0
        out = np.empty(len(scores), dtype=np.float32)
        n = scores.shape[1]
        for a in range(0, len(scores), chunk_rows):
            p = scores[a : a + chunk_rows].astype(np.float64)  # a copy: changed in place below
            p[~np.isfinite(p)] = -1e30
            p -= p.max(axis=1, keepdims=True)
            np.exp(p, out=p)
            p /= p.sum(axis=1, keepdims=True)
            if n > 1:
                top2 = np.partition(p, n - 2, axis=1)[:, n - 2 :]  # [runner-up, top]
                out[a : a + chunk_rows] = top2[:, 1] - top2[:, 0]
            else:
                out[a : a + chunk_rows] = p[:, 0]
        return out

    def check_items(self, items: np.ndarray) -> None:
        items = np.asarray(items)
        bad = items[(items < 0) | (items >= self.n_items)]
        if bad.size:
            raise ToolInputError(f"unknown item id {int(bad.flat[0])} (catalog has {self.n_items} items)")

    # --------------------------------------------------------------------------- save/load
    @abc.abstractmethod
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able config, named arrays) -- saved as config.json + weights.safetensors."""

    @classmethod
    @abc.abstractmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Tool:
        """Inverse of :meth:`state`."""


_REGISTRY: dict[str, type[Tool]] = {}


def register(cls: type[Tool]) -> type[Tool]:
    _REGISTRY[cls.name] = cls
    return cls


@functools.cache
def _import_tools() -> None:
    """Import every module of the ``reasonrec.tools`` package, once (each registers its tools)."""
    import importlib
    import pkgutil

    from reasonrec import tools as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")


def tool_class(name: str) -> type[Tool]:
    _import_tools()
    if name not in _REGISTRY:
        raise KeyError(f"unknown tool '{name}'; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def registered() -> dict[str, type[Tool]]:
    _import_tools()
    return dict(_REGISTRY)
