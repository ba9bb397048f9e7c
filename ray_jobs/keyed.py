"""Keyed Ray Data operations that ``prepare`` builds on: partition rows by a key (one shuffle, the
strategy from ``ray.shuffle_strategy``), number distinct keys densely across the cluster, join the
ids back (by hash partition, or broadcast when the id table is small) and the iterative k-core.

Ray orchestration, not library logic: the per-block functions they run live in
:mod:`reasonrec.data.prepare`. The driver only ever holds per-block key ranges and counts.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reasonrec.data import prepare as P
from reasonrec.data import schemas


def rows_with_reason(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_valid(t.column("reason")))


def rows_without_reason(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_null(t.column("reason"))).drop_columns(["reason"])


def per_key_partition(ds, key: str, fn, partitions: int):
    """Apply ``fn`` to whole partitions of ``key`` (every row of a key in one block): the same
    co-location guarantee Ray's ``groupby().map_groups()`` relies on, but one vectorised call per
    partition instead of one Python call per group, which was ~50x slower. Under a hash shuffle
    strategy: repartition by key. Under a sort strategy (``ray.shuffle_strategy``, which Ray's
    key-based repartition does not support): a distributed sort by key into ``partitions`` blocks,
    whose range partitions keep equal keys together (as ``dense_ids`` relies on too)."""
    from ray.data.context import DataContext, ShuffleStrategy

    if DataContext.get_current().shuffle_strategy in (
        ShuffleStrategy.SORT_SHUFFLE_PULL_BASED,
        ShuffleStrategy.SORT_SHUFFLE_PUSH_BASED,
    ):
        ds = ds.repartition(partitions).sort(key)
    else:
        ds = ds.repartition(partitions, keys=[key], sort=True)
    return ds.map_batches(fn, batch_size=None, batch_format="pyarrow")


def dense_ids(ray, keys, key: str, id_col: str, flag: str | None = None):
    """Number the distinct values of ``key`` in ``keys`` 0..N-1 in sorted order, on the cluster:
    distinct per block -> Ray Data ``sort`` (range partitions: equal keys land in one block) ->
    distinct per sorted block -> (first key, last key, rows) per block to the driver, which orders
    the blocks and turns their row counts into offsets -> id = offset + position in the block.
    With ``flag``, each key also keeps the flag's max. Returns (Dataset[key, flag?, id_col], N)."""
    distinct = partial(P.distinct_keys, key=key, flag=flag)
    blocks = keys.map_batches(distinct, batch_format="pyarrow").sort(key).to_arrow_refs()

    @ray.remote(num_returns=2)
    def dedup(t: pa.Table):
        out = distinct(t)
        return out, P.key_range(out, key)

    @ray.remote
    def number(t: pa.Table, offset: int) -> pa.Table:
        return P.number_rows(t, offset, id_col)

    deduped = [dedup.remote(b) for b in blocks]
    ranges = ray.get([r for _, r in deduped])
    order = sorted((i for i, r in enumerate(ranges) if r[2]), key=lambda i: ranges[i][0])
    numbered, offset = [], 0
    for prev, i in zip([None] + order, order):
        if prev is not None and ranges[i][0] <= ranges[prev][1]:  # the sort's range partitions overlap
            raise RuntimeError(f"prepare: sorted {key} blocks overlap; dense ids would not be unique")
        numbered.append(number.remote(deduped[i][0], offset))
        offset += ranges[i][2]
    return ray.data.from_arrow_refs(numbered), offset


def join_on_key(
    ds, ids, key: str, col: str, partitions: int, then: Callable | None = None, schema: pa.Schema | None = None
):
    """Left join of ``ids`` (one row per ``key``, carrying the int64 ``col``) onto ``ds`` by hash partition:
    both go through one shuffle by ``key`` (id rows padded to ``ds``'s columns) and each partition
    fills ``col`` from the id rows it holds. ``then`` runs on the joined partition: a following
    step that needs the same partitioning saves its own shuffle. ``schema`` gives ``ds``'s columns
    when ``ds`` is lazy (Ray would otherwise execute part of it to find them).

    Not Ray Data's ``Dataset.join`` (tried with polars 2.1, Ray 2.60, 2026-12-06: ``left_outer`` +
    a cast back + ``per_key_partition`` for ``then``). Its tables were identical, but: it always
    hash-shuffles through aggregator actors, ignoring ``ray.shuffle_strategy`` (``auto`` picks the
    sort shuffle up to 2M rows because it is faster there); Polars streams a partition out in
    several blocks, so ``then`` needs a second shuffle; an id table with no rows (``kcore``: no
    key under k) fails under the sort strategy (polars ColumnNotFoundError); strings and binaries
    come back large. On 2 CPUs (a shared machine, load 40-85): quickstart prepare 145-181 s with
    it vs 52-65 s, the two joining steps 30-51 s and 53-57 s vs 1.3-2.5 s each; with
    ``data.kcore=5`` 447 s vs 150 s (k-core step 246 s vs 72 s); 200k rows, join +
    build_sequences under the sort strategy 11-13 s vs 2.3-5.7 s."""
    target = (schema or ds.schema().base_schema).append(pa.field(col, pa.int64()))

    def joined(t: pa.Table) -> pa.Table:
        out = P.attach_ids(t, key, col)
        return then(out) if then else out

    both = ds.map_batches(partial(schemas.conform, schema=target), batch_format="pyarrow").union(
        ids.map_batches(partial(schemas.conform, schema=target), batch_format="pyarrow")
    )
    return per_key_partition(both, key, joined, partitions)


