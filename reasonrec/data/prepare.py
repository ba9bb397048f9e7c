"""Row-level logic of the ``prepare`` stage: validation, per-user sequences, task splits, negatives.

Every function takes and returns Arrow tables or pandas batches and knows nothing of Ray, so the
batch job (``ray_jobs/prepare.py``) maps them over Ray Data blocks and tests call them directly.
Randomness is per user, seeded by ``(seed, user_id)``, so results do not depend on how Ray
partitions the data.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from reasonrec.data import schemas
from reasonrec.data.evidence import EHNormalizer, bucket

KEY_SEP = "\x1f"  # joins (domain, item_key) into one lookup key; never occurs in source keys


# ------------------------------------------------------------------------------ validation
def _reason_column(table: pa.Table, checks: list[tuple[str, pa.Array]]) -> pa.Array:
    """First failing check's reason per row (null when the row is fine)."""
    reason = table.column("error").combine_chunks() if "error" in table.column_names else pa.nulls(table.num_rows, pa.string())
    reason = pc.if_else(pc.is_valid(reason), pc.binary_join_element_wise("parse error: ", reason, ""), reason)
    for text, bad in checks:
        reason = pc.if_else(pc.and_(pc.is_null(reason), bad), pa.scalar(text), reason)
    return reason


def _blank(col: pa.ChunkedArray) -> pa.Array:
    return pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_trim_whitespace(col), "")).fill_null(True)


def _conform_keep_order(table: pa.Table, schema: pa.Schema) -> pa.Table:
    out = schemas.conform(table, schema)
    return out.append_column("_order", table.column("_order")) if "_order" in table.column_names else out


def validate_interactions(table: pa.Table) -> pa.Table:
    """RAW_INTERACTIONS plus a ``reason`` column: null for a good row, else why it is quarantined.
    A ``_order`` column (source order, the tie-break for equal timestamps) is carried through."""
    table = _conform_keep_order(table, schemas.RAW_INTERACTIONS)
    rating = table.column("rating")
    checks = [
        ("missing user key", _blank(table.column("user_key"))),
        ("missing item key", _blank(table.column("item_key"))),
        ("missing timestamp", pc.is_null(table.column("ts"))),
        ("negative timestamp", pc.less(table.column("ts"), 0).fill_null(False)),
        ("rating not a finite number >= 0",
         pc.or_(pc.is_nan(rating).fill_null(False), pc.less(rating, 0).fill_null(False))),
    ]
    return table.append_column("reason", _reason_column(table, checks))


def validate_items(table: pa.Table) -> pa.Table:
    table = _conform_keep_order(table, schemas.RAW_ITEMS)
    price = table.column("price")
    checks = [
        ("missing item key", _blank(table.column("item_key"))),
        ("negative price", pc.less(price, 0).fill_null(False)),
    ]
    return table.append_column("reason", _reason_column(table, checks))


def to_quarantine(table: pa.Table, table_name: str) -> pa.Table:
    """Rows with a ``reason`` as QUARANTINE records (the row as JSON, binary fields elided)."""
    drop = [f.name for f in table.schema if pa.types.is_binary(f.type)] + ["reason"]
    records = table.drop_columns([c for c in drop if c in table.column_names]).to_pylist()
    return pa.table({
        "table": pa.array([table_name] * table.num_rows, pa.string()),
        "reason": table.column("reason").cast(pa.string()),
        "record": pa.array([json.dumps(r, default=str, sort_keys=True) for r in records], pa.string()),
    }, schema=schemas.QUARANTINE)


