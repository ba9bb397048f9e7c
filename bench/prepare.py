"""Benchmark of the ``prepare`` stage: the Ray Data job vs a single-process pyarrow/pandas run of the
same computation, on the synthetic world (no images) at a given number of interactions.

    python -m bench.prepare --sizes 1000000 10000000

For each size, in this order and one at a time (2-core machine: running them side by side would
measure the contention, not the implementations), each side runs in its own subprocess that this
process samples every 0.5 s with psutil:

* ``ray``: ``ray_jobs.prepare.run`` on a fresh local Ray cluster (``ray.address=local``, its own
  RAY_TMPDIR). Driver = the subprocess itself; "cluster" = every process it spawned (gcs, raylet
  with the plasma object store, dashboard agent, workers), summed. RSS double counts the object
  store pages that several processes map, so the proportional set size (PSS) sum is reported too.
* ``baseline``: :func:`baseline_prepare`, one Python process, the same row functions
  (``reasonrec.data.prepare``) on the whole dataset instead of on Ray blocks.

Peak driver / baseline RSS also comes from ``getrusage`` in the child (exact, not sampled). The
Ray child records the driver RSS at every step the job logs, which shows where driver memory goes.
Results: ``bench/results/prepare.json`` plus a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "prepare.json"
SAMPLE_S = 0.5
MB = 1024 * 1024


# ---------------------------------------------------------------------------------- config
def bench_config(
    size: int,
    workdir: str,
    side: str,
    n_items: int,
    per_shard: int,
    per_partition: int,
    shuffle_strategy: str | None = None,
):
    """The RunConfig both sides run for ``size`` interactions (expected; the realised count is in
    the result). Users are sized with the world's own expected sequence length."""
    from reasonrec.config import CONFIG_DIR, SyntheticConfig, load_config
    from reasonrec.data.sources.synthetic import expected_length

    n_users = max(1, round(size / expected_length(SyntheticConfig(n_items=n_items))))
    syn = "data.sources.0.synthetic."
    overrides = [
        f"{syn}n_users={n_users}",
        f"{syn}n_items={n_items}",
        f"{syn}with_images=false",
        f"{syn}n_user_shards={max(1, round(size / per_shard))}",
        f"{syn}n_item_shards=2",
        # The quickstart preset lowers this for its 120-item catalog; 99 is the protocol default.
        "data.direct_negatives=99",
        f"ray.shuffle_partitions={max(8, round(size / per_partition))}",
        "ray.address=local",  # a fresh cluster of our own, never one another job started
        *([f"ray.shuffle_strategy={shuffle_strategy}"] if shuffle_strategy else []),
        f"output_root={workdir}/{side}",
        "run_name=bench",
    ]
    return load_config(CONFIG_DIR / "quickstart.yaml", overrides), overrides


