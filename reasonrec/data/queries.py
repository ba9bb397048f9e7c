"""Query selection, Ray-free: the QUERIES rows of a task and split from the ``prepare`` tables
(:func:`prepared_queries`, hash-sampled to a cap; used by the instruction builder, the planner fit
and the scoring job), the stable query-id layout (:func:`prefix_position`), and an ad-hoc query
file's checks (:func:`load_query_file`, ``score.queries_path``)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reasonrec.data.prepare import domain_ranges
from reasonrec.data.schemas import QUERIES, conform
from reasonrec.hashing import splitmix64
from reasonrec.io import ArtifactStore, arrow_filesystem, filesystem
from reasonrec.prompts.templates import TASKS

TASK_BASE = {t: (i + 1) * 10**12 for i, t in enumerate(TASKS)}  # query-id ranges per task
SPLIT_BASE = {"train": 0, "valid": 3 * 10**11, "test": 6 * 10**11}
PREFIX_STRIDE = 10**9  # query-id offset per earlier training position (prepared_queries ``prefixes``)


class QueryFileError(ValueError):
    """The query file is empty or malformed; the message names the offending row or column."""


def _sample(ids: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Row positions of a stable hash sample of ``cap`` ids (all when cap is 0 or larger)."""
    if not cap or len(ids) <= cap:
        return np.arange(len(ids))
    h = splitmix64(ids.astype(np.uint64) ^ np.uint64(seed * 2654435761 + 1))
    return np.sort(np.argsort(h, kind="stable")[:cap])


def prepared_queries(
    tables: Mapping[str, pa.Table],
    task: str,
    split: str,
    n_items: int,
    direct_negatives: int = 99,
    seed: int = 0,
    cap: int = 0,
    prefixes: int = 0,
    domain_starts: Sequence[int] = (),
) -> pa.Table:
    """QUERIES rows of one task and split from the ``prepare`` tables (``loo``, and by task
    ``direct_candidates`` / ``ctr`` / ``explanation``), with truth columns. Query ids are stable:
    task and split ranges plus the row's position in the (deterministic) table.

    ``prefixes`` (training split, sequential and direct only): besides each user's last training
    item, also predict up to that many earlier items of the training sequence from the items
    before them (the row's ``history``), so the VLM sees every transition a sequential tool
    learns from instead of one per user.

    ``domain_starts`` (several domains: the first item id of each domain, the ``prepare``
    summary's ``domain_item_starts``): the training split's direct lists draw their negatives from
    the user's own domain, as ``prepare`` draws the valid / test lists and the CTR negatives."""
    base = TASK_BASE[task] + SPLIT_BASE[split]
    if task in ("sequential", "direct") and not (task == "direct" and split != "train"):
        loo = tables["loo"].sort_by("user_id")
        all_users = loo.column("user_id").to_numpy()
        train = loo.column("train_items").to_pylist()
        histories = None
        if split == "train":
            keep = [i for i, t in enumerate(train) if len(t) >= 2]
            users, target, qid = all_users[keep], [train[i][-1] for i in keep], base + np.arange(len(keep))
            if prefixes:
                # Earlier positions of the same training sequence (P5-style augmentation): the
                # item at len - 1 - k predicted from the items before it. Ids: k * PREFIX_STRIDE
                # above the last-item example's, so those (k = 0) keep their ids.
                histories = [None] * len(keep)
                extra_u, extra_t, extra_h, extra_q = [], [], [], []
                for k in range(1, prefixes + 1):
                    for pos, i in enumerate(keep):
                        if len(train[i]) >= 2 + k:
                            extra_u.append(all_users[i])
                            extra_t.append(train[i][-1 - k])
                            extra_h.append(train[i][: -1 - k])
                            extra_q.append(base + k * PREFIX_STRIDE + pos)
                users = np.append(users, np.asarray(extra_u, users.dtype))
                target, histories = target + extra_t, histories + extra_h
                qid = np.append(qid, np.asarray(extra_q, np.int64))
        else:
            col = loo.column(f"{split}_item").to_pylist()
            keep = [i for i, v in enumerate(col) if v is not None]
            users, target, qid = all_users[keep], [col[i] for i in keep], base + np.arange(len(keep))
        target = np.asarray(target, np.int64)
        pick = _sample(qid, cap, seed)
        users, target, qid = users[pick], target[pick], qid[pick]
        if histories is not None:
            histories = [histories[i] for i in pick]
        cands = None
        if task == "direct":  # training lists: the target + negatives the user never touched
            pos = {int(u): i for i, u in enumerate(loo.column("user_id").to_numpy())}
            seen_of = [np.asarray(train[pos[int(u)]], np.int64) for u in users]
            lo, size = domain_ranges(domain_starts, n_items, np.array([s[0] for s in seen_of], np.int64))
            cands = []
            for j, (u, t, k) in enumerate(zip(users, target, prefix_position(qid, [task] * len(qid), split).tolist())):
                # Seeded by user (the last-item example keeps its list) and prefix offset.
                rng = np.random.default_rng([seed, int(u), 3] + ([k] if k else []))
                pool = np.setdiff1d(np.arange(lo[j], lo[j] + size[j]), seen_of[j])
                negs = rng.choice(pool, min(direct_negatives, len(pool)), replace=False)
                cands.append(rng.permutation(np.append(negs, t)).tolist())
        return _conform(
            {
                "query_id": qid,
                "task": [task] * len(qid),
                "user_id": users,
                "candidates": cands,
                "target": target,
                "history": histories,
            }
        )
    if task == "direct":
        t = tables["direct_candidates"]
        t = t.filter(pc.equal(t.column("split"), split)).sort_by("user_id")
        qid = base + np.arange(t.num_rows)
        pick = _sample(qid, cap, seed)
        return _conform(
            {
                "query_id": qid[pick],
                "task": [task] * len(pick),
                "user_id": t.column("user_id").to_numpy()[pick],
                "candidates": t.column("candidates").take(pa.array(pick, pa.int64())).to_pylist(),
                "target": t.column("positive").to_numpy()[pick],
            }
        )
    name = "ctr" if task == "ctr" else "explanation"
    t = tables[name]
    t = t.filter(pc.equal(t.column("split"), split)).sort_by([("user_id", "ascending"), ("item_id", "ascending")])
    qid = base + np.arange(t.num_rows)
    pick = _sample(qid, cap, seed)
    t = t.take(pa.array(pick, pa.int64()))
    cols = {
        "query_id": qid[pick],
        "task": [task] * len(pick),
        "user_id": t.column("user_id").to_numpy(),
        "item_id": t.column("item_id").to_numpy(),
    }
    if task == "ctr":
        cols["label"] = t.column("label").to_numpy()
    else:
        cols["rating"] = t.column("rating").to_numpy(zero_copy_only=False)
        cols["reference"] = t.column("review").to_pylist()
    return _conform(cols)


