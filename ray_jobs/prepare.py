"""prepare: read sources, validate, deduplicate, k-core, remap ids, evidence horizon, task splits.

    python -m ray_jobs.prepare --config configs/quickstart.yaml [key=value ...] [--force]

Streams with Ray Data: sources are read per shard in parallel, per-user work runs on hash
partitions by user (every row of a user in one block), global values (the count histogram, the
time-shift cutoff) come from Ray Data aggregations. Dense ids are numbered across the cluster
(distributed sort of the distinct keys, per-block offsets) and joined back by hash partition, so
the driver holds only per-block counts and small histograms: its memory does not grow with the data.

``data.split_protocol=timeshift`` cuts every user's sequence at the time-shift cut-off before the
per-user tables are derived (``reasonrec.data.prepare.timeshift_sequences``): the test item is the
user's first interaction at or after it and nothing later reaches a table a model learns from.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from functools import partial
from typing import Callable

import numpy as np
import pyarrow as pa

from ray_jobs.common import write_dataset
from ray_jobs.keyed import (
    broadcast_join,
    count_values,
    dense_ids,
    exact_quantile,
    in_catalog,
    join_on_key,
    kcore,
    rows_with_reason,
    rows_without_reason,
)
from reasonrec.config import RunConfig, parse_cli, section_hash
from reasonrec.data import prepare as P
from reasonrec.data import schemas
from reasonrec.data.evidence import bucket, fit_normalizer
from reasonrec.data.sources import Source, get_source
from reasonrec.io import open_store
from reasonrec.runtime import init_ray, pick_shuffle_strategy
from reasonrec.vocab import EH_BUCKETS

STAGE = "prepare"
TABLES = ("items", "interactions", "users", "loo", "direct_candidates", "ctr", "explanation", "timeshift", "quarantine")
TABLE_SCHEMAS = {
    "items": schemas.ITEMS,
    "interactions": schemas.INTERACTIONS,
    "users": schemas.USERS,
    "loo": schemas.LOO,
    "direct_candidates": schemas.DIRECT_CANDIDATES,
    "ctr": schemas.CTR,
    "explanation": schemas.EXPLANATION,
    "timeshift": schemas.TIMESHIFT,
    "quarantine": schemas.QUARANTINE,
}
DERIVE_BATCH_USERS = 8192
# An id table up to this many keys is joined by broadcast (one Arrow table per worker, gathered by a
# task, never by the driver) instead of shuffling the data rows to it: ~50 MB of string keys.
BROADCAST_MAX_KEYS = 1_000_000
log = logging.getLogger("reasonrec.prepare")


def _step(msg: str):
    """Log a step with its duration (the long ones also show Ray Data progress bars)."""

    class _Timer:
        def __enter__(self):
            self.t0 = time.time()
            log.info("%s ...", msg)
            return self

        def __exit__(self, *exc):
            if exc[0] is None:
                log.info("%s done in %.1fs", msg, time.time() - self.t0)

    return _Timer()


def _read_source_table(ray, sources: list[Source], which: str):
    """One Ray Dataset over every shard of every source (read in parallel, one task per shard)."""
    parts = []
    for s_idx, src in enumerate(sources):
        shards = src.item_shards() if which == "items" else src.interaction_shards()
        read: Callable = src.read_items if which == "items" else src.read_interactions
        schema = schemas.RAW_ITEMS if which == "items" else schemas.RAW_INTERACTIONS

        def read_shards(batch: pa.Table, read=read, shards=shards, schema=schema, s_idx=s_idx) -> pa.Table:
            out = []
            for i in batch.column("i").to_pylist():
                t = schemas.conform(read(shards[i]), schema)
                # Global source order: the stable tie-break for equal timestamps.
                order = (np.int64(s_idx) << 48) + (np.int64(i) << 32) + np.arange(t.num_rows, dtype=np.int64)
                out.append(t.append_column("_order", pa.array(order)))
            return pa.concat_tables(out)

        ds = ray.data.from_items([{"i": i} for i in range(len(shards))], override_num_blocks=max(1, len(shards)))
        parts.append(ds.map_batches(read_shards, batch_size=1, batch_format="pyarrow"))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _quarantined(ds, table_name: str):
    """The rows of ``ds`` that carry a reason, as QUARANTINE records."""
    return ds.map_batches(lambda t: P.to_quarantine(rows_with_reason(t), table_name), batch_format="pyarrow")


def _with_lookup_key(t: pa.Table) -> pa.Table:
    return t.append_column("_ikey", P.item_lookup_key(t.column("domain"), t.column("item_key")))


def _with_lookup_keys(t: pa.Table) -> pa.Table:
    """Interactions: item and user lookup keys, both namespaced by domain (two bundles' user "1"
    are two users)."""
    return _with_lookup_key(t).append_column("_ukey", P.user_lookup_key(t.column("domain"), t.column("user_key")))


def run(cfg: RunConfig, force: bool = False) -> dict:
    ray = init_ray(cfg.ray)
    t_start = time.time()
    store = open_store(cfg)
    sources = [get_source(s, cfg.storage) for s in cfg.data.sources]
    config_hash = section_hash(cfg.data)
    multi_domain = len({s.domain for s in cfg.data.sources}) > 1
    if multi_domain:  # negatives from the user's own domain (SplitParams.domain_starts): a new hash
        config_hash = section_hash({"data": config_hash, "negatives": "own domain"})
    inputs = {f"source:{s.cfg.domain}": s.fingerprint() for s in sources}
    if not force and store.is_done(STAGE, config_hash, inputs):
        m = store.manifest(STAGE)
        log.info("prepare: manifest matches under %s; skipping (use --force to re-run)", store.url(STAGE))
        return {"skipped": True, **m.metrics}

    parts = cfg.ray.shuffle_partitions
    d = cfg.data
    quarantine_parts = []

    with _step("read + validate interactions"):
        raw_inter = _read_source_table(ray, sources, "interactions")
        inter = raw_inter.map_batches(P.validate_interactions, batch_format="pyarrow").materialize()
        n_input_inter = inter.count()
        quarantine_parts.append(_quarantined(inter, "interactions"))
        inter = (
            inter.map_batches(rows_without_reason, batch_format="pyarrow")
            .map_batches(_with_lookup_keys, batch_format="pyarrow")
            .materialize()
        )
        if n_input_inter == 0:
            raise ValueError("prepare: the sources produced no interaction rows; check data.sources paths")

    with _step("read + validate items"):
        items = (
            _read_source_table(ray, sources, "items")
            .map_batches(P.validate_items, batch_format="pyarrow")
            .materialize()
        )
        n_input_items = items.count()
        quarantine_parts.append(_quarantined(items, "items"))
        items = (
            items.map_batches(rows_without_reason, batch_format="pyarrow")
            .map_batches(_with_lookup_key, batch_format="pyarrow")
            .materialize()
        )
        has_catalog = items.count() > 0

    log.info(
        "prepare: shuffles by %s (ray.shuffle_strategy=%s, %d rows)",
        pick_shuffle_strategy(cfg.ray, n_input_inter),
        cfg.ray.shuffle_strategy,
        n_input_inter,
    )
    # A Ray Dataset keeps the DataContext it was created under (its sorts and aggregates shuffle by
    # that context's strategy): the shuffling steps start from new datasets over the same blocks.
    inter = ray.data.from_arrow_refs(inter.to_arrow_refs())
    if has_catalog:
        items = ray.data.from_arrow_refs(items.to_arrow_refs())

    if d.kcore > 0:
        with _step(f"k-core filter (k={d.kcore})"):
            inter, removed = kcore(inter, d.kcore, parts)
            quarantine_parts.extend(_quarantined(r, "interactions") for r in removed)

    with _step("assign dense ids"):
        user_ids, n_users = dense_ids(ray, inter.select_columns(["_ukey"]), "_ukey", "user_id")

        def flagged(t: pa.Table, in_catalog: int) -> pa.Table:
            return pa.table(
                {"_ikey": t.column("_ikey"), "in_catalog": pa.array(np.full(t.num_rows, in_catalog, np.int8))}
            )

        # Item ids number the interactions' and the catalog's keys together; the flag marks stubs.
        item_keys = inter.map_batches(partial(flagged, in_catalog=0), batch_format="pyarrow")
        if has_catalog:
            item_keys = item_keys.union(items.map_batches(partial(flagged, in_catalog=1), batch_format="pyarrow"))
        item_ids, n_items = dense_ids(ray, item_keys, "_ikey", "item_id", flag="in_catalog")
        item_ids = item_ids.materialize()
        # Items that interactions reference but the catalog lacks get a stub row (key only).
        stubs = (
            item_ids.map_batches(partial(in_catalog, value=0), batch_format="pyarrow")
            .map_batches(P.stub_items, batch_format="pyarrow")
            .materialize()
        )
        n_stubs = stubs.count()

    with _step("deduplicate items, attach item ids"):
        items_out = stubs
        if has_catalog:
            catalog_ids = item_ids.map_batches(partial(in_catalog, value=1), batch_format="pyarrow").select_columns(
                ["_ikey", "item_id"]
            )
            items = join_on_key(items, catalog_ids, "_ikey", "item_id", parts, then=P.dedup_items).materialize()
            quarantine_parts.append(_quarantined(items, "items"))
            items_out = (
                items.map_batches(rows_without_reason, batch_format="pyarrow")
                .map_batches(partial(schemas.conform, schema=schemas.ITEMS), batch_format="pyarrow")
                .union(stubs)
            )

    with _step("per-user sequences (joins item and user ids)"):
        # Item ids stream into the per-user shuffle: no materialised copy of the interactions.
        lookup = item_ids.select_columns(["_ikey", "item_id"])
        with_items = inter.schema().base_schema.append(pa.field("item_id", pa.int64()))
        inter = (
            broadcast_join(ray, inter, lookup, "_ikey", "item_id")
            if n_items <= BROADCAST_MAX_KEYS
            else join_on_key(inter, lookup, "_ikey", "item_id", parts)
        )
        seqs = join_on_key(
            inter, user_ids, "_ukey", "user_id", parts, then=P.build_sequences, schema=with_items
        ).materialize()

        def dup_quarantine(t: pa.Table) -> pa.Table:
            recs = [r for lst in t.column("duplicates").to_pylist() for r in lst]
            return pa.table(
                {
                    "table": ["interactions"] * len(recs),
                    "reason": ["duplicate interaction"] * len(recs),
                    "record": recs,
                },
                schema=schemas.QUARANTINE,
            )

        quarantine_parts.append(seqs.map_batches(dup_quarantine, batch_format="pyarrow"))

    with _step("time-shift cutoff"):
        # Every interaction (the clean data, whatever the split protocol), materialised once: the
        # cut-off, the interactions table and the time-shift table all read it.
        interactions = seqs.map_batches(
            P.interactions_table, batch_size=DERIVE_BATCH_USERS, batch_format="pyarrow"
        ).materialize()
        cutoff = d.timeshift_cutoff
        if cutoff is None:
            cutoff = exact_quantile(interactions, "ts", d.timeshift_quantile)
        timeshift = interactions.map_batches(partial(P.timeshift_table, cutoff=cutoff), batch_format="pyarrow")

    split_counts = None
    if d.split_protocol == "timeshift":
        with _step(f"time-shift split at ts={cutoff}"):
            # Per-user sequences cut at the cut-off: leave-one-out on them puts the first interaction
            # after it as the test item and trains on nothing later (reasonrec.data.prepare).
            seqs = seqs.map_batches(partial(P.timeshift_sequences, cutoff=cutoff), batch_format="pyarrow").materialize()
            c = seqs.map_batches(P.timeshift_counts, batch_format="pyarrow").to_pandas().sum()
            split_counts = {k: int(v) for k, v in c.items()}

    with _step("evidence horizon"):
        # Per-block value counts, summed on the driver: at most blocks x distinct counts rows.
        hist = seqs.select_columns(["n_train"]).map_batches(count_values, batch_format="pyarrow").to_pandas()
        hist = hist.groupby("n_train", as_index=False)["users"].sum()
        counts, nusers = hist["n_train"].to_numpy(), hist["users"].to_numpy()
        normalizer = fit_normalizer(d.eh_normalizer, counts, nusers, d.eh_quantile)
        shares = {}
        for kind in ("max", "quantile", "rank", "log"):
            b = bucket(fit_normalizer(kind, counts, nusers, d.eh_quantile)(counts), d.eh_thresholds)
            shares[kind] = {name: round(float(nusers[b == name].sum() / nusers.sum()), 4) for name in EH_BUCKETS}

    starts = ()
    if multi_domain:  # each domain's item ids are one contiguous range (ids follow (domain, key))
        starts = P.domain_starts(
            pa.concat_tables(ray.get(item_ids.map_batches(P.domain_id_ranges, batch_format="pyarrow").to_arrow_refs())),
            n_items,
        )
        log.info("prepare: item ids per domain start at %s; negatives are drawn within each domain", starts)
    params = P.SplitParams.from_config(d, n_items, starts)
    derive = {
        "users": partial(P.users_table, normalizer=normalizer, thresholds=d.eh_thresholds),
        "loo": P.loo_table,
        "direct_candidates": partial(P.direct_candidates_table, p=params),
        "ctr": partial(P.ctr_table, p=params),
        "explanation": partial(P.explanation_table, p=params),
    }
    # Vectorised over the batch; batches bound the per-task working set (negative sampling draws
    # ~130 numbers per direct-candidate list), results do not depend on the batch size.
    tables = {
        name: seqs.map_batches(fn, batch_size=DERIVE_BATCH_USERS, batch_format="pyarrow") for name, fn in derive.items()
    }
    tables["items"] = items_out
    tables["interactions"] = interactions
    tables["timeshift"] = timeshift

    tables["quarantine"] = quarantine_parts[0].union(*quarantine_parts[1:])

    summary: dict = {}
    with store.stage_writer(STAGE, config_hash, inputs) as w:
        for name in TABLES:
            with _step(f"write {name}"):
                write_dataset(tables[name], w, store, name, TABLE_SCHEMAS[name])
        import pyarrow.dataset as pads

        qtab = pads.dataset(w.path("quarantine"), filesystem=store.arrow_fs, format="parquet").to_table(
            columns=["table", "reason"]
        )
        reasons = Counter(qtab.column("reason").to_pylist())
        q_by_table = Counter(qtab.column("table").to_pylist())
        user_buckets = bucket(normalizer(counts), d.eh_thresholds)
        bucket_counts = {b: int(nusers[user_buckets == b].sum()) for b in EH_BUCKETS}
        rows = w.manifest.rows
        balance_inter = n_input_inter == rows["interactions"] + q_by_table.get("interactions", 0)
        balance_items = n_input_items == rows["items"] - n_stubs + q_by_table.get("items", 0)
        if not (balance_inter and balance_items):
            raise RuntimeError(
                f"prepare: row accounting failed: interactions in={n_input_inter} kept={rows['interactions']} "
                f"quarantined={q_by_table.get('interactions', 0)}; "
                f"items in={n_input_items} kept={rows['items'] - n_stubs} "
                f"quarantined={q_by_table.get('items', 0)}"
            )
        summary = {
            "rows": dict(rows),
            "input_rows": {"interactions": n_input_inter, "items": n_input_items},
            "stub_items": n_stubs,
            "n_users": n_users,
            "n_items": n_items,
            "eh_normalizer": d.eh_normalizer,
            "eh_max_count": normalizer.max_count,
            "users_per_bucket": {b: int(bucket_counts.get(b, 0)) for b in EH_BUCKETS},
            "bucket_shares_by_normalizer": shares,
            "quarantine_by_reason": dict(reasons),
            "timeshift_cutoff": cutoff,
            "split_protocol": d.split_protocol,
            "seconds": round(time.time() - t_start, 1),
        }
        if split_counts is not None:
            summary["timeshift_split"] = split_counts
        if starts:
            summary["domain_item_starts"] = list(starts)  # direct / CTR negatives: within each domain
        w.manifest.metrics = summary
        w.write_json("summary.json", summary)
        normalizer.save(w)
    return summary


def format_summary(s: dict) -> str:
    if s.get("skipped"):
        return "prepare: skipped (outputs up to date)"
    lines = ["prepare summary", "---------------"]
    lines.append("rows per table: " + ", ".join(f"{k}={v:,}" for k, v in s["rows"].items()))
    lines.append(f"users={s['n_users']:,} items={s['n_items']:,} (stub items without metadata: {s['stub_items']:,})")
    lines.append(
        f"users per EH bucket ({s['eh_normalizer']}): "
        + ", ".join(f"{k}={v:,}" for k, v in s["users_per_bucket"].items())
    )
    for kind, sh in s["bucket_shares_by_normalizer"].items():
        lines.append(f"  bucket shares under {kind:8s}: " + ", ".join(f"{k}={v:.1%}" for k, v in sh.items()))
    q = s["quarantine_by_reason"]
    lines.append("quarantined rows by reason: " + (", ".join(f"{k}={v:,}" for k, v in sorted(q.items())) or "none"))
    if s.get("split_protocol") == "timeshift":
        c = s.get("timeshift_split", {})
        lines.append(
            f"split protocol: timeshift at ts={s['timeshift_cutoff']} (test = each user's first interaction from "
            f"then on): users tested={c.get('users_tested', 0):,}, history only={c.get('users_train_only', 0):,}, "
            f"nothing before the cut-off={c.get('users_without_history', 0):,}"
        )
    lines.append(f"time taken: {s['seconds']:.1f}s")
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args, cfg = parse_cli("Prepare canonical Parquet tables and task splits with Ray Data.", argv)
    summary = run(cfg, force=args.force)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
