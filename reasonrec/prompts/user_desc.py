"""Short user-preference summaries for the ``{desc}`` slot of the templates.

In the spirit of AgentMMRec's user-preference knowledge (textual, visual and cross-modal
preferences: favoured categories, brands, colours/styles, brand-and-colour combinations), but
computed directly from item attributes instead of asking an LLM: it must be cheap enough to run
for every user in a batch job and deterministic for the same history.

Everything is a pure function over integer-coded attribute arrays (``ItemAttributes``); the batch
entry point ``describe_users`` counts attributes for many users at once with ``np.bincount`` over
(user, code) pairs. Example output::

    likes Nail Polish, Eye Shadow; brands OPI, Maybelline; mostly red; mid-range prices
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

PRICE_BANDS = ("budget", "mid-range", "premium")


@dataclass
class Attribute:
    """One categorical item attribute: ``codes[item_id]`` indexes ``names`` (-1 = unknown)."""

    codes: np.ndarray
    names: list[str]


@dataclass
class ItemAttributes:
    category: Attribute | None = None  # leaf (most specific) category
    brand: Attribute | None = None
    price: np.ndarray | None = None  # float, NaN = unknown
    styles: dict[str, Attribute] = field(default_factory=dict)  # e.g. {"colour": ..., "style": ...}
    # price band edges (two catalog quantiles); derived from ``price`` when left None
    price_edges: tuple[float, float] | None = None

    def __post_init__(self):
        if self.price is not None and self.price_edges is None:
            known = self.price[np.isfinite(self.price)]
            if len(known):
                lo, hi = np.quantile(known, [1 / 3, 2 / 3])
                self.price_edges = (float(lo), float(hi))

    @staticmethod
    def encode(values: Sequence[str | None], unknown: Sequence[str] = ("", "unknown")) -> Attribute:
        """Integer-code a list of strings (one per item); names sorted so codes are stable."""
        bad = {u.lower() for u in unknown}
        clean = [None if v is None or str(v).strip().lower() in bad else str(v).strip() for v in values]
        names = sorted({v for v in clean if v is not None})
        index = {n: i for i, n in enumerate(names)}
        codes = np.array([index[v] if v is not None else -1 for v in clean], dtype=np.int64)
        return Attribute(codes=codes, names=names)

    @classmethod
    def from_columns(
        cls,
        brand: Sequence[str | None] | None = None,
        categories: Sequence[Sequence[str] | None] | None = None,
        price: Sequence[float | None] | None = None,
        styles: dict[str, Sequence[str | None]] | None = None,
    ) -> ItemAttributes:
        """Build from the canonical items columns (indexed by dense item_id); the leaf category is
        the last entry of each item's category path."""
        cat = None
        if categories is not None:
            cat = cls.encode([(c[-1] if c is not None and len(c) else None) for c in categories])
        return cls(
            category=cat,
            brand=cls.encode(list(brand)) if brand is not None else None,
            price=(
                np.array([np.nan if p is None else p for p in price], dtype=np.float64) if price is not None else None
            ),
            styles={k: cls.encode(list(v)) for k, v in (styles or {}).items()},
        )


def _top_names(
    attr: Attribute, user_idx: np.ndarray, items: np.ndarray, n_users: int, top_k: int, min_share: float
) -> list[list[str]]:
    codes = attr.codes[items]
    ok = codes >= 0
    n_codes = max(len(attr.names), 1)
    counts = np.bincount(user_idx[ok] * n_codes + codes[ok], minlength=n_users * n_codes)
    counts = counts.reshape(n_users, n_codes)
    totals = counts.sum(1)
    # Stable order: by count desc, then by name order (argsort of -count is stable for ties).
    order = np.argsort(-counts, axis=1, kind="stable")[:, :top_k]
    out = []
    for u in range(n_users):
        names = []
        for c in order[u]:
            if counts[u, c] > 0 and counts[u, c] >= min_share * max(totals[u], 1):
                names.append(attr.names[c])
        out.append(names)
    return out


def _flatten(histories) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, concatenated item ids) from a list of arrays or an Arrow list array/column (as
    in a Ray Data batch: offsets are used directly, no per-row Python objects)."""
    try:
        import pyarrow as pa

        if isinstance(histories, pa.ChunkedArray):
            histories = histories.combine_chunks()
        if isinstance(histories, (pa.ListArray, pa.LargeListArray)):
            offsets = histories.offsets.to_numpy()
            values = histories.values.to_numpy(zero_copy_only=False).astype(np.int64)
            return np.diff(offsets).astype(np.int64), values[offsets[0] : offsets[-1]]
    except ImportError:
        pass
    lengths = np.array([len(h) for h in histories], dtype=np.int64)
    items = (
        np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
        if len(histories) and lengths.sum()
        else np.zeros(0, dtype=np.int64)
    )
    return lengths, items


def describe_users(
    histories, attrs: ItemAttributes, top_k: int = 2, min_share: float = 0.2, max_chars: int = 160
) -> list[str]:
    """One short preference summary per history: a list of item-id arrays or an Arrow list array
    of item ids (nulls count as empty). Empty history -> "new user"."""
    lengths, items = _flatten(histories)
    n = len(lengths)
    user_idx = np.repeat(np.arange(n, dtype=np.int64), lengths)
    parts: list[list[str]] = [[] for _ in range(n)]

    if attrs.category is not None:
        for u, names in enumerate(_top_names(attrs.category, user_idx, items, n, top_k, min_share)):
            if names:
                parts[u].append("likes " + ", ".join(names))
    if attrs.brand is not None:
        for u, names in enumerate(_top_names(attrs.brand, user_idx, items, n, top_k, min_share)):
            if names:
                parts[u].append(("brand " if len(names) == 1 else "brands ") + ", ".join(names))
    for key, attr in attrs.styles.items():
        for u, names in enumerate(_top_names(attr, user_idx, items, n, 1, max(min_share, 0.34))):
            if names:
                parts[u].append(f"mostly {names[0]}" if key in ("colour", "color") else f"{key} {names[0]}")
    if attrs.price is not None and attrs.price_edges is not None:
        prices = attrs.price[items]
        ok = np.isfinite(prices)
        # Per-user median price via sorting (user, price) pairs; vectorised over all users.
        uid, pr = user_idx[ok], prices[ok]
        order = np.lexsort((pr, uid))
        uid, pr = uid[order], pr[order]
        cnt = np.bincount(uid, minlength=n)
        start = np.concatenate([[0], np.cumsum(cnt)[:-1]])
        has = cnt > 0
        med = np.full(n, np.nan)
        lo_i = start[has] + (cnt[has] - 1) // 2
        hi_i = start[has] + cnt[has] // 2
        med[has] = 0.5 * (pr[lo_i] + pr[hi_i])
        band = np.digitize(med, attrs.price_edges, right=True)
        for u in np.flatnonzero(has):
            parts[u].append(f"{PRICE_BANDS[band[u]]} prices")

    out = []
    for u in range(n):
        if lengths[u] == 0:
            out.append("new user, no purchases yet")
            continue
        text = "; ".join(parts[u]) or "varied tastes"
        out.append(text[:max_chars].rstrip(" ;,"))
    return out


def describe_user(history: np.ndarray, attrs: ItemAttributes, **kwargs) -> str:
    return describe_users([np.asarray(history)], attrs, **kwargs)[0]
