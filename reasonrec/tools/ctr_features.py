"""Shared CTR feature building: sparse ids (user, item, category, brand) and dense features per
(user, item, history) row, plus the TorchRec ``KeyedJaggedTensor`` batch for DLRM / DCNv2.

Dense features (``DENSE_FEATURES``) describe the item against the user's history and the
training statistics, never the row's own (user, item) interaction:

* at inference a row's own interaction, if it is a training pair, is subtracted from the counts
  (leave-self-out), so a held-out positive and a training positive look alike;
* for *training* rows (``oof=True``) exact leave-self-out would leak the label -- an item with
  count p shows p-1 on its positive rows and p on its negative rows, which trees and MLPs learn
  by heart. So training rows use out-of-fold statistics instead: every (user, item) pair falls in
  one of ``n_folds`` folds by a hash, and a row's counts come from the pairs of the other folds,
  rescaled to full-data size (x K/(K-1) for counts of one pair, x (K/(K-1))^2 for co-occurrences).
  Positives and negatives are treated alike, so the feature no longer depends on the label.

* ``log_hist_len``   log1p of the history length (the row's item *included*: removing it would
  make every training positive's user look one item shorter than for its negatives);
* ``log_item_pop``   log1p of the item's training count (distinct users);
* ``cat_affinity``   history items other than the item itself that share its category, divided by
  the history length (0 if the category is unknown);
* ``brand_affinity`` the same for brand;
* ``log_cooc_sum`` / ``log_cooc_max``  log1p of the sum / max over history items h of the number
  of training users who interacted with both the item and h (item-item co-occurrence);
* ``cos_sum`` / ``cos_max``  the same co-occurrences as cosine similarities
  cooc / sqrt(pop_item * pop_h) (ItemKNN-style, less dominated by popular items).

Sparse ids: ``user`` (``n_users`` = the unknown-user row), ``item``, and ``category`` / ``brand``
when the data has them (``n`` = the unknown row). History bag: the user's most recent
``history_len`` items other than the row's item, a variable-length (jagged) feature mean-pooled
through the *item* table, so item . mean(history) is a learned item-item similarity that carries
over to users and pairs never seen in training (padded with -1 as a [B, L] array so the training
loop can slice rows; turned into a ``KeyedJaggedTensor`` per batch). Unknown users at training time do not exist,
so a small share of training rows have their user id replaced by the unknown row ("id
dropout"), which gives cold users a trained average-user embedding instead of a random one.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from reasonrec.tools.base import ToolData, ToolInputError

DENSE_FEATURES = (
    "log_hist_len",
    "log_item_pop",
    "cat_affinity",
    "brand_affinity",
    "log_cooc_sum",
    "log_cooc_max",
    "cos_sum",
    "cos_max",
)
BASIC_DENSE = DENSE_FEATURES[:4]


def _sorted_keys(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    return np.unique(users.astype(np.int64) * n_items + items.astype(np.int64))


def _member(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), bool)
    pos = np.searchsorted(sorted_keys, keys)
    return sorted_keys[np.minimum(pos, len(sorted_keys) - 1)] == keys


class CTRFeaturizer:
    """Fitted statistics (popularity, training pairs, vocabularies) and the per-row features."""

    def __init__(
        self,
        n_users: int,
        n_items: int,
        item_category: np.ndarray | None,
        item_brand: np.ndarray | None,
        train_users: np.ndarray,
        train_items: np.ndarray,
        dense_features: Sequence[str] = BASIC_DENSE,
        n_folds: int = 5,
    ):
        unknown = [f for f in dense_features if f not in DENSE_FEATURES]
        if unknown:
            raise ValueError(f"unknown dense features {unknown}; known: {DENSE_FEATURES}")
        self.n_users, self.n_items = int(n_users), int(n_items)
        self.item_category = None if item_category is None else np.asarray(item_category, np.int64)
        self.item_brand = None if item_brand is None else np.asarray(item_brand, np.int64)
        self.train_users = np.asarray(train_users, np.int64)
        self.train_items = np.asarray(train_items, np.int64)
        self.dense_features = tuple(dense_features)
        self.pair_keys = _sorted_keys(self.train_users, self.train_items, self.n_items)
        uniq_items = self.pair_keys % self.n_items
        self.popularity = np.bincount(uniq_items, minlength=self.n_items).astype(np.float64)
        self.n_folds = int(n_folds)
        if self.n_folds < 2:
            raise ValueError("n_folds must be >= 2")
        pair_fold = self.fold_of(self.pair_keys // self.n_items, uniq_items)
        # popularity of each item inside each fold: out-of-fold count = popularity - fold count
        self.fold_popularity = np.zeros((self.n_folds, self.n_items))
        np.add.at(self.fold_popularity, (pair_fold, uniq_items), 1.0)
        self.n_categories = (
            int(self.item_category.max()) + 1 if self.item_category is not None and len(self.item_category) else 0
        )
        self.n_brands = int(self.item_brand.max()) + 1 if self.item_brand is not None and len(self.item_brand) else 0
        self._cooc: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # fold (-1: all pairs) -> table
        self.mean = np.zeros(len(self.dense_features), np.float32)
        self.std = np.ones(len(self.dense_features), np.float32)

    @classmethod
    def from_data(cls, data: ToolData, dense_features: Sequence[str] = BASIC_DENSE, n_folds: int = 5) -> CTRFeaturizer:
        users = np.concatenate(
            [np.full(len(s), u, np.int64) for u, s in enumerate(data.train_seqs)] or [np.zeros(0, np.int64)]
        )
        items = np.concatenate([np.asarray(s, np.int64) for s in data.train_seqs] or [np.zeros(0, np.int64)])
        return cls(
            data.n_users, data.n_items, data.item_category, data.item_brand, users, items, dense_features, n_folds
        )

    def fold_of(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Fold of each (user, item) pair: a fixed integer hash, so it needs no stored table."""
        h = (np.asarray(users, np.uint64) * np.uint64(0x9E3779B1) + np.asarray(items, np.uint64)) * np.uint64(
            0x85EBCA77
        )
        return ((h >> np.uint64(29)) % np.uint64(self.n_folds)).astype(np.int64)

    # ----------------------------------------------------------------------------- sparse
    @property
    def sparse_names(self) -> list[str]:
        names = ["user", "item"]
        if self.item_category is not None:
            names.append("category")
        if self.item_brand is not None:
            names.append("brand")
        return names

    @property
    def sparse_sizes(self) -> list[int]:
        """Embedding rows per sparse feature (each with one extra 'unknown' row except item)."""
        sizes = {
            "user": self.n_users + 1,
            "item": self.n_items,
            "category": self.n_categories + 1,
            "brand": self.n_brands + 1,
        }
        return [sizes[n] for n in self.sparse_names]

    def sparse(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """[B, F] int64 ids in ``sparse_names`` order."""
        users = np.asarray(users, np.int64)
        items = np.asarray(items, np.int64)
        u = np.where((users >= 0) & (users < self.n_users), users, self.n_users)
        cols = [u, items]
        if self.item_category is not None:
            c = self.item_category[items]
            cols.append(np.where(c >= 0, c, self.n_categories))
        if self.item_brand is not None:
            b = self.item_brand[items]
            cols.append(np.where(b >= 0, b, self.n_brands))
        return np.stack(cols, axis=1)

    # ------------------------------------------------------------------------------ dense
    def _cooc_table(self, fold: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """Item-item co-occurrence C = X^T X over the distinct training pairs (all of them, or
        those outside ``fold``), diagonal dropped, as sorted keys ``i * n_items + j`` and counts
        (built lazily, once per fold)."""
        if fold not in self._cooc:
            import scipy.sparse as sp  # scipy ships with xgboost; only needed for co-occurrence

            users = self.pair_keys // self.n_items
            items = self.pair_keys % self.n_items
            if fold >= 0:
                keep = self.fold_of(users, items) != fold
                users, items = users[keep], items[keep]
            n_rows = int(users.max()) + 1 if len(users) else 1
            x = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=(n_rows, self.n_items))
            c = (x.T @ x).tocoo()
            off = c.row != c.col
            keys = c.row[off].astype(np.int64) * self.n_items + c.col[off]
            order = np.argsort(keys)
            self._cooc[fold] = (keys[order], c.data[off][order].astype(np.float64))
        return self._cooc[fold]

    @staticmethod
    def _lookup(table: tuple[np.ndarray, np.ndarray], q: np.ndarray) -> np.ndarray:
        keys, counts = table
        if len(keys) == 0 or len(q) == 0:
            return np.zeros(len(q))
        pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        return np.where(keys[pos] == q, counts[pos], 0.0)

    def dense_raw(
        self, users: np.ndarray, items: np.ndarray, histories: Sequence[np.ndarray], oof: bool = False
    ) -> np.ndarray:
        """[B, D] float32 unstandardised dense features; ``oof=True`` for training rows (see the
        module docstring)."""
        users = np.asarray(users, np.int64)
        items = np.asarray(items, np.int64)
        b = len(items)
        lens = np.fromiter((len(h) for h in histories), dtype=np.int64, count=b)
        hist = (
            np.concatenate([np.asarray(h, np.int64) for h in histories]) if b and lens.sum() else np.zeros(0, np.int64)
        )
        if hist.size and (hist.min() < 0 or hist.max() >= self.n_items):
            bad = hist[(hist < 0) | (hist >= self.n_items)][0]
            raise ToolInputError(f"unknown item id {int(bad)} in a history (catalog has {self.n_items} items)")
        row = np.repeat(np.arange(b), lens)
        keep = hist != items[row]  # the item itself is not evidence for itself
        row, hist = row[keep], hist[keep]
        n_hist = np.maximum(lens.astype(np.float64), 1.0)
        k = self.n_folds
        if oof:
            fold = self.fold_of(users, items)
            s1 = k / (k - 1.0)
            pop_i = (self.popularity[items] - self.fold_popularity[fold, items]) * s1
            pop_h = (self.popularity[hist] - self.fold_popularity[fold[row], hist]) * s1
        else:
            known_user = (users >= 0) & (users < self.n_users)
            self_in_train = known_user & _member(self.pair_keys, users * self.n_items + items)
            pop_i = np.maximum(self.popularity[items] - self_in_train, 0.0)
            pop_h = self.popularity[hist]
        out = {"log_hist_len": np.log1p(lens.astype(np.float64)), "log_item_pop": np.log1p(pop_i)}

        def affinity(attr: np.ndarray | None) -> np.ndarray:
            if attr is None:
                return np.zeros(b)
            a_item = attr[items]
            same = (attr[hist] == a_item[row]) & (a_item[row] >= 0)
            return np.bincount(row, weights=same.astype(np.float64), minlength=b) / n_hist

        out["cat_affinity"] = affinity(self.item_category)
        out["brand_affinity"] = affinity(self.item_brand)
        if any(f.startswith(("log_cooc", "cos_")) for f in self.dense_features):
            q = items[row] * self.n_items + hist
            if oof:
                vals = np.zeros(len(row))
                for f in range(k):
                    sel = fold[row] == f
                    if sel.any():
                        vals[sel] = self._lookup(self._cooc_table(f), q[sel])
                vals *= (k / (k - 1.0)) ** 2
            else:
                vals = self._lookup(self._cooc_table(), q)
                # remove this user's own contribution to C[item, h]
                own = self_in_train[row] & _member(self.pair_keys, users[row] * self.n_items + hist)
                vals = np.maximum(vals - own, 0.0)
            cos = vals / np.sqrt(np.maximum(pop_i[row], 1.0) * np.maximum(pop_h, 1.0))
            for name, v, transform in (("log_cooc", vals, np.log1p), ("cos", cos, lambda x: x)):
                m = np.zeros(b)
                if len(row):
                    np.maximum.at(m, row, v)
                out[f"{name}_sum"] = transform(np.bincount(row, weights=v, minlength=b))
                out[f"{name}_max"] = transform(m)
        return np.stack([out[f] for f in self.dense_features], axis=1).astype(np.float32)

    def history_matrix(self, items: np.ndarray, histories: Sequence[np.ndarray], max_len: int) -> np.ndarray:
        """[B, max_len] int32: the last ``max_len`` history items other than the row's item,
        left-aligned, padded with -1."""
        items = np.asarray(items, np.int64)
        b = len(items)
        out = np.full((b, max_len), -1, np.int32)
        if max_len == 0 or b == 0:
            return out
        lens = np.fromiter((len(h) for h in histories), dtype=np.int64, count=b)
        if lens.sum() == 0:
            return out
        hist = np.concatenate([np.asarray(h, np.int64) for h in histories])
        row = np.repeat(np.arange(b), lens)
        keep = hist != items[row]
        row, hist = row[keep], hist[keep]
        cnt = np.bincount(row, minlength=b)
        start = np.concatenate([[0], np.cumsum(cnt)[:-1]])
        idx = np.arange(len(row)) - start[row]  # position inside the row
        col = idx - np.maximum(cnt[row] - max_len, 0)  # keep the most recent max_len
        sel = col >= 0
        out[row[sel], col[sel]] = hist[sel]
        return out

    def fit_scaler(self, raw: np.ndarray) -> None:
        self.mean = raw.mean(axis=0).astype(np.float32)
        self.std = np.maximum(raw.std(axis=0), 1e-6).astype(np.float32)

    def dense(self, users, items, histories, oof: bool = False) -> np.ndarray:
        return ((self.dense_raw(users, items, histories, oof=oof) - self.mean) / self.std).astype(np.float32)

    # ---------------------------------------------------------------------------- save/load
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        config = {
            "n_users": self.n_users,
            "n_items": self.n_items,
            "dense_features": list(self.dense_features),
            "n_folds": self.n_folds,
            "has_category": self.item_category is not None,
            "has_brand": self.item_brand is not None,
        }
        arrays = {
            "feat.train_users": self.train_users,
            "feat.train_items": self.train_items,
            "feat.mean": self.mean,
            "feat.std": self.std,
        }
        if self.item_category is not None:
            arrays["feat.item_category"] = self.item_category
        if self.item_brand is not None:
            arrays["feat.item_brand"] = self.item_brand
        return config, arrays

    @classmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> CTRFeaturizer:
        f = cls(
            config["n_users"],
            config["n_items"],
            arrays.get("feat.item_category") if config["has_category"] else None,
            arrays.get("feat.item_brand") if config["has_brand"] else None,
            arrays["feat.train_users"],
            arrays["feat.train_items"],
            config["dense_features"],
            int(config.get("n_folds", 5)),
        )
        f.mean = np.asarray(arrays["feat.mean"], np.float32)
        f.std = np.asarray(arrays["feat.std"], np.float32)
        return f


def check_ctr_input(n_items: int, users: np.ndarray, items: np.ndarray, histories: Sequence[np.ndarray]) -> None:
    users, items = np.asarray(users), np.asarray(items)
    if users.shape != items.shape or users.ndim != 1:
        raise ToolInputError(f"users {users.shape} and items {items.shape} must be equal-length 1-d arrays")
    if len(histories) != len(users):
        raise ToolInputError(f"{len(users)} rows but {len(histories)} histories")
    bad = items[(items < 0) | (items >= n_items)]
    if bad.size:
        raise ToolInputError(f"unknown item id {int(bad[0])} (catalog has {n_items} items)")


def ctr_rows(data: ToolData, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if split not in data.ctr:
        raise ToolInputError(f"ToolData has no CTR '{split}' split (have {sorted(data.ctr)})")
    u, i, y = data.ctr[split]
    return np.asarray(u, np.int64), np.asarray(i, np.int64), np.asarray(y, np.float32)


def histories_for(data: ToolData, users: np.ndarray) -> list[np.ndarray]:
    empty = np.zeros(0, np.int64)
    return [data.train_seqs[u] if 0 <= u < data.n_users else empty for u in users]


# -------------------------------------------------------------------------------- TorchRec


def make_kjt(ids: torch.Tensor, keys: Sequence[str], hist: torch.Tensor | None = None):
    """A KeyedJaggedTensor with one id per (feature, row) from ids [B, F], plus the jagged
    ``history`` feature from a -1-padded [B, L] matrix when ``hist`` has columns."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    b, f = ids.shape
    values = [ids.T.reshape(-1)]
    lengths = [torch.ones(b * f, dtype=torch.int32)]
    keys = list(keys)
    if hist is not None and hist.shape[1] > 0:
        mask = hist >= 0
        values.append(hist[mask].to(torch.int64))
        lengths.append(mask.sum(dim=1).to(torch.int32))
        keys.append("history")
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values).contiguous(), lengths=torch.cat(lengths)
    )


def make_ebc(
    names: Sequence[str], sizes: Sequence[int], dim: int, device: str | torch.device = "cpu", history: bool = False
):
    """One embedding table per sparse feature, all of width ``dim`` (DLRM's interaction needs
    equal widths). With ``history`` the item table also serves the ``history`` feature, mean
    pooled (a mean over one id is that id's row, so ``item`` is unaffected)."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.modules.embedding_configs import PoolingType

    tables = [
        EmbeddingBagConfig(
            name=f"t_{n}",
            embedding_dim=dim,
            num_embeddings=int(s),
            feature_names=[n, "history"] if (n == "item" and history) else [n],
            pooling=PoolingType.MEAN,
        )
        for n, s in zip(names, sizes)
    ]
    return EmbeddingBagCollection(tables=tables, device=torch.device(device))
