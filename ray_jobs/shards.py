"""The scoring job's query shards, cut and checked on the cluster, never held by the driver.

:func:`query_shards` writes the job's queries once per staging folder as
``{staging}/queries/shard-XXXXX.parquet`` (``score.shard_rows`` rows each, QUERIES rows) with Ray
tasks, then ``{staging}/queries.json`` (the rows of each shard) last: a re-run finds that index and
reuses the shards, a run killed while cutting cuts again. The driver keeps the index alone.

* A query file (``score.queries_path``): the driver reads the Parquet footers only
  (:func:`reasonrec.data.queries.query_file_parts`); one task per run of row groups reads them,
  checks them (:func:`reasonrec.data.queries.check_query_rows`) and writes its shards. Duplicate
  ids across the whole file: each task reports its ids' (min, max) and whether they repeat within
  it; when some repeat or two ranges overlap, hash-partition tasks find the smallest repeated id
  and its rows, the message :func:`reasonrec.data.queries.load_query_file` gives.
* Prepared queries (``score.tasks`` of ``score.split``): one task builds them from the ``prepare``
  tables and writes the shards (that task holds the tables, the driver does not).

Also here: reading shards back where the job needs them (:func:`read_query_shards` in the router
actors), the exactly-once check shard by shard (:func:`check_shards`) and committing shard
folders as a stage's multi-file tables (:func:`commit_shards`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reasonrec.config import RunConfig, StorageConfig
from reasonrec.data.queries import (
    QueryFileError,
    check_query_rows,
    duplicate_message,
    first_duplicate,
    query_file_parts,
)
from reasonrec.io import TMP_DIR, ArtifactStore, StageWriter, arrow_filesystem, filesystem

log = logging.getLogger("reasonrec.score")
INDEX = "queries.json"


def shard_file(folder: str, s: int) -> str:
    return f"{folder}/shard-{s:05d}.parquet"


def write_shard_file(fs, afs, folder: str, s: int, table: pa.Table) -> None:
    """``{folder}/shard-{s}.parquet``, atomically: temp name, then rename (a reader or a resumed
    run never sees half a shard)."""
    final = shard_file(folder, s)
    fs.makedirs(folder, exist_ok=True)
    pq.write_table(table, final + ".tmp", filesystem=afs)
    fs.mv(final + ".tmp", final)


@dataclass
class QueryShards:
    """Where the shards are (``folder``: bare path) and the rows of each; all the driver keeps."""

    folder: str
    rows: list[int]

    @property
    def n(self) -> int:
        return sum(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def files(self, shards=None) -> list[str]:
        return [shard_file(self.folder, s) for s in (range(len(self.rows)) if shards is None else shards)]


def staging_fs(staging: str, storage: dict):
    """(fsspec filesystem, Arrow filesystem, root path) of a staging folder URL, in a task or actor
    (``storage``: :func:`storage_dict`)."""
    fs, root = filesystem(staging, StorageConfig(**storage))
    return fs, arrow_filesystem(fs), root


def query_shards(cfg: RunConfig, store: ArtifactStore, stage_dir: str) -> QueryShards:
    """The job's query shards under ``{run}/_tmp/{stage_dir}``: reused when its index exists,
    else cut now by Ray tasks (see the module docstring). Raises :class:`QueryFileError` for a
    bad query file (no shard of it is kept)."""
    import ray

    folder, index = store.path(TMP_DIR, stage_dir, "queries"), store.path(TMP_DIR, stage_dir, INDEX)
    if store.fs.exists(index):
        with store.fs.open(index, "r") as f:
            rows = json.load(f)["rows"]
        log.info("score: reusing %d query shards (%d queries) in %s", len(rows), sum(rows), store.url(folder))
        return QueryShards(folder, rows)
    if store.fs.exists(folder):  # shards of a run killed while cutting: the index decides, cut again
        store.fs.rm(folder, recursive=True)
    staging, storage = store.url(TMP_DIR, stage_dir), storage_dict(cfg)
    per_shard = max(cfg.score.shard_rows, 1)
    opts = {"max_retries": cfg.score.max_task_retries}
    try:
        if cfg.score.queries_path:
            rows = _cut_query_file(cfg.score.queries_path, staging, storage, per_shard, opts)
        else:
            rows = ray.get(ray.remote(_cut_prepared).options(**opts).remote(cfg, staging, per_shard))
    except QueryFileError:
        if store.fs.exists(folder):
            store.fs.rm(folder, recursive=True)
        raise
    with store.fs.open(index + ".tmp", "w") as f:
        json.dump({"rows": rows}, f)
    store.fs.mv(index + ".tmp", index)
    log.info("score: %d queries cut into %d shards on the cluster", sum(rows), len(rows))
    return QueryShards(folder, rows)


def storage_dict(cfg: RunConfig) -> dict:
    """``cfg.storage`` as plain keyword arguments of :class:`StorageConfig`, for Ray tasks and actors."""
    return {"s3_endpoint_url": cfg.storage.s3_endpoint_url, "s3_anon": cfg.storage.s3_anon}


# ------------------------------------------------------------------------------ cutting (Ray tasks)
def _cut_prepared(cfg: RunConfig, staging: str, per_shard: int) -> list[int]:
    """Ray task: the prepared queries (``score.tasks`` of ``score.split``) cut into shards."""
    from reasonrec.data.queries import score_split_queries
    from reasonrec.io import open_store

    s = cfg.score
    queries = score_split_queries(
        open_store(cfg), s.tasks, s.split, cfg.data.direct_negatives, cfg.seed, s.max_queries_per_task
    )
    fs, afs, root = staging_fs(staging, storage_dict(cfg))
    rows = []
    # Contiguous row ranges: a zero-copy slice each.
    for k, a in enumerate(range(0, queries.num_rows, per_shard)):
        part = queries.slice(a, per_shard)
        write_shard_file(fs, afs, f"{root}/queries", k, part)
        rows.append(part.num_rows)
    return rows


def _cut_file_part(url: str, storage: dict, part: dict, staging: str, first: int, per_shard: int) -> dict:
    """Ray task: one run of row groups of the query file -> checked QUERIES rows written as shards
    ``first``, ``first + 1``, ...; returns their rows and the ids' (min, max), or the first problem."""
    fs, afs, root = staging_fs(staging, storage)
    qfs, _ = filesystem(url, StorageConfig(**storage))
    with arrow_filesystem(qfs).open_input_file(part["path"]) as fh:
        table = pq.ParquetFile(fh).read_row_groups(part["row_groups"])
    table, err = check_query_rows(table, url, part["start"])
    if err is not None:
        return {"error": err}
    ids = table.column("query_id").to_numpy()
    rows = []
    for k, a in enumerate(range(0, table.num_rows, per_shard)):
        piece = table.slice(a, per_shard)
        write_shard_file(fs, afs, f"{root}/queries", first + k, piece)
        rows.append(piece.num_rows)
    return {
        "error": None,
        "rows": rows,
        "min": int(ids.min()),
        "max": int(ids.max()),
        "repeats": len(np.unique(ids)) < len(ids),
    }