# -------------------------------------------------------------------------------- baseline
def baseline_prepare(cfg, out_dir: str, chunk_users: int = 8192) -> dict:
    """The prepare computation in one process: read every shard in turn, validate, deduplicate
    items, remap ids, build per-user sequences, fit the EH normalizer on the count histogram,
    derive users/interactions/loo/direct_candidates/ctr/explanation/timeshift and write Parquet.
    Per-row logic is the library's (``reasonrec.data.prepare``), so this differs from the Ray job
    only in where it runs: the whole dataset is one "partition". Output tables are derived and
    written ``chunk_users`` users at a time (the per-user work is independent), so only the
    sequences and one chunk's outputs are in memory at once. k-core is not implemented (off in
    this benchmark); the time-shift cutoff is the exact quantile (Ray: a KLL sketch)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from reasonrec.data import prepare as P
    from reasonrec.data import schemas
    from reasonrec.data.evidence import bucket, fit_normalizer
    from reasonrec.data.sources import get_source
    from reasonrec.vocab import EH_BUCKETS

    d = cfg.data
    if d.kcore > 0:
        raise NotImplementedError("baseline: k-core is not implemented (the benchmark runs with kcore=0)")
    t0 = time.time()
    steps: list[dict] = []

    def step(name: str):
        steps.append({"step": name, "t": round(time.time() - t0, 2), "rss_mb": round(_self_rss() / MB, 1)})
        _record_step(steps[-1])
        logging.getLogger("bench.prepare").info("baseline: %s done at %.1fs, RSS %.0f MB", *steps[-1].values())

    sources = [get_source(s, cfg.storage) for s in d.sources]
    quarantine: list[pa.Table] = []

    def split_reason(t: pa.Table, table_name: str) -> pa.Table:
        bad = t.filter(pc.is_valid(t.column("reason")))
        if bad.num_rows:
            quarantine.append(P.to_quarantine(bad, table_name))
        return t.filter(pc.is_null(t.column("reason"))).drop_columns(["reason"])

    def read_all(which: str) -> tuple[pa.Table, int]:
        parts, n_in = [], 0
        for s_idx, src in enumerate(sources):
            shards = src.item_shards() if which == "items" else src.interaction_shards()
            read = src.read_items if which == "items" else src.read_interactions
            schema = schemas.RAW_ITEMS if which == "items" else schemas.RAW_INTERACTIONS
            validate = P.validate_items if which == "items" else P.validate_interactions
            for i, shard in enumerate(shards):
                t = schemas.conform(read(shard), schema)
                # Same global source order (tie-break for equal timestamps) as the Ray job.
                order = (np.int64(s_idx) << 48) + (np.int64(i) << 32) + np.arange(t.num_rows, dtype=np.int64)
                t = validate(t.append_column("_order", pa.array(order)))
                n_in += t.num_rows
                parts.append(split_reason(t, which))
        t = pa.concat_tables(parts) if parts else schema.empty_table()
        return t.append_column("_ikey", P.item_lookup_key(t.column("domain"), t.column("item_key"))), n_in

    inter, n_input_inter = read_all("interactions")
    step("read + validate interactions")
    items, n_input_items = read_all("items")
    if items.num_rows:
        items = split_reason(P.dedup_items(items), "items")
    step("read + validate + deduplicate items")

    # Dense ids: positions in the sorted distinct keys (Arrow sorts UTF-8 bytewise = code points,
    # the order Python's sorted() gives the Ray job).
    user_keys = pc.unique(P.user_lookup_key(inter.column("domain"), inter.column("user_key"))).sort()
    inter_ikeys = pc.unique(inter.column("_ikey"))
    item_lookup = pc.unique(pa.concat_arrays([inter_ikeys, pc.unique(items.column("_ikey")).cast(pa.string())])).sort()
    n_items = len(item_lookup)
    inter = P.remap_interactions(inter, user_keys, item_lookup)
    stubs = pc.filter(inter_ikeys, pc.invert(pc.is_in(inter_ikeys, value_set=items.column("_ikey")))).sort()
    stub_parts = pc.split_pattern(stubs, P.KEY_SEP, max_splits=1)
    stub_table = pa.table(
        {"item_key": pc.list_element(stub_parts, 1), "domain": pc.list_element(stub_parts, 0), "_ikey": stubs}
    )
    items_out = pa.concat_tables(
        [
            schemas.conform(
                t.append_column("item_id", pc.index_in(t.column("_ikey"), value_set=item_lookup).cast(pa.int64())),
                schemas.ITEMS,
            )
            for t in (items, stub_table)
        ]
    )
    step("assign dense ids")

    seqs = P.build_sequences(inter)
    del inter
    recs = [r for lst in seqs.column("duplicates").to_pylist() for r in lst]
    if recs:
        quarantine.append(
            pa.table(
                {
                    "table": ["interactions"] * len(recs),
                    "reason": ["duplicate interaction"] * len(recs),
                    "record": recs,
                },
                schema=schemas.QUARANTINE,
            )
        )
    seqs = seqs.drop_columns(["duplicates"])
    step("per-user sequences")

    vc = pc.value_counts(seqs.column("n_train").combine_chunks())
    counts, nusers = vc.field("values").to_numpy(), vc.field("counts").to_numpy()
    normalizer = fit_normalizer(d.eh_normalizer, counts, nusers, d.eh_quantile)
    cutoff = d.timeshift_cutoff
    if cutoff is None:
        ts = pc.list_flatten(seqs.column("ts")).to_numpy()
        cutoff = int(np.quantile(ts, d.timeshift_quantile, method="inverted_cdf"))
        del ts
    step("evidence horizon + time-shift cutoff")

    starts = ()
    if len({s.domain for s in d.sources}) > 1:  # negatives within each domain, as the Ray job draws them
        ids = pa.table({"_ikey": item_lookup, "item_id": np.arange(n_items, dtype=np.int64)})
        starts = P.domain_starts(P.domain_id_ranges(ids), n_items)
    params = P.SplitParams.from_config(d, n_items, starts)
    derive = {
        "users": (schemas.USERS, lambda b: P.users_table(b, normalizer, d.eh_thresholds)),
        "interactions": (schemas.INTERACTIONS, P.interactions_table),
        "loo": (schemas.LOO, P.loo_table),
        "direct_candidates": (schemas.DIRECT_CANDIDATES, lambda b: P.direct_candidates_table(b, params)),
        "ctr": (schemas.CTR, lambda b: P.ctr_table(b, params)),
        "explanation": (schemas.EXPLANATION, lambda b: P.explanation_table(b, params)),
    }
    os.makedirs(out_dir, exist_ok=True)
    writers = {
        name: pq.ParquetWriter(os.path.join(out_dir, f"{name}.parquet"), schema) for name, (schema, _) in derive.items()
    }
    writers["timeshift"] = pq.ParquetWriter(os.path.join(out_dir, "timeshift.parquet"), schemas.TIMESHIFT)
    rows = dict.fromkeys(list(writers), 0)
    for lo in range(0, seqs.num_rows, chunk_users):
        # Progress in the log, so a run killed at the time limit still shows how far it got.
        logging.getLogger("bench.prepare").info(
            "baseline: derive users %d-%d of %d at %.1fs",
            lo,
            min(lo + chunk_users, seqs.num_rows),
            seqs.num_rows,
            time.time() - t0,
        )
        batch = seqs.slice(lo, chunk_users)
        for name, (_schema, fn) in derive.items():
            tab = fn(batch)
            if name == "interactions":
                ts_tab = P.timeshift_table(tab, cutoff)
                writers["timeshift"].write_table(ts_tab)
                rows["timeshift"] += ts_tab.num_rows
            writers[name].write_table(tab)
            rows[name] += tab.num_rows
    for w in writers.values():
        w.close()
    pq.write_table(items_out, os.path.join(out_dir, "items.parquet"))
    rows["items"] = items_out.num_rows
    q = pa.concat_tables(quarantine) if quarantine else schemas.QUARANTINE.empty_table()
    pq.write_table(q, os.path.join(out_dir, "quarantine.parquet"))
    rows["quarantine"] = q.num_rows
    step("derive + write tables")

    user_buckets = bucket(normalizer(counts), d.eh_thresholds)
    return {
        "rows": rows,
        "input_rows": {"interactions": n_input_inter, "items": n_input_items},
        "n_users": len(user_keys),
        "n_items": n_items,
        "eh_max_count": normalizer.max_count,
        "users_per_bucket": {b: int(nusers[user_buckets == b].sum()) for b in EH_BUCKETS},
        "timeshift_cutoff": cutoff,
        "seconds": round(time.time() - t0, 1),
        "steps": steps,
    }


# ---------------------------------------------------------------------------------- children
def _self_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


_STEPS_FILE: str | None = None


def _record_step(rec: dict) -> None:
    """Append a step record to the child's JSONL side file as it happens, so a child killed at the
    time limit still tells the parent how far it got and what its memory was at each step."""
    if _STEPS_FILE:
        with open(_STEPS_FILE, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _peak_rss_self() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class _StepRSS(logging.Handler):
    """Records the driver's RSS at every step message the Ray job logs ("... done in 3.2s")."""

    def __init__(self, t0: float):
        super().__init__(logging.INFO)
        self.t0, self.records = t0, []

    def emit(self, record):
        self.records.append(
            {"step": record.getMessage(), "t": round(time.time() - self.t0, 2), "rss_mb": round(_self_rss() / MB, 1)}
        )
        _record_step(self.records[-1])