def item_lookup_key(domain: pa.Array, item_key: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(domain.fill_null(""), item_key, KEY_SEP)


# ------------------------------------------------------------------------------ id remapping
def remap_interactions(table: pa.Table, user_keys: pa.Array, item_lookup: pa.Array) -> pa.Table:
    """Attach dense ``user_id``/``item_id``: the position of the key in the sorted key arrays
    (deterministic: ids follow the sorted source keys, not the order rows arrive in)."""
    uid = pc.index_in(table.column("user_key"), value_set=user_keys)
    iid = pc.index_in(item_lookup_key(table.column("domain"), table.column("item_key")), value_set=item_lookup)
    return table.append_column("user_id", uid.cast(pa.int64())).append_column("item_id", iid.cast(pa.int64()))


# ------------------------------------------------------------------------- per-user sequences
SEQUENCE_SCHEMA = pa.schema([
    ("user_id", pa.int64()),
    ("user_key", pa.string()),
    ("domain", pa.string()),
    ("items", pa.list_(pa.int64())),
    ("ts", pa.list_(pa.int64())),
    ("ratings", pa.list_(pa.float32())),
    ("reviews", pa.list_(pa.string())),
    ("n_train", pa.int64()),
    ("duplicates", pa.list_(pa.string())),   # exact duplicate rows removed, as JSON records
])


def _group_offsets(sorted_ids: np.ndarray) -> np.ndarray:
    """Start offsets of runs of equal values in a sorted id array, plus the total length."""
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) if len(sorted_ids) else np.empty(0, np.int64)
    return np.r_[starts, len(sorted_ids)].astype(np.int32)


def build_sequences(block: pa.Table) -> pa.Table:
    """All users of one hash partition (every row of a user is in the block) -> one row per user:
    time-ordered items (equal timestamps keep source order), exact duplicates (same item, same
    ts) removed and reported. Repeat consumption at different times is kept: it is real
    sequential behaviour. Vectorised over the block (one call per partition, not per user)."""
    if block.num_rows == 0:
        return SEQUENCE_SCHEMA.empty_table()
    t = block.sort_by([("user_id", "ascending"), ("ts", "ascending"), ("item_id", "ascending"), ("_order", "ascending")])
    u, it, ts = (t.column(c).to_numpy() for c in ("user_id", "item_id", "ts"))
    dup = np.r_[False, (u[1:] == u[:-1]) & (it[1:] == it[:-1]) & (ts[1:] == ts[:-1])]
    dups = t.filter(pa.array(dup))
    t = t.filter(pa.array(~dup)).sort_by([("user_id", "ascending"), ("ts", "ascending"), ("_order", "ascending")])
    uid = t.column("user_id").to_numpy()
    off = _group_offsets(uid)
    first = off[:-1]
    lens = np.diff(off)
    offsets = pa.array(off, pa.int32())

    def lists(col: str, typ: pa.DataType) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, t.column(col).combine_chunks().cast(typ))

    users = uid[first]
    domains = t.column("domain").take(pa.array(first))
    if pc.count_distinct(t.column("domain")).as_py() > 1:  # multi-domain: list every domain of the user
        agg = t.group_by("user_id").aggregate([("domain", "distinct")]).to_pydict()
        joined = {k: "+".join(sorted(v)) for k, v in zip(agg["user_id"], agg["domain_distinct"])}
        domains = pa.array([joined[k] for k in users.tolist()], pa.string())
    dup_by_user: dict[int, list[str]] = {}
    for r in dups.select(["user_id", "user_key", "item_key", "ts"]).to_pylist():
        dup_by_user.setdefault(r["user_id"], []).append(
            json.dumps({"user_key": r["user_key"], "item_key": r["item_key"], "ts": r["ts"]}))
    return pa.table({
        "user_id": pa.array(users, pa.int64()),
        "user_key": t.column("user_key").take(pa.array(first)),
        "domain": domains,
        "items": lists("item_id", pa.int64()),
        "ts": lists("ts", pa.int64()),
        "ratings": lists("rating", pa.float32()),
        "reviews": lists("review", pa.string()),
        "n_train": pa.array(np.where(lens >= 3, lens - 2, lens), pa.int64()),
        "duplicates": pa.array([dup_by_user.get(k, []) for k in users.tolist()], pa.list_(pa.string())),
    }, schema=SEQUENCE_SCHEMA)


