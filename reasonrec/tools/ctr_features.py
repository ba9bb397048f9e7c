"""Shared CTR feature building: sparse ids (user, item, category, brand) and dense features per
(user, item, history) row, plus the TorchRec ``KeyedJaggedTensor`` batch for DLRM / DCNv2.

Dense features (``DENSE_FEATURES``), each computed *leave-self-out*: as if the row's own
(user, item) interaction were unknown, so a training positive (whose item is in the user's
history) and a test positive (whose item is not, or whose interaction is removed here) look alike.
Without this a model learns "the item is in the history" and fails on held-out rows.

* ``log_hist_len``   log1p of the history length without the row's item;
* ``log_item_pop``   log1p of the item's training count, minus this user's own interaction;
* ``cat_affinity``   share of the other history items with the item's category (0 if unknown);
* ``brand_affinity`` the same for brand;
* ``log_cooc_sum`` / ``log_cooc_max``  log1p of the sum / max over history items h of the number
  of *other* training users who interacted with both the item and h (item-item co-occurrence).

Sparse ids: ``user`` (``n_users`` = the unknown-user row), ``item``, and ``category`` / ``brand``
when the data has them (``n`` = the unknown row). Unknown users at training time do not exist,
so a small share of training rows have their user id replaced by the unknown row ("id
dropout"), which gives cold users a trained average-user embedding instead of a random one.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from reasonrec.tools.base import ToolData, ToolInputError

DENSE_FEATURES = ("log_hist_len", "log_item_pop", "cat_affinity", "brand_affinity", "log_cooc_sum", "log_cooc_max")
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

    def __init__(self, n_users: int, n_items: int, item_category: np.ndarray | None,
                 item_brand: np.ndarray | None, train_users: np.ndarray, train_items: np.ndarray,
                 dense_features: Sequence[str] = BASIC_DENSE):
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
        self.n_categories = int(self.item_category.max()) + 1 if self.item_category is not None and len(self.item_category) else 0
        self.n_brands = int(self.item_brand.max()) + 1 if self.item_brand is not None and len(self.item_brand) else 0
        self._cooc = None
        self.mean = np.zeros(len(self.dense_features), np.float32)
        self.std = np.ones(len(self.dense_features), np.float32)

    @classmethod
    def from_data(cls, data: ToolData, dense_features: Sequence[str] = BASIC_DENSE) -> "CTRFeaturizer":
        users = np.concatenate([np.full(len(s), u, np.int64) for u, s in enumerate(data.train_seqs)] or [np.zeros(0, np.int64)])
        items = np.concatenate([np.asarray(s, np.int64) for s in data.train_seqs] or [np.zeros(0, np.int64)])
        return cls(data.n_users, data.n_items, data.item_category, data.item_brand, users, items, dense_features)

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
        sizes = {"user": self.n_users + 1, "item": self.n_items,
                 "category": self.n_categories + 1, "brand": self.n_brands + 1}
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
    def _cooc_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Item-item co-occurrence C = X^T X (X: distinct user-item training pairs), diagonal
        dropped, as sorted keys ``i * n_items + j`` and counts (built once, lazily)."""
        if self._cooc is None:
            import scipy.sparse as sp  # scipy ships with xgboost; only needed for co-occurrence
            users = self.pair_keys // self.n_items
            items = self.pair_keys % self.n_items
            n_rows = int(users.max()) + 1 if len(users) else 1
            x = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=(n_rows, self.n_items))
            c = (x.T @ x).tocoo()
            off = c.row != c.col
            keys = c.row[off].astype(np.int64) * self.n_items + c.col[off]
            order = np.argsort(keys)
            self._cooc = (keys[order], c.data[off][order].astype(np.float64))
        return self._cooc

    def dense_raw(self, users: np.ndarray, items: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        """[B, D] float32 unstandardised dense features."""
        users = np.asarray(users, np.int64)
        items = np.asarray(items, np.int64)
        b = len(items)
        lens = np.fromiter((len(h) for h in histories), dtype=np.int64, count=b)
        hist = np.concatenate([np.asarray(h, np.int64) for h in histories]) if b and lens.sum() else np.zeros(0, np.int64)
        if hist.size and (hist.min() < 0 or hist.max() >= self.n_items):
            bad = hist[(hist < 0) | (hist >= self.n_items)][0]
            raise ToolInputError(f"unknown item id {int(bad)} in a history (catalog has {self.n_items} items)")
        row = np.repeat(np.arange(b), lens)
        keep = hist != items[row]            # leave-self-out
        row, hist = row[keep], hist[keep]
        n_other = np.bincount(row, minlength=b).astype(np.float64)
        known_user = (users >= 0) & (users < self.n_users)
        self_in_train = known_user & _member(self.pair_keys, users * self.n_items + items)
        out = {}
        out["log_hist_len"] = np.log1p(n_other)
        out["log_item_pop"] = np.log1p(np.maximum(self.popularity[items] - self_in_train, 0.0))

        def affinity(attr: np.ndarray | None) -> np.ndarray:
            if attr is None:
                return np.zeros(b)
            a_item = attr[items]
            same = (attr[hist] == a_item[row]) & (a_item[row] >= 0)
            return np.bincount(row, weights=same.astype(np.float64), minlength=b) / np.maximum(n_other, 1.0)

        out["cat_affinity"] = affinity(self.item_category)
        out["brand_affinity"] = affinity(self.item_brand)
        if "log_cooc_sum" in self.dense_features or "log_cooc_max" in self.dense_features:
            keys, counts = self._cooc_table()
            vals = np.zeros(len(row))
            if len(row) and len(keys):
                q = items[row] * self.n_items + hist
                pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
                vals = np.where(keys[pos] == q, counts[pos], 0.0)
                # remove this user's own contribution to C[item, h]
                own = self_in_train[row] & _member(self.pair_keys, users[row] * self.n_items + hist)
                vals = np.maximum(vals - own, 0.0)
            s = np.bincount(row, weights=vals, minlength=b)
            m = np.zeros(b)
            if len(row):
                np.maximum.at(m, row, vals)
            out["log_cooc_sum"] = np.log1p(s)
            out["log_cooc_max"] = np.log1p(m)
        return np.stack([out[f] for f in self.dense_features], axis=1).astype(np.float32)

    def fit_scaler(self, raw: np.ndarray) -> None:
        self.mean = raw.mean(axis=0).astype(np.float32)
        self.std = np.maximum(raw.std(axis=0), 1e-6).astype(np.float32)

    def dense(self, users, items, histories) -> np.ndarray:
        return ((self.dense_raw(users, items, histories) - self.mean) / self.std).astype(np.float32)

    # ---------------------------------------------------------------------------- save/load
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        config = {"n_users": self.n_users, "n_items": self.n_items, "dense_features": list(self.dense_features),
                  "has_category": self.item_category is not None, "has_brand": self.item_brand is not None}
        arrays = {"feat.train_users": self.train_users, "feat.train_items": self.train_items,
                  "feat.mean": self.mean, "feat.std": self.std}
        if self.item_category is not None:
            arrays["feat.item_category"] = self.item_category
        if self.item_brand is not None:
            arrays["feat.item_brand"] = self.item_brand
        return config, arrays

    @classmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> "CTRFeaturizer":
        f = cls(config["n_users"], config["n_items"],
                arrays.get("feat.item_category") if config["has_category"] else None,
                arrays.get("feat.item_brand") if config["has_brand"] else None,
                arrays["feat.train_users"], arrays["feat.train_items"], config["dense_features"])
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

def make_kjt(ids: torch.Tensor, keys: Sequence[str]):
    """A KeyedJaggedTensor with exactly one id per (feature, row) from ids [B, F]."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    b, f = ids.shape
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys), values=ids.T.reshape(-1).contiguous(),
        lengths=torch.ones(b * f, dtype=torch.int32))


def make_ebc(names: Sequence[str], sizes: Sequence[int], dim: int, device: str | torch.device = "cpu"):
    """One embedding table per sparse feature, all of width ``dim`` (DLRM's interaction needs
    equal widths)."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.modules.embedding_configs import PoolingType

    tables = [EmbeddingBagConfig(name=f"t_{n}", embedding_dim=dim, num_embeddings=int(s), feature_names=[n],
                                 pooling=PoolingType.SUM)
              for n, s in zip(names, sizes)]
    return EmbeddingBagCollection(tables=tables, device=torch.device(device))