def run_child(args) -> None:
    """One side at one size, in this (sampled) process; writes its result JSON."""
    global _STEPS_FILE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    _STEPS_FILE = args.result + ".steps.jsonl"
    cfg, _ = bench_config(
        args.size,
        args.workdir,
        args.child,
        args.n_items,
        args.interactions_per_shard,
        args.interactions_per_partition,
        args.shuffle_strategy,
    )
    out: dict = {"side": args.child, "rss_at_start_mb": round(_self_rss() / MB, 1)}
    t0 = time.time()
    if args.child == "ray":
        from ray_jobs import prepare as job

        handler = _StepRSS(t0)
        logging.getLogger("reasonrec.prepare").addHandler(handler)
        summary = job.run(cfg, force=True)
        out["wall_s"] = time.time() - t0  # includes starting the local Ray cluster (a few s)
        out["steps"] = handler.records
        import ray

        ray.shutdown()
    else:
        summary = baseline_prepare(cfg, os.path.join(cfg.output_root, "bench", "prepare"), args.chunk_users)
        out["wall_s"] = time.time() - t0
        out["steps"] = summary.pop("steps")
    out["peak_rss_mb_getrusage"] = round(_peak_rss_self() / MB, 1)
    out["summary"] = {
        k: summary.get(k)
        for k in (
            "rows",
            "input_rows",
            "n_users",
            "n_items",
            "eh_max_count",
            "users_per_bucket",
            "timeshift_cutoff",
            "seconds",
        )
    }
    Path(args.result).write_text(json.dumps(out, indent=2, default=str))


