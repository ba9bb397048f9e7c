"""Orchestration helpers shared by the Ray jobs."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads

from reasonrec.io import ArtifactStore, StageWriter


def write_dataset(ds, writer: StageWriter, store: ArtifactStore, name: str, schema: pa.Schema) -> int:
    """Write a Ray Dataset as the Parquet folder ``name`` of a stage and return its row count
    (read from the Parquet footers, no extra Ray execution). Ray writes no file for an empty
    dataset, so an empty one gets a zero-row file with ``schema``: readers always find the table.

    On object stores Ray must not "create the directory": after an empty write it then deletes
    that never-materialised prefix, which fails on S3 (prefixes need no creating anyway)."""
    ds.write_parquet(writer.path(name), filesystem=store.arrow_fs, try_create_dir=not store.scheme)
    if not store.fs.exists(writer.path(name)):
        writer.write_table(f"{name}/empty.parquet", schema.empty_table())
    rows = pads.dataset(writer.path(name), filesystem=store.arrow_fs, format="parquet").count_rows()
    writer.manifest.rows[name] = rows
    return rows


def arrow_blocks(table: pa.Table, n_blocks: int) -> list[pa.Table]:
    """``table`` cut into at most ``n_blocks`` zero-copy slices, for ``ray.data.from_arrow``.

    Used instead of ``Dataset.repartition`` in front of an actor pool: a pool as large as the
    cluster holds every CPU while the repartition's tasks wait for one (hung with 2 actors on 2 CPUs).
    """
    step = max(-(-table.num_rows // max(n_blocks, 1)), 1)
    return [table.slice(i, step) for i in range(0, table.num_rows, step)] or [table]
