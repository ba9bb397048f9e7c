"""Build :class:`ToolData` from the ``prepare`` stage's tables (Arrow in, NumPy out)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa

from reasonrec.tools.base import ToolData


def item_text(items: pa.Table) -> list[str]:
    """Title, brand and categories as one string per item (ordered by item_id)."""
    d = items.sort_by("item_id").to_pydict()
    out = []
    for title, brand, cats, key in zip(d["title"], d["brand"], d["categories"], d["item_key"]):
        parts = [title or key or ""]
        if brand:
            parts.append(f"by {brand}")
        if cats:
            parts.append("(" + ", ".join(cats) + ")")
        out.append(" ".join(p for p in parts if p))
    return out


def _index(values: list) -> np.ndarray:
    """Dense index of each value (-1 for missing)."""
    vocab: dict = {}
    out = np.full(len(values), -1, dtype=np.int64)
    for i, v in enumerate(values):
        if v:
            out[i] = vocab.setdefault(v, len(vocab))
    return out


def tool_data_from_tables(
    items: pa.Table, loo: pa.Table, ctr: pa.Table | None = None, direct: pa.Table | None = None
) -> ToolData:
    n_items = items.num_rows
    loo = loo.sort_by("user_id")
    user_ids = loo.column("user_id").to_numpy()
    n_users = int(user_ids.max()) + 1 if len(user_ids) else 0
    train_seqs = [np.empty(0, dtype=np.int64)] * n_users
    for uid, seq in zip(user_ids, loo.column("train_items").to_pylist()):
        train_seqs[uid] = np.asarray(seq, dtype=np.int64)
    valid = np.full(n_users, -1, dtype=np.int64)
    test = np.full(n_users, -1, dtype=np.int64)
    valid[user_ids] = loo.column("valid_item").fill_null(-1).to_numpy()
    test[user_ids] = loo.column("test_item").fill_null(-1).to_numpy()
    srt = items.sort_by("item_id").to_pydict()
    data = ToolData(
        n_users=n_users,
        n_items=n_items,
        train_seqs=train_seqs,
        valid_item=valid,
        test_item=test,
        item_text=item_text(items),
        item_category=_index([c[0] if c else None for c in srt["categories"]]),
        item_brand=_index(srt["brand"]),
    )
    if ctr is not None:
        for split in ("train", "valid", "test"):
            t = ctr.filter(pa.compute.equal(ctr.column("split"), split))
            data.ctr[split] = (
                t.column("user_id").to_numpy(),
                t.column("item_id").to_numpy(),
                t.column("label").to_numpy().astype(np.float32),
            )
    if direct is not None:
        v = direct.filter(pa.compute.equal(direct.column("split"), "valid"))
        data.direct_valid = (
            v.column("user_id").to_numpy(),
            np.asarray(v.column("candidates").to_pylist(), dtype=np.int64),
            v.column("positive").to_numpy(),
        )
    return data


def load_tool_data(store, with_ctr: bool = True, with_direct: bool = True) -> ToolData:
    """ToolData for a run (reads the committed ``prepare`` outputs from the artifact store)."""
    items = store.read_table("prepare", "items", columns=["item_id", "item_key", "title", "brand", "categories"])
    loo = store.read_table("prepare", "loo")
    ctr = store.read_table("prepare", "ctr") if with_ctr else None
    direct = store.read_table("prepare", "direct_candidates") if with_direct else None
    return tool_data_from_tables(items, loo, ctr, direct)


def hold_out_last(data: ToolData, n: int) -> ToolData:
    """``data`` with each user's last ``n`` training items removed, for tools whose answers on
    those transitions must be out-of-sample (the VLM's training hints: a tool scored on items it
    was trained on looks far more reliable than it is on test users). The first removed item is
    the user's validation item (the tools' own early stopping); there is no test item. CTR rows
    and direct validation lists are dropped: only ranking tools are trained on this."""
    if n < 1:
        raise ValueError(f"hold_out_last needs n >= 1, got {n}")
    seqs = [s[:-n] if len(s) > n else s[:0] for s in data.train_seqs]
    valid = np.array([s[len(s) - n] if len(s) > n else -1 for s in data.train_seqs], np.int64)
    return replace(
        data,
        train_seqs=seqs,
        valid_item=valid,
        test_item=np.full(data.n_users, -1, np.int64),
        ctr={},
        direct_valid=None,
    )