# ---------------------------------------------------------------------------------- sampling
def _mem(p, full: bool) -> tuple[int, int, int]:
    """(rss, pss, uss) of one process; pss/uss need /proc/pid/smaps_rollup (0 when not asked)."""
    if full:
        m = p.memory_full_info()
        return m.rss, m.pss, m.uss
    return p.memory_info().rss, 0, 0


def run_side(side: str, size: int, args, workdir: str) -> dict:
    """Start one child, sample it and its descendants every SAMPLE_S seconds until it exits or
    the time limit passes (then kill the child and everything it started, by pid)."""
    import psutil

    result_path = os.path.join(workdir, f"{side}-{size}.json")
    log_path = os.path.join(workdir, f"{side}-{size}.log")
    cmd = [
        sys.executable,
        "-m",
        "bench.prepare",
        "--child",
        side,
        "--size",
        str(size),
        "--workdir",
        workdir,
        "--result",
        result_path,
        "--n-items",
        str(args.n_items),
        "--interactions-per-shard",
        str(args.interactions_per_shard),
        "--interactions-per-partition",
        str(args.interactions_per_partition),
        "--chunk-users",
        str(args.chunk_users),
        *(["--shuffle-strategy", args.shuffle_strategy] if args.shuffle_strategy else []),
    ]
    # Ray's session dir (logs, spilled objects) apart from the "ray" outputs, whose size is reported.
    env = dict(
        os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=os.path.join(workdir, "ray-tmp"), PYTHONUNBUFFERED="1"
    )
    env.pop("RAY_ADDRESS", None)
    os.makedirs(env["RAY_TMPDIR"], exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    me = psutil.Process(proc.pid)
    seen: dict[int, psutil.Process] = {}
    peak = {"driver_rss": 0, "driver_uss": 0, "cluster_rss": 0, "cluster_pss": 0, "cluster_uss": 0, "n_procs": 0}
    timeline = []
    timed_out = False
    limit_s = args.ray_timeout_s if side == "ray" and args.ray_timeout_s else args.timeout_s
    while proc.poll() is None:
        if time.time() - t0 > limit_s:
            timed_out = True
            break
        try:
            d_rss, _, d_uss = _mem(me, True)
            kids = me.children(recursive=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            break
        c_rss = c_pss = c_uss = 0
        for k in kids:
            seen.setdefault(k.pid, k)
            try:
                r, p, u = _mem(k, True)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            c_rss, c_pss, c_uss = c_rss + r, c_pss + p, c_uss + u
        for key, v in (
            ("driver_rss", d_rss),
            ("driver_uss", d_uss),
            ("cluster_rss", c_rss),
            ("cluster_pss", c_pss),
            ("cluster_uss", c_uss),
            ("n_procs", len(kids)),
        ):
            peak[key] = max(peak[key], v)
        timeline.append([round(time.time() - t0, 1), round(d_rss / MB), round(c_pss / MB)])
        time.sleep(SAMPLE_S)
    if timed_out:
        _kill([me] + list(seen.values()))
    rc = proc.wait()
    wall = time.time() - t0
    _reap(seen.values())
    out = {
        "side": side,
        "size": size,
        "rc": rc,
        "timed_out": timed_out,
        "process_wall_s": round(wall, 1),
        "peak_mb": {k: (round(v / MB, 1) if k != "n_procs" else v) for k, v in peak.items()},
        "timeline_t_driver_rss_cluster_pss_mb": timeline,
        "log": log_path,
    }
    if rc == 0 and os.path.exists(result_path):
        out.update(json.loads(Path(result_path).read_text()))
    else:
        out["error"] = (
            f"timed out after {limit_s}s"
            if timed_out
            else f"killed by signal {-rc} (SIGKILL: likely the OOM killer)"
            if rc < 0
            else f"exit status {rc}"
        )
        out["log_tail"] = Path(log_path).read_text()[-3000:]
        steps_file = result_path + ".steps.jsonl"
        if os.path.exists(steps_file):  # how far the child got before it was stopped
            out["steps"] = [json.loads(line) for line in Path(steps_file).read_text().splitlines() if line]
    return out


def _kill(procs) -> None:
    import psutil

    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _reap(procs, grace_s: float = 30.0) -> None:
    """Wait for the Ray processes the child started to exit (ray.shutdown stops them), so the
    next measurement does not share the CPUs with a dying cluster; kill stragglers by pid."""
    import psutil

    alive = [p for p in procs if p.is_running()]
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    _kill(alive)


def _dir_mb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return round(total / MB, 1)


# ---------------------------------------------------------------------------------- report
def machine() -> dict:
    import psutil

    return {
        "nproc": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("ray", "pyarrow", "pandas", "numpy")}


def _fmt(v, spec=",.0f"):
    return "n/a" if v is None else format(v, spec)


def markdown(results: list[dict]) -> str:
    head = (
        "| interactions | users | side | wall s | interactions/s | peak driver / process RSS MB | "
        "peak Ray cluster RSS MB (PSS) | load avg (1 min) before |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for side in ("baseline", "ray"):
            s = r.get(side)
            if not s:
                continue
            summ = s.get("summary") or {}
            n = (summ.get("input_rows") or {}).get("interactions")
            wall = s.get("wall_s")
            rate = n / wall if (n and wall) else None
            pk = s["peak_mb"]
            driver = max(pk["driver_rss"], s.get("peak_rss_mb_getrusage") or 0)
            cluster = f"{pk['cluster_rss']:,.0f} ({pk['cluster_pss']:,.0f})" if side == "ray" else "-"
            err = f" **{s['error']}**" if s.get("error") else ""
            lines.append(
                f"| {_fmt(n) if n else _fmt(r['size'])} | {_fmt(summ.get('n_users', r.get('n_users')))} "
                f"| {side}{err} | "
                f"{_fmt(wall, ',.1f')} | {_fmt(rate)} | {driver:,.0f} | {cluster} | "
                f"{s.get('load_before', 'n/a')} |"
            )
        rt = r.get("ratios")
        if rt:
            lines.append(
                f"| | | **Ray / baseline** | {rt['wall']:.2f}x | {rt['rate']:.2f}x | "
                f"{rt['driver_rss']:.2f}x (driver) | {rt['total_pss']:.2f}x (driver + cluster PSS vs baseline) | |"
            )
    return "\n".join(lines)


def ratios(r: dict) -> dict | None:
    b, y = r.get("baseline"), r.get("ray")
    if not (b and y) or b.get("error") or y.get("error"):
        return None
    b_peak = max(b["peak_mb"]["driver_rss"], b["peak_rss_mb_getrusage"])
    y_driver = max(y["peak_mb"]["driver_rss"], y["peak_rss_mb_getrusage"])
    # Peak of the sum is not the sum of peaks; the sampled driver and cluster peaks are taken
    # at different times, so this is an upper bound on the Ray job's total footprint.
    y_total = y["peak_mb"]["driver_rss"] + y["peak_mb"]["cluster_pss"]
    return {
        "wall": y["wall_s"] / b["wall_s"],
        "rate": b["wall_s"] / y["wall_s"],
        "driver_rss": y_driver / b_peak,
        "total_pss": y_total / b_peak,
    }


def rows_match(r: dict) -> dict | None:
    """Per-table row counts of the two sides (the same computation must give the same rows)."""
    try:
        b, y = r["baseline"]["summary"]["rows"], r["ray"]["summary"]["rows"]
    except (KeyError, TypeError):
        return None
    diff = {k: [b.get(k), y.get(k)] for k in sorted(set(b) | set(y)) if b.get(k) != y.get(k)}
    return {"equal": not diff, "baseline_vs_ray_differences": diff}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[1_000_000, 10_000_000],
        help="expected interactions per run (the world is sized from its expected sequence length)",
    )
    ap.add_argument("--sides", nargs="+", choices=("baseline", "ray"), default=["baseline", "ray"])
    ap.add_argument("--n-items", type=int, default=50_000)
    ap.add_argument(
        "--shuffle-strategy", default=None, help="ray.shuffle_strategy of the Ray side (default: the config's)"
    )
    ap.add_argument(
        "--interactions-per-shard",
        type=int,
        default=250_000,
        help="synthetic user shards = size / this (the Ray read parallelism)",
    )
    ap.add_argument(
        "--interactions-per-partition", type=int, default=250_000, help="ray.shuffle_partitions = max(8, size / this)"
    )
    ap.add_argument(
        "--chunk-users",
        type=int,
        default=8192,
        help="baseline: users per derive/write chunk (the Ray job derives 8192 users per batch)",
    )
    ap.add_argument("--timeout-s", type=int, default=900, help="per side and size; the child is killed after it")
    ap.add_argument("--ray-timeout-s", type=int, default=None, help="the Ray side's limit, if not --timeout-s")
    ap.add_argument("--workdir", default=None, help="outputs and logs (default: a temp dir, removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the Parquet outputs and logs")
    ap.add_argument("--out", default=str(RESULTS))
    # internal: run one side in this process (what the parent starts and samples)
    ap.add_argument("--child", choices=("baseline", "ray"), help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(args)
        return 0

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-prepare-")
    os.makedirs(workdir, exist_ok=True)
    report = {
        "command": "python -m bench.prepare " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "versions": _versions(),
        "workdir": workdir,
        "results": [],
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Sizes measured by an earlier invocation are kept (each result records its own command and
    # machine load), so a long size can be run separately from the short ones.
    earlier = json.loads(out_path.read_text()).get("results", []) if out_path.exists() else []
    earlier = [r for r in earlier if r.get("size") not in args.sizes]
    for size in args.sizes:
        cfg, overrides = bench_config(
            size,
            workdir,
            "x",
            args.n_items,
            args.interactions_per_shard,
            args.interactions_per_partition,
            args.shuffle_strategy,
        )
        r: dict = {
            "size": size,
            "n_users": cfg.data.sources[0].synthetic.n_users,
            "overrides": [o for o in overrides if not o.startswith("output_root")],
        }
        for side in args.sides:
            load = round(os.getloadavg()[0], 2)
            print(f"[bench.prepare] size={size:,} side={side} (load {load}) ...", file=sys.stderr, flush=True)
            s = run_side(side, size, args, workdir)
            s["load_before"] = load
            s["output_mb"] = _dir_mb(os.path.join(workdir, side))
            if not args.keep:
                shutil.rmtree(os.path.join(workdir, side), ignore_errors=True)
                shutil.rmtree(os.path.join(workdir, "ray-tmp"), ignore_errors=True)
            r[side] = s
            print(
                f"[bench.prepare]   {side}: wall {_fmt(s.get('wall_s'), '.1f')}s "
                f"peak driver RSS {s['peak_mb']['driver_rss']:,.0f} MB {s.get('error', '')}",
                file=sys.stderr,
                flush=True,
            )
        r["ratios"] = ratios(r)
        r["rows_match"] = rows_match(r)
        r["command"], r["machine"] = report["command"], dict(machine(), started_load=report["machine"]["loadavg"])
        report["results"].append(r)
        merged = dict(report, results=sorted(earlier + report["results"], key=lambda x: x["size"]))
        out_path.write_text(json.dumps(merged, indent=2, default=str))  # after every size: partial results survive
    print(markdown(sorted(earlier + report["results"], key=lambda x: x["size"])))
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
