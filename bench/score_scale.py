"""Scoring a whole test set with every tool, against the machine's bound, in one run.

    python -m bench.score_scale --config configs/beauty.yaml output_root=/data/runs \\
        [--modes tools,toolsx2,budget0,budget500] [--tasks sequential,direct] [--bound-max-queries 0]

Needs the run's ``prepare`` and ``train_tools`` stages (and ``finetune`` for a budget above 0).

* **planner**: ``python -m ray_jobs.fit_planner`` as its own timed command (fitted once per
  config; the score commands below then find it done, as a user's second run would).
* **job**, per mode: ``python -m ray_jobs.score`` as a subprocess, exactly what a user runs, on
  every test query of ``--tasks`` (``score.max_queries_per_task=0``), into its own stage
  (``score_scale_<mode>``, removed first so it really runs). Wall time from the command's start
  to its committed manifest, the job's own q/s, the driver's peak RSS. Modes: ``tools``
  (``score.mode=tools``), ``budget<N>`` (routed with ``score.vlm_budget=N``); a suffix ``x<A>``
  runs A router actors (``toolsx2``: the 1 -> 2 actor comparison on the same queries).
* **bound**, in this process on the same queries: each tool's bare batched answer, one call per
  ``score.shard_rows`` queries as the job's shards (sequential: ``score_items`` + top-k; direct:
  ``score_candidates``; CTR: ``predict_ctr``), no planner, no fusion, no I/O, histories resolved
  beforehand and not timed, torch using every CPU. Bound q/s = queries / the sum of the tools'
  seconds: the least work a tools-mode answer needs (every tool answers every query).
* **ratio** = the job's q/s / the bound's q/s (same machine, same run).

Prints Markdown tables and writes ``{run}/bench_score_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time

import numpy as np

from reasonrec.config import load_config
from reasonrec.io import open_store

log = logging.getLogger("bench.score_scale")


def _mode_overrides(mode: str) -> list[str]:
    """``tools`` / ``budget<N>``, optionally ``x<A>``: A router actors (``score.tool_actors``)."""
    base, _, actors = mode.partition("x")
    extra = [f"score.tool_actors={int(actors)}"] if actors else []
    if base == "tools":
        return ["score.mode=tools", *extra]
    if base.startswith("budget"):
        return ["score.mode=routed", f"score.vlm_budget={int(base[len('budget') :])}", *extra]
    raise ValueError(f"unknown mode '{mode}' (tools or budget<N>, optionally x<actors>)")


def _timed_command(args: list[str], log_path: str) -> dict:
    """Run ``args``; wall seconds and the peak RSS of the child (the job's driver)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.time()
    with open(log_path, "w") as fh:
        rc = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": ""}).returncode
    wall = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if rc != 0:
        with open(log_path) as fh:
            tail = fh.read()[-3000:]
        raise RuntimeError(f"{' '.join(args[:4])} ... exited {rc}; log {log_path} ends:\n{tail}")
    # ru_maxrss of children is the largest child so far: only a lower bound once several ran.
    return {"wall_s": round(wall, 1), "driver_peak_rss_gb": round(max(peak, before) / 2**20, 2)}


def run_job(config: str, overrides: list[str], mode: str, tasks: list[str], out_dir: str) -> dict:
    cfg = load_config(config, overrides)
    store = open_store(cfg)
    stage = f"score_scale_{mode}"
    if store.fs.exists(store.path(stage)):
        store.fs.rm(store.path(stage), recursive=True)
    args = [
        sys.executable,
        "-m",
        "ray_jobs.score",
        "--config",
        config,
        *overrides,
        *_mode_overrides(mode),
        f"score.tasks=[{','.join(tasks)}]",
        "score.max_queries_per_task=0",
        f"score.stage_name={stage}",
    ]
    rec = _timed_command(args, os.path.join(out_dir, f"score_scale_{mode}.log"))
    summary = store.manifest(stage).metrics
    rec.update(
        mode=mode,
        queries=summary["queries"],
        job_seconds=summary["seconds"],
        job_queries_per_s=summary["queries_per_s"],
        vlm_calls=summary["vlm_calls"],
        routes=summary["routes"],
        wall_queries_per_s=round(summary["queries"] / rec["wall_s"], 1),
    )
    return rec


def bound(config: str, overrides: list[str], tasks: list[str], max_queries: int = 0) -> dict:
    """Every tool's bare batched answer to the job's queries (see the module docstring)."""
    import torch

    from ray_jobs.score import score_queries
    from reasonrec.data.catalog import load_context
    from reasonrec.planner import load_toolbox

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(config, overrides + [f"score.tasks=[{','.join(tasks)}]", "score.max_queries_per_task=0"])
    store = open_store(cfg)
    toolbox = load_toolbox(store)
    _, users, _ = load_context(store, cfg.vlm, cfg.data.eh_thresholds)
    queries = score_queries(cfg, store)
    step, k = max(cfg.score.shard_rows, 1), cfg.score.k
    per_tool: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    all_rows = queries.to_pylist()
    for task in tasks:
        rows = [r for r in all_rows if r["task"] == task]
        if max_queries:
            rows = rows[:max_queries]
        counts[task] = len(rows)
        states = [users.resolve(r["user_id"], r.get("history"), cfg.score.split) for r in rows]
        for name in toolbox.names(task):
            tool, seconds = toolbox.tools[name], 0.0
            for a in range(0, len(rows), step):
                chunk, st = rows[a : a + step], states[a : a + step]
                u = np.array([s.user_id for s in st], np.int64)
                h = [s.history for s in st]
                t0 = time.perf_counter()
                if task == "sequential":
                    s = np.asarray(tool.score_items(u, h))
                    top = np.argpartition(-s, k - 1, axis=1)[:, :k]
                    np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable")
                elif task == "direct":
                    tool.score_candidates(u, h, np.array([r["candidates"] for r in chunk], np.int64))
                else:
                    tool.predict_ctr(u, np.array([r["item_id"] for r in chunk], np.int64), h)
                seconds += time.perf_counter() - t0
            per_tool.setdefault(task, {})[name] = round(seconds, 2)
    total_s = sum(sum(v.values()) for v in per_tool.values())
    n = sum(counts.values())
    return {
        "queries": counts,
        "tool_seconds": per_tool,
        "seconds": round(total_s, 1),
        "queries_per_s": round(n / max(total_s, 1e-9), 1),
        "torch_threads": torch.get_num_threads(),
    }


def report(res: dict) -> str:
    b = res["bound"]
    lines = [
        "| part | queries | wall s | job s | q/s (job) | q/s (wall) | vs bound (job) | driver peak RSS GB "
        "| VLM calls |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for j in res["jobs"]:
        lines.append(
            f"| score, {j['mode']} | {j['queries']} | {j['wall_s']} | {j['job_seconds']} | {j['job_queries_per_s']} "
            f"| {j['wall_queries_per_s']} | {j['job_queries_per_s'] / b['queries_per_s']:.2f}x "
            f"| {j['driver_peak_rss_gb']} | {j['vlm_calls']} |"
        )
    if res.get("planner"):
        p = res["planner"]
        lines.append(f"| fit_planner | - | {p['wall_s']} | - | - | - | - | {p['driver_peak_rss_gb']} | - |")
    lines.append(
        f"| bound: bare tools ({b['torch_threads']} torch threads) | {sum(b['queries'].values())} | - "
        f"| {b['seconds']} | {b['queries_per_s']} | - | 1.00x | - | - |"
    )
    lines += ["", "| task | tool | bare seconds |", "|---|---|---|"]
    for task, tools in b["tool_seconds"].items():
        for name, s in sorted(tools.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {task} | {name} | {s} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--modes", default="tools", help="comma list: tools, budget<N>")
    ap.add_argument("--tasks", default="sequential,direct,ctr")
    ap.add_argument("--bound-max-queries", type=int, default=0, help="per task; 0 = every query")
    ap.add_argument("--skip-bound", action="store_true")
    args, overrides = ap.parse_known_args(argv)
    tasks = args.tasks.split(",")
    cfg = load_config(args.config, overrides)
    store = open_store(cfg)
    out_dir = store.path()
    res: dict = {"config": args.config, "overrides": overrides, "tasks": tasks, "cpus": os.cpu_count(), "jobs": []}
    planner_args = [sys.executable, "-m", "ray_jobs.fit_planner", "--config", args.config, *overrides]
    modes = args.modes.split(",")
    res["planner"] = _timed_command(
        [*planner_args, *_mode_overrides(modes[0]), f"score.tasks=[{','.join(tasks)}]"],
        os.path.join(out_dir, "score_scale_planner.log"),
    )
    for mode in modes:
        log.info("score_scale: job %s", mode)
        res["jobs"].append(run_job(args.config, overrides, mode, tasks, out_dir))
    if not args.skip_bound:
        log.info("score_scale: bound")
        res["bound"] = bound(args.config, overrides, tasks, args.bound_max_queries)
        print(report(res))
    with open(os.path.join(out_dir, "bench_score_scale.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
