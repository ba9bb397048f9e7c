"""Row-level logic of the ``prepare`` stage: validation, per-user sequences, task splits, negatives.

Every function takes and returns Arrow tables and knows nothing of Ray, so the batch job
(``ray_jobs/prepare.py``) maps them over Ray Data blocks and tests call them directly. The task
tables are computed for a whole block of users with array operations; their randomness is a hash
of ``(seed, user_id, ...)``, so results do not depend on how the users are partitioned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reasonrec.data import schemas
from reasonrec.data.evidence import EHNormalizer, bucket
from reasonrec.hashing import GOLDEN, hash_u64, mix64_

KEY_SEP = "\x1f"  # joins (domain, key) into one lookup key; never occurs in source keys


# ------------------------------------------------------------------------------ validation
def _reason_column(table: pa.Table, checks: list[tuple[str, pa.Array]]) -> pa.Array:
    """First failing check's reason per row (null when the row is fine)."""
    reason = (
        table.column("error").combine_chunks()
        if "error" in table.column_names
        else pa.nulls(table.num_rows, pa.string())
    )
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
        (
            "rating not a finite number >= 0",
            pc.or_(pc.is_nan(rating).fill_null(False), pc.less(rating, 0).fill_null(False)),
        ),
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
    return pa.table(
        {
            "table": pa.array([table_name] * table.num_rows, pa.string()),
            "reason": table.column("reason").cast(pa.string()),
            "record": pa.array([json.dumps(r, default=str, sort_keys=True) for r in records], pa.string()),
        },
        schema=schemas.QUARANTINE,
    )


def item_lookup_key(domain: pa.Array, item_key: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(domain.fill_null(""), item_key, KEY_SEP)


def user_lookup_key(domain: pa.Array, user_key: pa.Array) -> pa.Array:
    """Users are keyed by (domain, user_key), as items are: two sources' user "1" (P5 numbers
    every bundle's users from 1) are two users, each with the one domain of its history. Within
    one domain the lookup keys sort as the user keys do, so single-domain ids are unchanged."""
    return item_lookup_key(domain, user_key)


# ------------------------------------------------------------------------------ id remapping
def remap_interactions(table: pa.Table, user_lookup: pa.Array, item_lookup: pa.Array) -> pa.Table:
    """Attach dense ``user_id``/``item_id``: the position of the (domain, key) lookup key in the
    sorted lookup-key arrays (deterministic: ids follow the sorted source keys, not the order rows
    arrive in). For one process holding every key; the Ray job numbers keys across the cluster."""
    uid = pc.index_in(user_lookup_key(table.column("domain"), table.column("user_key")), value_set=user_lookup)
    iid = pc.index_in(item_lookup_key(table.column("domain"), table.column("item_key")), value_set=item_lookup)
    return table.append_column("user_id", uid.cast(pa.int64())).append_column("item_id", iid.cast(pa.int64()))


def distinct_keys(t: pa.Table, key: str, flag: str | None = None) -> pa.Table:
    """The sorted distinct ``key`` values of a block; with ``flag``, also the flag's max per key."""
    if flag is None:
        return pa.table({key: pc.unique(t.column(key)).sort()})
    g = t.group_by(key).aggregate([(flag, "max")])
    return pa.table({key: g.column(key), flag: g.column(f"{flag}_max")}).sort_by(key)


def key_range(t: pa.Table, key: str) -> tuple:
    """(first key, last key, rows) of a sorted block: all the driver needs to order blocks."""
    if t.num_rows == 0:
        return None, None, 0
    col = t.column(key)
    return col[0].as_py(), col[-1].as_py(), t.num_rows


def number_rows(t: pa.Table, offset: int, id_col: str) -> pa.Table:
    return t.append_column(id_col, pa.array(np.arange(offset, offset + t.num_rows, dtype=np.int64)))


def attach_ids(t: pa.Table, key: str, id_col: str) -> pa.Table:
    """A hash partition holding data rows (``id_col`` null) and the id rows of their keys (``id_col``
    set, one per key): the data rows with ``id_col`` taken from the id row of the same key (null
    where there is none, i.e. a left join)."""
    is_id = pc.is_valid(t.column(id_col))
    ids, data = t.filter(is_id), t.filter(pc.invert(is_id))
    idx = pc.index_in(data.column(key), value_set=ids.column(key).combine_chunks())
    return data.set_column(data.schema.get_field_index(id_col), id_col, ids.column(id_col).take(idx))


def stub_items(ids: pa.Table) -> pa.Table:
    """ITEMS rows (key and domain only) for numbered item lookup keys that the catalog lacks."""
    parts = pc.split_pattern(ids.column("_ikey"), KEY_SEP, max_splits=1)
    return schemas.conform(
        pa.table(
            {
                "item_id": ids.column("item_id"),
                "item_key": pc.list_element(parts, 1),
                "domain": pc.list_element(parts, 0),
            }
        ),
        schemas.ITEMS,
    )


# ------------------------------------------------------------------------- per-user sequences
SEQUENCE_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("user_key", pa.string()),
        ("domain", pa.string()),
        ("items", pa.list_(pa.int64())),
        ("ts", pa.list_(pa.int64())),
        ("ratings", pa.list_(pa.float32())),
        ("reviews", pa.list_(pa.string())),
        ("n_train", pa.int64()),
        ("duplicates", pa.list_(pa.string())),  # exact duplicate rows removed, as JSON records
    ]
)