def dedup_items(block: pa.Table) -> pa.Table:
    """One hash partition of items (every row of a key in the block): the first row of each
    (domain, item_key) is kept; later rows get reason "duplicate item row"."""
    t = block.sort_by([("_ikey", "ascending"), ("_order", "ascending")])
    k = t.column("_ikey").to_numpy(zero_copy_only=False)
    dup = np.r_[False, k[1:] == k[:-1]] if len(k) else np.empty(0, bool)
    reason = pc.if_else(pa.array(dup), pa.scalar("duplicate item row"), pa.scalar(None, pa.string()))
    return t.append_column("reason", reason)


# ----------------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class SplitParams:
    n_items: int
    seed: int
    direct_negatives: int
    ctr_negatives: int
    ctr_split: tuple[float, float, float]
    explanation_split: tuple[float, float, float]
    eh_thresholds: tuple[float, float]


def user_rng(seed: int, user_id: int, stream: int) -> np.random.Generator:
    """Independent, partition-free random stream per (user, purpose)."""
    return np.random.default_rng([seed, int(user_id), stream])


def sample_negatives(rng: np.random.Generator, n_items: int, exclude: np.ndarray, k: int) -> np.ndarray:
    """``k`` distinct items uniformly from the catalog minus ``exclude`` (fewer if the catalog is
    too small). Rejection sampling: the excluded set is tiny next to the catalog in practice."""
    exclude = np.unique(np.asarray(exclude, dtype=np.int64))
    available = n_items - len(exclude)
    k = max(0, min(k, available))
    if k == 0:
        return np.empty(0, dtype=np.int64)
    if available <= 4 * k:  # dense case: enumerate the complement
        pool = np.setdiff1d(np.arange(n_items, dtype=np.int64), exclude, assume_unique=True)
        return rng.choice(pool, size=k, replace=False)
    out = np.empty(0, dtype=np.int64)
    while len(out) < k:
        draw = rng.integers(0, n_items, size=2 * k)
        draw = draw[~np.isin(draw, exclude)]
        out = np.unique(np.concatenate([out, draw]))
    return rng.permutation(out)[:k]


def users_table(seqs: pd.DataFrame, normalizer: EHNormalizer, thresholds) -> pd.DataFrame:
    eh = normalizer(seqs["n_train"].to_numpy())
    return pd.DataFrame({
        "user_id": seqs["user_id"].astype("int64"),
        "user_key": seqs["user_key"],
        "domain": seqs["domain"],
        "n_train": seqs["n_train"].astype("int64"),
        "evidence_horizon": eh.astype("float32"),
        "eh_bucket": bucket(eh, thresholds),
    })


def interactions_table(seqs: pd.DataFrame) -> pd.DataFrame:
    lens = seqs["items"].map(len).to_numpy()
    return pd.DataFrame({
        "user_id": np.repeat(seqs["user_id"].to_numpy(np.int64), lens),
        "item_id": np.concatenate(list(seqs["items"])) if len(seqs) else np.empty(0, np.int64),
        "ts": np.concatenate(list(seqs["ts"])) if len(seqs) else np.empty(0, np.int64),
        "rating": np.concatenate(list(seqs["ratings"])).astype("float32") if len(seqs) else np.empty(0, np.float32),
        "review": [r for revs in seqs["reviews"] for r in revs],
    })


def loo_table(seqs: pd.DataFrame) -> pd.DataFrame:
    """Leave-one-out: last item test, second last valid, the rest train (users with < 3
    interactions: all train, no targets)."""
    rows = []
    for uid, items, ts in zip(seqs["user_id"], seqs["items"], seqs["ts"]):
        items, ts = np.asarray(items, np.int64), np.asarray(ts, np.int64)
        if len(items) >= 3:
            rows.append((uid, items[:-2], ts[:-2], int(items[-2]), int(items[-1])))
        else:
            rows.append((uid, items, ts, None, None))
    df = pd.DataFrame(rows, columns=["user_id", "train_items", "train_ts", "valid_item", "test_item"])
    for col in ("valid_item", "test_item"):
        df[col] = df[col].astype("Int64")
    return df