def score_split_queries(
    store: ArtifactStore, tasks: Sequence[str], split: str, direct_negatives: int = 99, seed: int = 0, cap: int = 0
) -> pa.Table:
    """The scoring job's prepared queries: :func:`prepared_queries` of each of ``tasks`` (in that
    order) over the run's ``prepare`` tables."""
    n_items = store.read_table("prepare", "items", columns=["item_id"]).num_rows
    tables = {n: store.read_table("prepare", n) for n in ("loo", "direct_candidates", "ctr", "explanation")}
    return pa.concat_tables([prepared_queries(tables, t, split, n_items, direct_negatives, seed, cap) for t in tasks])


def _conform(cols: dict[str, Any]) -> pa.Table:
    n = len(cols["query_id"])
    arrays = []
    for f in QUERIES:
        v = cols.get(f.name)
        arrays.append(
            pa.nulls(n, f.type)
            if v is None
            else pa.array(v, f.type)
            if not isinstance(v, np.ndarray)
            else pa.array(v).cast(f.type)
        )
    return pa.Table.from_arrays(arrays, schema=QUERIES)


def prefix_position(query_id: np.ndarray, task: Sequence[str], split: str) -> np.ndarray:
    """How many items before the end of the training sequence a sequential/direct query's target
    sits (0 = the last training item; ``prepared_queries`` ``prefixes``); -1 for other tasks."""
    base = np.array([TASK_BASE[t] for t in task], np.int64) + SPLIT_BASE[split]
    k = (np.asarray(query_id, np.int64) - base) // PREFIX_STRIDE
    return np.where(np.isin(np.asarray(task, object), ["sequential", "direct"]), k, -1)


# ------------------------------------------------------------------------------ query files
REQUIRED = ("query_id", "task", "user_id")