def _group_offsets(sorted_ids: np.ndarray) -> np.ndarray:
    """Start offsets of runs of equal values in a sorted id array, plus the total length."""
    starts = (
        np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) if len(sorted_ids) else np.empty(0, np.int64)
    )
    return np.r_[starts, len(sorted_ids)].astype(np.int32)


def build_sequences(block: pa.Table) -> pa.Table:
    """All users of one hash partition (every row of a user is in the block) -> one row per user:
    time-ordered items (equal timestamps keep source order), exact duplicates (same item, same
    ts) removed and reported. Repeat consumption at different times is kept: it is real
    sequential behaviour. Vectorised over the block (one call per partition, not per user)."""
    if block.num_rows == 0:
        return SEQUENCE_SCHEMA.empty_table()
    t = block.sort_by(
        [("user_id", "ascending"), ("ts", "ascending"), ("item_id", "ascending"), ("_order", "ascending")]
    )
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
    # A user is a (domain, user_key) pair (user_lookup_key): one domain per user.
    domains = t.column("domain").take(pa.array(first))
    dup_by_user: dict[int, list[str]] = {}
    for r in dups.select(["user_id", "user_key", "item_key", "ts"]).to_pylist():
        dup_by_user.setdefault(r["user_id"], []).append(
            json.dumps({"user_key": r["user_key"], "item_key": r["item_key"], "ts": r["ts"]})
        )
    return pa.table(
        {
            "user_id": pa.array(users, pa.int64()),
            "user_key": t.column("user_key").take(pa.array(first)),
            "domain": domains,
            "items": lists("item_id", pa.int64()),
            "ts": lists("ts", pa.int64()),
            "ratings": lists("rating", pa.float32()),
            "reviews": lists("review", pa.string()),
            "n_train": pa.array(np.where(lens >= 3, lens - 2, lens), pa.int64()),
            "duplicates": pa.array([dup_by_user.get(k, []) for k in users.tolist()], pa.list_(pa.string())),
        },
        schema=SEQUENCE_SCHEMA,
    )


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
    ctr_protocol: str = "loo"
    # Several domains: the first item id of each domain's id range, ascending from 0
    # (:func:`domain_starts`). A user's direct / CTR negatives are then drawn from their own
    # domain's items (a user's items all belong to one domain), not from the joint catalog, whose
    # other domains' items would be easy negatives. () or (0,): one range, the whole catalog.
    domain_starts: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, d, n_items: int, domain_starts: tuple[int, ...] = ()) -> SplitParams:
        """From the ``data`` config section (``DataConfig``), the catalog size and, for several
        domains, where each domain's item ids start."""
        if domain_starts and domain_starts[0] != 0:
            raise ValueError(f"domain_starts must start at item id 0, got {domain_starts}")
        return cls(
            n_items=n_items,
            seed=d.seed,
            direct_negatives=d.direct_negatives,
            ctr_negatives=d.ctr_negatives,
            ctr_split=tuple(d.ctr_split),
            explanation_split=tuple(d.explanation_split),
            eh_thresholds=tuple(d.eh_thresholds),
            ctr_protocol=d.ctr_protocol,
            domain_starts=tuple(int(x) for x in domain_starts),
        )