def _cut_query_file(url: str, staging: str, storage: dict, per_shard: int, opts: dict) -> list[int]:
    import ray

    parts = query_file_parts(url, StorageConfig(**storage), per_shard)
    cut = ray.remote(_cut_file_part).options(**opts)
    refs, first = [], 0
    for p in parts:
        refs.append(cut.remote(url, storage, p, staging, first, per_shard))
        first += -(-p["rows"] // per_shard)
    results = ray.get(refs)
    errors = [r["error"] for r in results if r["error"] is not None]
    if errors:  # the problem the whole file's check would name first
        raise QueryFileError(min(errors)[2])
    rows = [n for r in results for n in r["rows"]]
    spans = sorted((r["min"], r["max"]) for r in results)
    # Sorted or range-partitioned ids (the usual file) need nothing more: no id repeats within a
    # part and no two parts' ranges overlap. Otherwise every id is checked, hash-partitioned.
    # Hand-written rather than a Ray Data groupby("query_id").count(), which would shuffle every
    # id of every file, sorted or not, and could not name the repeated id's rows in the file.
    if any(r["repeats"] for r in results) or any(b[0] <= a[1] for a, b in zip(spans, spans[1:])):
        n_parts = min(len(rows), 8)
        check = ray.remote(_duplicates_in_partition).options(**opts)
        found = ray.get([check.remote(staging, storage, rows, p, n_parts) for p in range(n_parts)])
        found = [d for d in found if d is not None]
        if found:
            raise QueryFileError(duplicate_message(url, *min(found)))
    return rows


def _duplicates_in_partition(staging: str, storage: dict, rows: list[int], p: int, n_parts: int):
    """Ray task: the smallest repeated query id among those hashing to partition ``p`` (every
    copy of an id hashes alike) and its first three rows in the file, or None. Reads only the
    ``query_id`` column of each shard (8 bytes a query)."""
    from reasonrec.hashing import splitmix64

    fs, afs, root = staging_fs(staging, storage)
    starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
    ids, at = [], []
    for s, start in enumerate(starts):
        col = pq.read_table(shard_file(f"{root}/queries", s), columns=["query_id"], filesystem=afs).column(0)
        x = col.to_numpy()
        keep = np.flatnonzero(splitmix64(x) % np.uint64(n_parts) == p)
        ids.append(x[keep])
        at.append(start + keep)
    return first_duplicate(np.concatenate(ids), np.concatenate(at))


# ------------------------------------------------------------------------------ reading back
def read_query_shards(batch: pa.Table, staging: str, storage: dict) -> pa.Table:
    """A batch of shard ids (column ``shard``) -> those shards' QUERIES rows plus the ``shard``
    column (in the router actors: no query crosses the driver or the object store)."""
    fs, afs, root = staging_fs(staging, storage)
    out = []
    for s in batch.column("shard").to_pylist():
        t = pq.read_table(shard_file(f"{root}/queries", s), filesystem=afs)
        out.append(t.append_column("shard", pa.array(np.full(t.num_rows, s), pa.int64())))
    return pa.concat_tables(out)


def check_shards(cfg: RunConfig, store: ArtifactStore, stage_dir: str, queries: QueryShards) -> dict:
    """The exactly-once check of the staged output, shard by shard, in Ray tasks (a run of
    shards each): each shard's predictions + rejected hold exactly its queries' ids. Query ids are
    unique across shards (a query file is checked when cut; prepared ids are so by construction),
    so this is every query exactly once overall, and no process holds more than a shard's ids.
    Returns ``{"bad": the first failing shard's counts or None, "predictions", "rejected",
    "counts"}`` (``counts``: :func:`reasonrec.data.schemas.summary_counts` of every prediction)."""
    import ray

    from reasonrec.data.schemas import summary_counts

    n = len(queries)
    # Two tasks per CPU of the cluster (at most 64): each task costs a worker's scheduling and
    # imports, and a shard's check milliseconds; one task per shard took 3.3 s for 51 shards on 2
    # CPUs.
    tasks = min(64, max(2 * int(ray.cluster_resources().get("CPU", 1)), 1))
    step = max(-(-n // tasks), 1)
    task = ray.remote(_check_shard_run).options(max_retries=cfg.score.max_task_retries)
    staging = store.url(TMP_DIR, stage_dir)
    parts = ray.get([task.remote(staging, storage_dict(cfg), a, min(a + step, n)) for a in range(0, n, step)])
    from reasonrec.data.schemas import PREDICTIONS

    counts = [p["counts"] for p in parts if p["counts"] is not None]
    return {
        "bad": next((p["bad"] for p in parts if p["bad"] is not None), None),
        "predictions": sum(p["predictions"] for p in parts),
        "rejected": sum(p["rejected"] for p in parts),
        "counts": summary_counts(pa.concat_tables(counts) if counts else PREDICTIONS.empty_table()),
    }


def _check_shard_run(staging: str, storage: dict, first: int, end: int) -> dict:
    """Ray task: :func:`check_shards` over shards ``first`` .. ``end - 1``."""
    import pyarrow.dataset as pads

    from reasonrec.data.schemas import PREDICTIONS, SUMMARY_COLUMNS, summary_counts

    fs, afs, root = staging_fs(staging, storage)
    n_preds = n_rej = 0
    counts, bad = [], None

    def ids(name: str, s: int, columns: list[str], schema=None) -> pa.Table | None:
        f = shard_file(f"{root}/{name}", s)
        if not fs.exists(f):
            return None
        # Under the full schema: a shard written before a column existed reads it as null.
        return pads.dataset([f], schema=schema, filesystem=afs, format="parquet").to_table(columns=columns)

    for s in range(first, end):
        want = ids("queries", s, ["query_id"]).column(0).to_numpy()
        preds = ids("predictions", s, ["query_id", *SUMMARY_COLUMNS], PREDICTIONS)
        rej = ids("rejected", s, ["query_id"])
        got = [t.column("query_id").to_numpy() for t in (preds, rej) if t is not None]
        got = np.sort(np.concatenate(got)) if got else np.empty(0, np.int64)
        n_preds += 0 if preds is None else preds.num_rows
        n_rej += 0 if rej is None else rej.num_rows
        if preds is not None:
            counts.append(summary_counts(preds))
        if bad is None and (len(got) != len(want) or not np.array_equal(got, np.sort(want))):
            bad = {"shard": s, "queries": len(want), "out": len(got), "distinct": len(np.unique(got))}
    counted = pa.concat_tables(counts) if counts else None
    return {"bad": bad, "predictions": n_preds, "rejected": n_rej, "counts": counted}


def selected_per_shard(cfg: RunConfig, store: ArtifactStore, stage_dir: str, n_shards: int) -> list[int]:
    """How many of each shard's queries the VLM budget's selection (``{staging}/vlm_budget.parquet``)
    chose: a Ray task reads every shard's ids, the driver gets one count per shard."""
    import ray

    task = ray.remote(_count_selected).options(max_retries=cfg.score.max_task_retries)
    return ray.get(task.remote(store.url(TMP_DIR, stage_dir), storage_dict(cfg), n_shards))


def _count_selected(staging: str, storage: dict, n_shards: int) -> list[int]:
    import pyarrow.compute as pc

    fs, afs, root = staging_fs(staging, storage)
    chosen = pq.read_table(f"{root}/vlm_budget.parquet", columns=["query_id"], filesystem=afs).column(0)
    out = []
    for s in range(n_shards):
        ids = pq.read_table(shard_file(f"{root}/queries", s), columns=["query_id"], filesystem=afs).column(0)
        out.append(int(pc.sum(pc.is_in(ids, value_set=chosen)).as_py() or 0))
    return out


# ------------------------------------------------------------------------------ commit
def commit_shards(
    store: ArtifactStore, writer: StageWriter, name: str, folder: str, shards: list[int], schema: pa.Schema
) -> int:
    """Copy the shard files ``shards`` of ``folder`` into the stage as the multi-file table
    ``name`` (``{name}/shard-XXXXX.parquet``; readers read the folder) and return its rows, from
    the footers. A shard whose schema is not ``schema`` (written by an older version and resumed)
    is rewritten under it, a column it lacks null. Copies, not moves: a commit that fails leaves
    the staged shards for the next run."""
    src, dst, rows, rewritten = [], [], 0, 0
    for s in shards:
        f = shard_file(folder, s)
        if not store.fs.exists(f):  # a rejected file a shard never wrote (older versions): nothing rejected
            continue
        meta = pq.read_metadata(f, filesystem=store.arrow_fs)
        rows += meta.num_rows
        if meta.schema.to_arrow_schema().remove_metadata().equals(schema):
            src.append(f)
            dst.append(writer.path(name, f.rsplit("/", 1)[1]))
        else:
            table = pq.read_table(f, schema=schema, filesystem=store.arrow_fs)
            writer.write_table(f"{name}/{f.rsplit('/', 1)[1]}", table)
            rewritten += 1
    if src:
        store.fs.makedirs(writer.path(name), exist_ok=True)
        store.fs.copy(src, dst)
    if not src and not rewritten:  # readers always find the table
        writer.write_table(f"{name}/empty.parquet", schema.empty_table())
    writer.manifest.rows[name] = rows
    return rows