def broadcast_join(ray, ds, ids, key: str, col: str):
    """Left join of a small id table (``key`` -> ``col``) onto ``ds`` without moving ``ds``: a task
    concatenates the id blocks into one object and every batch looks its keys up there.
    ``Dataset.join`` would shuffle ``ds`` as well (and is slower here, see ``join_on_key``)."""

    @ray.remote
    def gather(*blocks: pa.Table) -> pa.Table:
        return pa.concat_tables(blocks).select([key, col]).combine_chunks()

    lookup = gather.remote(*ids.to_arrow_refs())

    def attach(t: pa.Table) -> pa.Table:
        table = ray.get(lookup)
        idx = pc.index_in(t.column(key), value_set=table.column(key).chunk(0))
        return t.append_column(col, table.column(col).take(idx))

    return ds.map_batches(attach, batch_format="pyarrow")


def kcore(inter, k: int, partitions: int):
    """Iteratively drop users/items with fewer than k interactions. The counts and the keys under
    k stay on the cluster and are joined back by key. Returns (kept, removed)."""
    removed = []
    while True:
        low = {
            key: inter.groupby(key, num_partitions=partitions)
            .count()
            .map_batches(partial(below, key=key, k=k), batch_format="pyarrow")
            .materialize()
            for key in ("_ukey", "_ikey")
        }
        if all(ds.count() == 0 for ds in low.values()):
            break
        marked = inter
        for key, ds in low.items():
            marked = join_on_key(marked, ds, key, f"_low{key}", partitions)

        def mark(t: pa.Table) -> pa.Table:
            bad = pc.or_(pc.is_valid(t.column("_low_ukey")), pc.is_valid(t.column("_low_ikey")))
            t = t.drop_columns(["_low_ukey", "_low_ikey"])
            return t.append_column(
                "reason", pc.if_else(bad, pa.scalar(f"k-core filter (k={k})"), pa.scalar(None, pa.string()))
            )

        marked = marked.map_batches(mark, batch_format="pyarrow").materialize()
        removed.append(marked)
        inter = marked.map_batches(rows_without_reason, batch_format="pyarrow").materialize()
    return inter, removed


def below(counts: pa.Table, key: str, k: int) -> pa.Table:
    """The keys of a ``groupby(key).count()`` block with fewer than ``k`` rows, flagged for a join."""
    low = counts.filter(pc.less(counts.column("count()"), k))
    return pa.table({key: low.column(key), f"_low{key}": pa.array(np.ones(low.num_rows, np.int64))})


def in_catalog(t: pa.Table, value: int) -> pa.Table:
    return t.filter(pc.equal(t.column("in_catalog"), value))


def count_values(t: pa.Table) -> pa.Table:
    vc = pc.value_counts(t.column("n_train").combine_chunks())
    return pa.table({"n_train": vc.field("values"), "users": vc.field("counts")})


def exact_quantile(ds, col: str, q: float, bins: int = 1 << 16) -> int:
    """The exact ``q`` quantile (inverted CDF: the smallest v with a share >= q of values <= v) of
    an integer column, by histogram passes that narrow the range ``bins``-fold each (two passes
    for unix seconds). Hand-written rather than Ray's ``ApproximateQuantile``: that sketch depends
    on the order its blocks merge in (three runs of one prepare gave three time-shift cut-offs),
    integer counts do not."""
    from ray.data.aggregate import Count, Max, Min

    agg = ds.aggregate(Min(col), Max(col), Count())
    lo, hi, n = int(agg[f"min({col})"]), int(agg[f"max({col})"]) + 1, int(agg["count()"])
    rank = max(1, int(np.ceil(q * n - 1e-9)))
    while hi - lo > 1:
        nb = min(bins, hi - lo)
        parts = ds.map_batches(partial(P.int_histogram, col=col, lo=lo, hi=hi, bins=nb), batch_format="pyarrow")
        counts = np.zeros(nb, np.int64)
        for row in parts.iter_rows():
            counts += np.asarray(row["counts"], np.int64)
        lo, hi, rank = P.quantile_step(counts, lo, hi, rank)
    return lo