def domain_id_ranges(ids: pa.Table) -> pa.Table:
    """Per block of numbered item lookup keys (``_ikey``, ``item_id``): each domain's smallest and
    largest item id (columns ``domain``, ``lo``, ``hi``), for :func:`domain_starts`."""
    dom = pc.list_element(pc.split_pattern(ids.column("_ikey"), KEY_SEP, max_splits=1), 0)
    agg = pa.table({"domain": dom, "item_id": ids.column("item_id")}).group_by("domain")
    agg = agg.aggregate([("item_id", "min"), ("item_id", "max")])
    return pa.table({"domain": agg.column("domain"), "lo": agg.column("item_id_min"), "hi": agg.column("item_id_max")})


def domain_starts(ranges: pa.Table, n_items: int) -> tuple[int, ...]:
    """The first item id of each domain, ascending, from every block's :func:`domain_id_ranges`.
    Item ids follow the sorted (domain, key) lookup keys, so each domain's ids form one contiguous
    range and the ranges tile ``0 .. n_items - 1``; checked (a ValueError otherwise)."""
    agg = ranges.group_by("domain").aggregate([("lo", "min"), ("hi", "max")])
    lo, hi = agg.column("lo_min").to_numpy(), agg.column("hi_max").to_numpy()
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], hi[order]
    if not len(lo) or lo[0] != 0 or hi[-1] != n_items - 1 or np.any(lo[1:] != hi[:-1] + 1):
        names = agg.column("domain").take(pa.array(order)).to_pylist()
        raise ValueError(f"item ids are not one contiguous range per domain: {list(zip(names, lo, hi))}")
    return tuple(int(x) for x in lo)


