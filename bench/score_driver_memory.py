"""Peak memory of the score command's driver as the query table grows, before and after a change.

    python -m bench.score_driver_memory --config configs/quickstart.yaml --before <git ref> \\
        [--sizes 10000,100000,1000000] [--tasks sequential,direct,ctr] [key=value ...]

Runs the ``prepare``, ``train_tools`` and ``fit_planner`` jobs first (each skips when up to
date), so no measured command fits the planner. For each size N it writes a query file of N
queries (the prepared test queries of ``--tasks`` repeated, renumbered 0..N-1:
:func:`make_query_file`) and runs ``python -m ray_jobs.score`` on it in tools mode, once with this
checkout's code and once with ``--before`` (a checkout's folder, or a git ref: a ``git worktree``
of it made for the bench and removed afterwards), in the same run, each into its own stage
(removed first, so it really runs). The driver's peak RSS is its own ``getrusage(RUSAGE_SELF)``
maximum, recorded as it exits (:data:`_DRIVER`): the Ray processes it starts are not counted.
Prints a Markdown table (with the 1-minute load average at each command's start and end) and
writes ``{run}/bench_score_driver_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
# Runs ray_jobs.score as `python -m` does and writes the process's own peak RSS (KiB on Linux)
# to the file named by the first argument when it exits: the same for either version of the code.
_DRIVER = (
    "import atexit, resource, runpy, sys\n"
    "out = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(out, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))\n"
    "runpy.run_module('ray_jobs.score', run_name='__main__', alter_sys=True)\n"
)


def make_query_file(source: pa.Table, n: int, path: str, row_group_rows: int = 65536) -> int:
    """Write ``n`` queries to ``path``: ``source``'s rows repeated in order (cut to ``n``), with
    ``query_id`` renumbered 0..n-1 (unique), in row groups of ``row_group_rows``. Written one row
    group at a time, so this process never holds more than one. Returns the rows written."""
    if source.num_rows == 0:
        raise ValueError("no source queries to repeat")
    qid = source.schema.get_field_index("query_id")
    with pq.ParquetWriter(path, source.schema) as writer:
        for start in range(0, n, row_group_rows):
            rows = min(row_group_rows, n - start)
            pos = (np.arange(start, start + rows) % source.num_rows).astype(np.int64)
            chunk = source.take(pa.array(pos))
            writer.write_table(chunk.set_column(qid, "query_id", pa.array(np.arange(start, start + rows))))
    return n


def run_driver(code_dir: Path, args: list[str], log_path: str) -> dict:
    """``python -m ray_jobs.score args`` with the code in ``code_dir``; wall seconds, the driver's
    peak RSS and the 1-minute load average at its start and end."""
    with tempfile.NamedTemporaryFile(suffix=".rss", delete=False) as fh:
        rss_file = fh.name
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(code_dir)}
    load0, t0 = os.getloadavg()[0], time.time()
    with open(log_path, "w") as fh:
        rc = subprocess.run(
            [sys.executable, "-c", _DRIVER, rss_file, *args], cwd=code_dir, stdout=fh, stderr=subprocess.STDOUT, env=env
        ).returncode
    wall, load1 = time.time() - t0, os.getloadavg()[0]
    if rc != 0:
        raise RuntimeError(f"score exited {rc}; log {log_path} ends:\n{Path(log_path).read_text()[-3000:]}")
    kib = int(Path(rss_file).read_text())
    os.unlink(rss_file)
    return {"wall_s": round(wall, 1), "driver_peak_rss_gib": round(kib / 2**20, 2), "load": [load0, load1]}


def report(rows: list[dict]) -> str:
    lines = [
        "| queries | code | driver peak RSS GiB | wall s | load avg (start, end) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        load = ", ".join(f"{x:.1f}" for x in r["load"])
        lines.append(f"| {r['queries']:,} | {r['code']} | {r['driver_peak_rss_gib']} | {r['wall_s']} | {load} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from reasonrec.config import load_config
    from reasonrec.io import TMP_DIR, open_store

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--before", required=True, help="the code to compare with: a git ref, or a checkout's folder")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--tasks", default="sequential,direct,ctr")
    args, overrides = ap.parse_known_args(argv)
    config = str(Path(args.config).resolve())
    cfg = load_config(config, overrides)
    store = open_store(cfg)
    out_dir = store.path()
    store.fs.makedirs(out_dir, exist_ok=True)
    tasks = f"score.tasks=[{args.tasks}]"
    # The stages the score command reads, planner included: fitted here, not inside a measured run.
    for job, extra in (("prepare", []), ("train_tools", []), ("fit_planner", ["score.mode=tools", tasks])):
        cmd = [sys.executable, "-m", f"ray_jobs.{job}", "--config", config, *overrides, *extra]
        subprocess.run(cmd, check=True, cwd=REPO)
    from ray_jobs.score import score_queries

    source = score_queries(load_config(config, [*overrides, tasks, "score.max_queries_per_task=0"]), store)
    made = not Path(args.before).is_dir()  # a checkout given as a folder is used as it is
    before = Path(tempfile.mkdtemp(prefix="score-mem-before-")) / "code" if made else Path(args.before).resolve()
    if made:
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], check=True, cwd=REPO)
    rows: list[dict] = []
    try:
        for n in (int(x) for x in args.sizes.split(",")):
            path = os.path.join(out_dir, f"bench_queries_{n}.parquet")
            make_query_file(source, n, path)
            for label, code in (("before", before), ("after", REPO)):
                stage = f"score_mem_{label}_{n}"
                for old in [store.path(stage)] + store.fs.glob(store.path(TMP_DIR, f"{stage}-*")):
                    if store.fs.exists(old):
                        store.fs.rm(old, recursive=True)
                score_args = ["--config", config, *overrides, "score.mode=tools", tasks]
                score_args += [f"score.queries_path={path}", f"score.stage_name={stage}"]
                rec = run_driver(code, score_args, os.path.join(out_dir, f"bench_{stage}.log"))
                rec.update(queries=n, code=label, predictions=store.manifest(stage).rows.get("predictions"))
                rows.append(rec)
                print(json.dumps(rec), flush=True)
                store.fs.rm(store.path(stage), recursive=True)
            os.unlink(path)
    finally:
        if made:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO)
    print(report(rows))
    with open(os.path.join(out_dir, "bench_score_driver_memory.json"), "w") as fh:
        json.dump({"config": args.config, "overrides": overrides, "before": args.before, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