def query_file_parts(url: str, storage=None, target_rows: int = 1) -> list[dict]:
    """The query file (or folder of Parquet files) ``url`` planned as read chunks, from the
    Parquet footers alone: consecutive row groups of one file, at least ``target_rows`` rows each
    (the last of a file may be shorter), as ``{"path", "row_groups", "rows", "start"}`` (``start``:
    the chunk's first row in the whole file, for error messages). Checks what the footers tell:
    the file exists, is readable Parquet, has rows and the required columns."""
    import pyarrow.dataset as pads

    fs, path = filesystem(url, storage)
    if not fs.exists(path):
        raise QueryFileError(f"query file not found: {url}")
    afs = arrow_filesystem(fs)
    try:
        files = [path] if not fs.isdir(path) else pads.dataset(path, filesystem=afs, format="parquet").files
        metas = []
        for f in sorted(files):
            with afs.open_input_file(f) as fh:
                metas.append((f, pq.ParquetFile(fh).metadata))
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise QueryFileError(f"query file {url} is not readable Parquet: {exc}") from None
    if sum(m.num_rows for _, m in metas) == 0:
        raise QueryFileError(f"query file {url} has no rows")
    names = metas[0][1].schema.to_arrow_schema().names
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise QueryFileError(f"query file {url}: missing required column(s) {missing}")
    parts, start = [], 0
    for f, meta in metas:
        groups: list[int] = []
        rows = 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= target_rows or g == meta.num_row_groups - 1:
                parts.append({"path": f, "row_groups": groups, "rows": rows, "start": start})
                start += rows
                groups, rows = [], 0
    return [p for p in parts if p["rows"]]


def check_query_rows(t: pa.Table, url: str, start: int = 0) -> tuple[pa.Table | None, tuple | None]:
    """A chunk of a query file (its first row at ``start`` in the file) -> (the chunk as QUERIES
    rows, None) or (None, (order, row, message)) for its first problem: a null required value,
    then a column that does not cast. ``order`` ranks the checks as :func:`load_query_file` runs
    them over the whole file (every null ``query_id`` before any null ``task``, ...), so the
    smallest (order, row) over all chunks is the error the whole file gives."""
    for i, c in enumerate(REQUIRED):
        nulls = np.flatnonzero(t.column(c).is_null().to_numpy(zero_copy_only=False))
        if len(nulls):
            row = start + int(nulls[0])
            return None, (i, row, f"query file {url}: row {row} has a null '{c}'")
    for i, f in enumerate(QUERIES):
        if f.name in t.column_names:
            try:
                t = t.set_column(t.column_names.index(f.name), f.name, t.column(f.name).cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                msg = f"query file {url}: column '{f.name}' must be {f.type}: {exc}"
                return None, (len(REQUIRED) + i, start, msg)
    return conform(t, QUERIES), None


def first_duplicate(ids: np.ndarray, rows: np.ndarray | None = None) -> tuple[int, list[int]] | None:
    """The smallest id of ``ids`` that occurs more than once and its first three rows (``rows``:
    each id's row number, default its position), or None."""
    uniq, counts = np.unique(ids, return_counts=True)
    if not (counts > 1).any():
        return None
    dup = int(uniq[counts > 1][0])
    at = np.flatnonzero(ids == dup)
    return dup, sorted((at if rows is None else np.asarray(rows)[at]).tolist())[:3]


def duplicate_message(url: str, dup: int, rows: list[int]) -> str:
    return f"query file {url}: query_id {dup} is not unique (rows {rows})"


def load_query_file(url: str, store: ArtifactStore) -> pa.Table:
    """Read and check a whole query file in this process: required columns present, no null ids,
    castable types, no duplicate ids. The scoring job runs the same checks chunk by chunk on the
    cluster (``ray_jobs.shards``)."""
    parts = query_file_parts(url, store.storage)
    fs, _ = filesystem(url, store.storage)
    afs = arrow_filesystem(fs)
    tables = []
    for p in parts:
        with afs.open_input_file(p["path"]) as fh:
            tables.append(pq.ParquetFile(fh).read_row_groups(p["row_groups"]))
    t, err = check_query_rows(pa.concat_tables(tables, promote_options="permissive"), url)
    if err is not None:
        raise QueryFileError(err[2])
    dup = first_duplicate(t.column("query_id").to_numpy())
    if dup is not None:
        raise QueryFileError(duplicate_message(url, *dup))
    return t