def domain_ranges(domain_starts, n_items: int, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per item id: the first id and the size of its domain's id range (:func:`domain_starts`);
    the whole catalog with one domain or none. A user's negatives come from the range of their
    items (a user's items all belong to one domain)."""
    items = np.asarray(items, np.int64)
    if len(domain_starts) <= 1:
        return np.zeros(len(items), np.int64), np.full(len(items), n_items, np.int64)
    starts = np.asarray(domain_starts, np.int64)
    sizes = np.diff(np.append(starts, n_items))
    d = np.searchsorted(starts, items, side="right") - 1
    return starts[d], sizes[d]


def item_ranges(p: SplitParams, lens: np.ndarray, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block row (user): the first item id and the size of the id range its negatives come
    from: its domain's (the domain of its first item) under ``p.domain_starts``, else the whole
    catalog (also for a row without items)."""
    n = len(lens)
    if len(p.domain_starts) <= 1 or not len(flat):
        return np.zeros(n, np.int64), np.full(n, p.n_items, np.int64)
    lo, size = domain_ranges(p.domain_starts, p.n_items, flat[np.minimum(np.cumsum(lens) - lens, len(flat) - 1)])
    empty = lens == 0
    return np.where(empty, 0, lo), np.where(empty, p.n_items, size)


# Randomness is counter-based: every draw is a hash of (seed, stream, user_id, purpose, index), so a
# whole block of users is sampled with array operations and the result for a user does not depend
# on which other users share its block (Ray partitions and the single-process chunks agree).
# ``hash_u64`` (reasonrec.hashing, re-exported here) is that hash.
_DRAW, _DENSE, _SHUFFLE, _SPLIT = 0, 1, 2, 3  # purposes within a stream
_SPLIT_NAMES = ("train", "valid", "test")


def _order_within_groups(groups: np.ndarray, prio: np.ndarray) -> np.ndarray:
    """Indices that sort by group, then by the top 32 bits of the hash ``prio`` within a group
    (one stable sort of a combined key: ~10x faster than lexsort; ties keep input order)."""
    key = (groups.astype(np.uint64) << np.uint64(32)) | (prio >> np.uint64(32))
    return np.argsort(key, kind="stable")


def _group_rank(groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Position of each element within its group, for ``groups`` sorted ascending."""
    starts = np.searchsorted(groups, np.arange(n_groups))
    return np.arange(len(groups)) - starts[groups]


def _lists(seqs: pa.Table, col: str) -> tuple[pa.Array, np.ndarray]:
    """Flattened values of a list column (slicing respected) and the list lengths."""
    arr = seqs.column(col).combine_chunks()
    return arr.flatten(), pc.list_value_length(arr).fill_null(0).to_numpy().astype(np.int64)


def _history(lens: np.ndarray, items: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct ``row * n_items + item`` keys of the block's (user row, item) pairs (``lens``
    items per row, flattened in ``items``), and the number of distinct items per row."""
    keys = np.unique(np.repeat(np.arange(len(lens)), lens) * n_items + items)
    return keys, np.bincount(keys // n_items, minlength=len(lens))


def _in_history(hist: np.ndarray, rows: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    keys = rows * n_items + items
    pos = np.minimum(np.searchsorted(hist, keys), max(len(hist) - 1, 0))
    return hist[pos] == keys if len(hist) else np.zeros(len(keys), bool)


def sample_negatives(
    seed: int,
    stream: int,
    list_uid: np.ndarray,
    list_row: np.ndarray,
    list_tag: np.ndarray,
    need: np.ndarray,
    n_items: int,
    hist: np.ndarray,
    n_hist: np.ndarray,
    row_lo: np.ndarray | None = None,
    row_size: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Negatives for many lists at once: list ``l`` gets ``need[l]`` distinct items of the catalog
    that block row ``list_row[l]`` never interacted with (``hist``/``n_hist`` from ``_history``;
    the caller guarantees ``need <= size - n_hist[row]``). Items come from the row's id range
    ``row_lo[row] .. row_lo[row] + row_size[row] - 1`` (:func:`item_ranges`; default: the whole
    catalog, which draws exactly as before ranges existed). Returns (list index, item) pairs
    sorted by list. List ``l``'s draws are a function of (seed, stream, list_uid[l], list_tag[l])
    and its range only. Lists whose complement is small (<= 4 x need) rank the whole complement
    by a hash; the others draw uniformly with rejection, in rounds, until full."""
    need = np.asarray(need, np.int64)
    n_rows = len(n_hist)
    lo = (np.zeros(n_rows, np.int64) if row_lo is None else np.asarray(row_lo, np.int64))[list_row]
    size = (np.full(n_rows, n_items, np.int64) if row_size is None else np.asarray(row_size, np.int64))[list_row]
    available = size - n_hist[list_row]
    dense = (need > 0) & (available <= 4 * need)
    out_l, out_i = [], []

    d = np.flatnonzero(dense)
    if len(d):
        rep = np.repeat(d, size[d])
        item = lo[rep] + np.arange(len(rep), dtype=np.int64) - np.repeat(np.cumsum(size[d]) - size[d], size[d])
        keep = ~_in_history(hist, list_row[rep], item, n_items)
        rep, item = rep[keep], item[keep]
        order = _order_within_groups(rep, hash_u64(seed, stream, list_uid[rep], list_tag[rep], _DENSE, item))
        rep, item = rep[order], item[order]
        keep = _group_rank(rep, len(need)) < need[rep]
        out_l.append(rep[keep])
        out_i.append(item[keep])

    short = np.flatnonzero(~dense & (need > 0))
    acc_l, acc_i = np.empty(0, np.int64), np.empty(0, np.int64)
    rnd = 0
    while len(short):
        missing = need[short] - np.bincount(acc_l, minlength=len(need))[short]
        # Expected acceptance is available / n_items; draw a little more than that needs.
        m = (np.ceil(1.25 * missing * size[short] / available[short]) + 4).astype(np.int64)
        lst = np.repeat(short, m)
        j = np.arange(len(lst)) - np.repeat(np.cumsum(m) - m, m)
        base = np.repeat(hash_u64(seed, stream, list_uid[short], list_tag[short], _DRAW, rnd), m)
        draw = mix64_(base + (j.astype(np.uint64) + np.uint64(1)) * GOLDEN) % size[lst].astype(np.uint64)
        item = lo[lst] + draw.astype(np.int64)
        keep = ~_in_history(hist, list_row[lst], item, n_items)
        # Earlier accepted items first, then this round's draws in order; first occurrence wins.
        lst = np.concatenate([acc_l, lst[keep]])
        item = np.concatenate([acc_i, item[keep]])
        first = np.sort(np.unique(lst * n_items + item, return_index=True)[1])
        lst, item = lst[first], item[first]
        order = np.argsort(lst, kind="stable")
        lst, item = lst[order], item[order]
        keep = _group_rank(lst, len(need)) < need[lst]
        lst, item = lst[keep], item[keep]
        full = np.bincount(lst, minlength=len(need)) >= need
        done = full[lst]
        out_l.append(lst[done])
        out_i.append(item[done])
        acc_l, acc_i = lst[~done], item[~done]
        short = short[~full[short]]
        rnd += 1

    lst = np.concatenate(out_l) if out_l else np.empty(0, np.int64)
    item = np.concatenate(out_i) if out_i else np.empty(0, np.int64)
    order = np.argsort(lst, kind="stable")
    return lst[order], item[order]


def split_labels(seed: int, stream: int, group_uid: np.ndarray, counts: np.ndarray, fractions) -> np.ndarray:
    """Split codes (0 train, 1 valid, 2 test) for consecutive groups of ``counts`` rows: per group a
    hash-random permutation, the first ``round(f_valid n)`` valid, the next ``round(f_test n)`` test;
    a group with n >= 3 gets >= 1 row in every split, a smaller one is all train."""
    counts = np.asarray(counts, np.int64)
    group = np.repeat(np.arange(len(counts)), counts)
    j = np.arange(len(group)) - np.repeat(np.cumsum(counts) - counts, counts)
    order = _order_within_groups(group, hash_u64(seed, stream, group_uid[group], _SPLIT, j))
    rank = np.empty(len(group), np.int64)
    rank[order] = j  # rank within the group in the permuted order (order keeps groups contiguous)
    n_valid = np.minimum(np.maximum(1, np.rint(fractions[1] * counts)), counts - 2).astype(np.int64)
    n_test = np.minimum(np.maximum(1, np.rint(fractions[2] * counts)), counts - 1 - n_valid).astype(np.int64)
    nv, nt = n_valid[group], n_test[group]
    codes = np.where(rank < nv, 1, np.where(rank < nv + nt, 2, 0)).astype(np.int8)
    codes[counts[group] < 3] = 0
    return codes


def _split_strings(codes: np.ndarray) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int8()), pa.array(_SPLIT_NAMES)).cast(pa.string())


def _list_array(lengths: np.ndarray, values: pa.Array) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def users_table(seqs: pa.Table, normalizer: EHNormalizer, thresholds) -> pa.Table:
    eh = normalizer(seqs.column("n_train").to_numpy())
    return schemas.conform(
        pa.table(
            {
                "user_id": seqs.column("user_id"),
                "user_key": seqs.column("user_key"),
                "domain": seqs.column("domain"),
                "n_train": seqs.column("n_train"),
                "evidence_horizon": pa.array(eh, pa.float32()),
                "eh_bucket": pa.array(bucket(eh, thresholds), pa.string()),
            }
        ),
        schemas.USERS,
    )


def interactions_table(seqs: pa.Table) -> pa.Table:
    items, lens = _lists(seqs, "items")
    return schemas.conform(
        pa.table(
            {
                "user_id": np.repeat(seqs.column("user_id").to_numpy(), lens),
                "item_id": items,
                "ts": _lists(seqs, "ts")[0],
                "rating": _lists(seqs, "ratings")[0],
                "review": _lists(seqs, "reviews")[0],
            }
        ),
        schemas.INTERACTIONS,
    )


def has_targets(seqs: pa.Table, lens: np.ndarray) -> np.ndarray:
    """Per user row: does the user get a valid and a test target? Leave-one-out: >= 3 items. Under the
    time-shift protocol (:func:`timeshift_sequences`) also the row's ``targets`` flag (a user needs
    >= 2 interactions before the cut-off and one after it)."""
    ok = lens >= 3
    if "targets" in seqs.column_names:
        ok &= seqs.column("targets").to_numpy(zero_copy_only=False).astype(bool)
    return ok


def split_history(train: np.ndarray, valid_item: int | None, split: str) -> np.ndarray:
    """The history a query of ``split`` sees under leave-one-out: train[:-1] for train, train for
    valid, train + the valid item for test (and production). The one rule for every task: the
    tools' own evaluation, the planner's features and the router use it alike."""
    tr = np.asarray(train, np.int64)
    if split == "train":
        return tr[:-1]
    if split == "valid" or valid_item is None:
        return tr
    return np.append(tr, np.int64(valid_item))


def _masked(flat: np.ndarray, idx: np.ndarray, mask: np.ndarray) -> pa.Array:
    """``flat[idx]`` with ``mask`` rows null (rows of users without items index nothing)."""
    vals = flat[np.minimum(idx, len(flat) - 1)] if len(flat) else np.zeros(len(idx), np.int64)
    return pa.array(vals, pa.int64(), mask=mask)


def loo_table(seqs: pa.Table) -> pa.Table:
    """Leave-one-out: last item test, second last valid, the rest train (users with < 3
    interactions, or without targets under the time-shift protocol: all train, no targets)."""
    items, lens = _lists(seqs, "items")
    ts = _lists(seqs, "ts")[0]
    starts = np.cumsum(lens) - lens
    targets = has_targets(seqs, lens)
    n_train = np.where(targets, lens - 2, lens)
    train_idx = pa.array(np.arange(n_train.sum()) + np.repeat(starts - (np.cumsum(n_train) - n_train), n_train))
    last = starts + lens - 1
    flat = items.to_numpy()
    return schemas.conform(
        pa.table(
            {
                "user_id": seqs.column("user_id"),
                "train_items": _list_array(n_train, items.take(train_idx)),
                "train_ts": _list_array(n_train, ts.take(train_idx)),
                "valid_item": _masked(flat, np.maximum(last - 1, 0), ~targets),
                "test_item": _masked(flat, np.maximum(last, 0), ~targets),
            }
        ),
        schemas.LOO,
    )


def direct_candidates_table(seqs: pa.Table, p: SplitParams) -> pa.Table:
    """For valid and test targets: the positive plus ``direct_negatives`` items the user never
    interacted with (anywhere in their history), shuffled; with several domains
    (``p.domain_starts``), items of the user's own domain. A user for whom the catalog has too few
    such items gets no candidate list (every list has the same length, as the protocol needs)."""
    items_arr, lens = _lists(seqs, "items")
    items = items_arr.to_numpy()
    uid = seqs.column("user_id").to_numpy()
    hist, n_hist = _history(lens, items, p.n_items)
    row_lo, row_size = item_ranges(p, lens, items)
    k = p.direct_negatives
    users = np.flatnonzero(has_targets(seqs, lens) & (row_size - n_hist >= k))
    ends = np.cumsum(lens)[users]
    list_row = np.repeat(users, 2)  # one valid and one test list per user
    list_tag = np.tile(np.array([0, 1]), len(users))
    positive = np.stack([items[ends - 2], items[ends - 1]], axis=1).ravel() if len(users) else np.empty(0, np.int64)
    _, negs = sample_negatives(
        p.seed,
        1,
        uid[list_row],
        list_row,
        list_tag,
        np.full(len(list_row), k),
        p.n_items,
        hist,
        n_hist,
        row_lo,
        row_size,
    )
    # Every list has k negatives: one row per list, shuffled row-wise by a hash of each item.
    cand = np.column_stack([positive, negs.reshape(len(list_row), k)])
    prio = hash_u64(p.seed, 1, uid[list_row][:, None], list_tag[:, None], _SHUFFLE, cand) >> np.uint64(32)
    cand = np.take_along_axis(cand, np.argsort(prio, axis=1, kind="stable"), axis=1)
    return schemas.conform(
        pa.table(
            {
                "user_id": uid[list_row],
                "split": _split_strings(list_tag + 1),
                "positive": positive,
                "candidates": _list_array(np.full(len(list_row), k + 1), pa.array(cand.ravel(), pa.int64())),
            }
        ),
        schemas.DIRECT_CANDIDATES,
    )


def ctr_table(seqs: pa.Table, p: SplitParams) -> pa.Table:
    """Positives = the user's distinct items; each gets ``ctr_negatives`` never-interacted items
    (of the user's own domain under ``p.domain_starts``) in its split (fewer when the catalog runs
    out). The split of the positives (``ctr_protocol``):

    * ``loo`` (default, leak-free): consistent with leave-one-out. A user's test positive is the
      leave-one-out test item and the valid positive the valid item, each only when it is not
      already among the items the tools train on (the training history; for test also the valid
      item, which the test history holds); every other item is a train positive. So no model
      trains on, and no history holds, a CTR valid or test positive.
    * ``random``: an 8:1:1 (``ctr_split``) per-user draw over the distinct items (every user with
      >= 3 items in all three splits). The ranking tools' leave-one-out histories then contain
      the CTR test positives: their CTR numbers are optimistic."""
    items, lens = _lists(seqs, "items")
    flat = items.to_numpy()
    uid = seqs.column("user_id").to_numpy()
    hist, n_pos = _history(lens, flat, p.n_items)
    pos_row, pos_item = hist // p.n_items, hist % p.n_items  # sorted by user, then item
    if p.ctr_protocol == "random":
        pos_split = split_labels(p.seed, 2, uid, n_pos, p.ctr_split)
    elif p.ctr_protocol == "loo":
        pos_split = _loo_ctr_split(lens, flat, pos_row, pos_item, p.n_items, has_targets(seqs, lens))
    else:
        raise ValueError(f"unknown CTR protocol {p.ctr_protocol!r} (loo or random)")
    r = p.ctr_negatives
    row_lo, row_size = item_ranges(p, lens, flat)
    need = np.maximum(0, np.minimum(n_pos * r, row_size - n_pos))
    rows = np.arange(len(lens))
    neg_row, neg_item = sample_negatives(
        p.seed, 2, uid, rows, np.zeros(len(rows), np.int64), need, p.n_items, hist, n_pos, row_lo, row_size
    )
    # The i-th negative of a user is in the split of the user's (i // r)-th positive.
    pos_start = np.cumsum(n_pos) - n_pos
    neg_split = pos_split[pos_start[neg_row] + _group_rank(neg_row, len(rows)) // max(r, 1)]
    row = np.concatenate([pos_row, neg_row])
    order = np.argsort(row, kind="stable")  # per user: positives, then negatives
    return schemas.conform(
        pa.table(
            {
                "user_id": uid[row[order]],
                "item_id": np.concatenate([pos_item, neg_item])[order],
                "label": np.concatenate([np.ones(len(pos_item), np.int8), np.zeros(len(neg_item), np.int8)])[order],
                "split": _split_strings(np.concatenate([pos_split, neg_split])[order]),
            }
        ),
        schemas.CTR,
    )


def _loo_ctr_split(
    lens: np.ndarray, flat: np.ndarray, pos_row: np.ndarray, pos_item: np.ndarray, n_items: int, has: np.ndarray
) -> np.ndarray:
    """Split codes of the distinct positives (``pos_row``, ``pos_item``) under the ``loo`` CTR
    protocol (see :func:`ctr_table`); ``has``: the users with valid / test targets."""
    ends = np.cumsum(lens)
    valid = np.where(has, flat[np.maximum(ends - 2, 0)] if len(flat) else -1, -1)
    test = np.where(has, flat[np.maximum(ends - 1, 0)] if len(flat) else -1, -1)
    # The training history: every item but the last two (all items for users with < 3).
    n_train = np.where(has, lens - 2, lens)
    idx = np.arange(len(flat)) - np.repeat(ends - lens, lens)
    in_train_part = idx < np.repeat(n_train, lens)
    train_keys, _ = _history(n_train, flat[in_train_part], n_items)
    seen = _in_history(train_keys, pos_row, pos_item, n_items)
    is_valid = (pos_item == valid[pos_row]) & ~seen
    is_test = (pos_item == test[pos_row]) & ~seen & (pos_item != valid[pos_row])
    return np.where(is_test, 2, np.where(is_valid, 1, 0)).astype(np.int8)


def explanation_table(seqs: pa.Table, p: SplitParams) -> pa.Table:
    """Interactions that carry review text, split 8:1:1 per user."""
    reviews, lens = _lists(seqs, "reviews")
    has = (
        pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(reviews)), 0).fill_null(False).to_numpy(zero_copy_only=False)
    )
    idx = np.flatnonzero(has)
    row = np.repeat(np.arange(len(lens)), lens)[idx]
    counts = np.bincount(row, minlength=len(lens))
    uid = seqs.column("user_id").to_numpy()
    rating = _lists(seqs, "ratings")[0].take(pa.array(idx))
    return schemas.conform(
        pa.table(
            {
                "user_id": uid[row],
                "item_id": _lists(seqs, "items")[0].take(pa.array(idx)),
                "rating": pc.if_else(pc.is_nan(rating), pa.scalar(None, pa.float32()), rating),
                "review": reviews.take(pa.array(idx)),
                "split": _split_strings(
                    split_labels(p.seed, 3, uid[counts > 0], counts[counts > 0], p.explanation_split)
                ),
            }
        ),
        schemas.EXPLANATION,
    )