def direct_candidates_table(seqs: pd.DataFrame, p: SplitParams) -> pd.DataFrame:
    """For valid and test targets: the positive plus ``direct_negatives`` items the user never
    interacted with (anywhere in their history), shuffled. A user for whom the catalog has too few
    such items gets no candidate list (every list has the same length, as the protocol needs)."""
    rows = []
    for uid, items in zip(seqs["user_id"], seqs["items"]):
        items = np.asarray(items, np.int64)
        if len(items) < 3:
            continue
        rng = user_rng(p.seed, uid, 1)
        for split, pos in (("valid", items[-2]), ("test", items[-1])):
            negs = sample_negatives(rng, p.n_items, items, p.direct_negatives)
            if len(negs) < p.direct_negatives:
                break
            cands = rng.permutation(np.concatenate([[pos], negs]))
            rows.append((uid, split, int(pos), cands))
    return pd.DataFrame(rows, columns=["user_id", "split", "positive", "candidates"])


def _three_way(rng: np.random.Generator, n: int, fractions) -> np.ndarray:
    """Split labels for n rows with the given fractions; with n >= 3 every split gets >= 1 row."""
    labels = np.array(["train"] * n, dtype=object)
    if n < 3:
        return labels
    n_valid = max(1, int(round(fractions[1] * n)))
    n_test = max(1, int(round(fractions[2] * n)))
    n_valid = min(n_valid, n - 2)
    n_test = min(n_test, n - 1 - n_valid)
    order = rng.permutation(n)
    labels[order[:n_valid]] = "valid"
    labels[order[n_valid:n_valid + n_test]] = "test"
    return labels


def ctr_table(seqs: pd.DataFrame, p: SplitParams) -> pd.DataFrame:
    """Positives = the user's distinct items, split 8:1:1 per user (every user with >= 3 items in
    all three splits); each positive gets ``ctr_negatives`` never-interacted items in its split."""
    users, items_out, labels, splits = [], [], [], []
    for uid, items in zip(seqs["user_id"], seqs["items"]):
        pos = np.unique(np.asarray(items, np.int64))
        rng = user_rng(p.seed, uid, 2)
        split_of = _three_way(rng, len(pos), p.ctr_split)
        negs = sample_negatives(rng, p.n_items, pos, len(pos) * p.ctr_negatives)
        neg_split = np.repeat(split_of, p.ctr_negatives)[:len(negs)]
        users.append(np.full(len(pos) + len(negs), uid, np.int64))
        items_out.append(np.concatenate([pos, negs]))
        labels.append(np.concatenate([np.ones(len(pos), np.int8), np.zeros(len(negs), np.int8)]))
        splits.append(np.concatenate([split_of, neg_split]))
    if not users:
        return pd.DataFrame({c: [] for c in ("user_id", "item_id", "label", "split")})
    return pd.DataFrame({"user_id": np.concatenate(users), "item_id": np.concatenate(items_out),
                         "label": np.concatenate(labels), "split": np.concatenate(splits)})


def explanation_table(seqs: pd.DataFrame, p: SplitParams) -> pd.DataFrame:
    """Interactions that carry review text, split 8:1:1 per user."""
    rows = []
    for uid, items, ratings, reviews in zip(seqs["user_id"], seqs["items"], seqs["ratings"], seqs["reviews"]):
        idx = [i for i, r in enumerate(reviews) if isinstance(r, str) and r.strip()]
        if not idx:
            continue
        split_of = _three_way(user_rng(p.seed, uid, 3), len(idx), p.explanation_split)
        for i, s in zip(idx, split_of):
            rows.append((uid, int(items[i]), float(ratings[i]) if ratings[i] == ratings[i] else None, reviews[i], s))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "review", "split"])


def timeshift_table(inter: pd.DataFrame, cutoff: int) -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": inter["user_id"], "item_id": inter["item_id"], "ts": inter["ts"],
        "split": np.where(inter["ts"].to_numpy() < cutoff, "train", "test"),
    })


def to_arrow(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return schemas.conform(pa.Table.from_pandas(df, preserve_index=False), schema)