def int_histogram(t: pa.Table, col: str, lo: int, hi: int, bins: int) -> pa.Table:
    """One row: the counts of integer ``col`` values in [lo, hi) over ``bins`` equal-width integer
    bins (value v -> bin (v - lo) * bins // (hi - lo)). Integer counts sum to the same totals
    whatever the blocks and their order: see :func:`quantile_step`."""
    v = np.asarray(t.column(col).to_numpy(zero_copy_only=False), np.int64)
    v = v[(v >= lo) & (v < hi)]
    counts = np.bincount((v - lo) * bins // (hi - lo), minlength=bins).astype(np.int64)
    return pa.table({"counts": [counts.tolist()]})


def quantile_step(counts: np.ndarray, lo: int, hi: int, rank: int) -> tuple[int, int, int]:
    """Narrow [lo, hi) to the bin holding the ``rank``-th smallest value (1-based) given the
    bins' ``counts`` (:func:`int_histogram`): returns (new lo, new hi, rank within the bin).
    Repeated until hi - lo == 1, lo is the exact value: the smallest v with
    count(values <= v) >= rank (numpy's ``inverted_cdf`` quantile for rank = ceil(q * n))."""
    bins, width = len(counts), hi - lo
    b = int(np.searchsorted(np.cumsum(counts), rank))
    before = int(counts[:b].sum())
    # Bin b holds the values v with (v - lo) * bins // width == b: v - lo in [ceil(b*w/bins), ceil((b+1)*w/bins)).
    return lo + -(-b * width // bins), lo + -(-(b + 1) * width // bins), rank - before


def timeshift_table(inter: pa.Table, cutoff: int) -> pa.Table:
    return schemas.conform(
        pa.table(
            {
                "user_id": inter.column("user_id"),
                "item_id": inter.column("item_id"),
                "ts": inter.column("ts"),
                "split": pc.if_else(pc.less(inter.column("ts"), cutoff), "train", "test"),
            }
        ),
        schemas.TIMESHIFT,
    )


SPLIT_PROTOCOLS = ("loo", "timeshift")


def timeshift_sequences(seqs: pa.Table, cutoff: int) -> pa.Table:
    """Per-user sequences (``build_sequences`` rows) cut at the time ``cutoff`` for the time-shift
    protocol (paper Fig. A1), so that the leave-one-out derivations downstream (``loo_table``,
    ``direct_candidates_table``, ``ctr_table``, ``users_table``, ...) read them unchanged:

    * a user with >= 2 interactions before the cut-off and >= 1 at or after it keeps the ones
      before plus the first one after: leave-one-out then makes that first one the test item, the
      last one before the cut-off the valid item and the rest the training history (``targets``
      true);
    * every other user keeps only the interactions before the cut-off, all of them training history,
      no valid / test target (``targets`` false); a user with none keeps an empty sequence.

    Interactions after a user's test item are dropped from the per-user tables: no history, no
    tool and no CTR / explanation row holds anything at or after the cut-off but the test items."""
    items, lens = _lists(seqs, "items")
    ts = _lists(seqs, "ts")[0].to_numpy()
    row = np.repeat(np.arange(len(lens)), lens)
    pos = np.arange(len(row)) - np.repeat(np.cumsum(lens) - lens, lens)
    n_before = np.bincount(row[ts < cutoff], minlength=len(lens)).astype(np.int64)
    targets = (n_before >= 2) & (lens > n_before)
    keep = (pos < n_before[row]) | ((pos == n_before[row]) & targets[row])
    new_lens = n_before + targets
    idx = pa.array(np.flatnonzero(keep))

    def cut(col: str) -> pa.Array:
        return _list_array(new_lens, _lists(seqs, col)[0].take(idx))

    out = seqs
    for col in ("items", "ts", "ratings", "reviews"):
        out = out.set_column(out.schema.get_field_index(col), col, cut(col))
    n_train = np.where(targets, new_lens - 2, new_lens)
    out = out.set_column(out.schema.get_field_index("n_train"), "n_train", pa.array(n_train, pa.int64()))
    return out.append_column("targets", pa.array(targets))


def timeshift_counts(seqs: pa.Table) -> pa.Table:
    """One row of counts over a block of :func:`timeshift_sequences` rows: users with a test item,
    users with history before the cut-off but no test item, users with nothing before it."""
    lens = _lists(seqs, "items")[1]
    t = seqs.column("targets").to_numpy(zero_copy_only=False).astype(bool)
    return pa.table(
        {
            "users_tested": [int(t.sum())],
            "users_train_only": [int((~t & (lens > 0)).sum())],
            "users_without_history": [int((lens == 0).sum())],
        }
    )
