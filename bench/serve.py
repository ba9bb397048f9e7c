"""Load test of the Serve app (loopback only, bounded in requests and time), in one run:

    python -m bench.serve --config configs/quickstart.yaml output_root=/tmp/runs

1. Starts the app for the run (``ray_jobs.serve.start``: local Ray, 127.0.0.1, a free port) and
   loads the same run's router in this process.
2. Query pool: the run's prepared test queries of every task (``ray_jobs.score``'s), asked as HTTP
   requests with their query ids, so each lands in the tier the batch job gave it.
3. Latency: at each fixed concurrency (``--concurrency``), ``--requests`` requests from that many
   client threads (keep-alive sessions); p50/p95/p99 per tier (from each response's ``tier``).
4. Sustained: ``--sustain-s`` seconds at ``--sustain-concurrency`` over the same mix; requests/s
   and errors (must be zero: the exit status is 1 otherwise).
5. Graph overhead: low-tier queries (ingress -> planner -> tools, VLM bypassed) one at a time
   over HTTP vs the same queries through the router in this process (tools + planner, no Serve;
   one torch thread, as in the replicas), and vs the tools alone (``ToolBox.answer``), each query
   asked ``--overhead-rounds`` times on each side, interleaved.

Every phase stops at its deadline (``--phase-timeout-s``) even if requests remain. Results:
``bench/results/serve.json`` and a Markdown summary on stdout.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

from reasonrec.vocab import RISK_TIERS

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "serve.json"
TIERS = RISK_TIERS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_request(q: dict) -> tuple[str, dict]:
    body = {"user_id": q["user_id"], "query_id": q["query_id"]}
    if q["task"] == "ctr":
        return "/v1/ctr", {**body, "items": [q["item_id"]]}
    if q["task"] == "explanation":
        return "/v1/explain", {**body, "item_id": q["item_id"], "rating": q["rating"]}
    return "/v1/recommend", {**body, **({"candidates": q["candidates"]} if q["task"] == "direct" else {})}


class Client:
    """Client threads, each with its own keep-alive session; records (latency s, status, tier)."""

    def __init__(self, url: str):
        import requests

        self.url, self.local = url, threading.local()
        self._requests = requests

    def ask(self, q: dict) -> tuple[float, int, str | None]:
        s = getattr(self.local, "s", None) or self._session()
        path, body = http_request(q)
        t0 = time.perf_counter()
        try:
            r = s.post(self.url + path, json=body, timeout=120)
        except self._requests.RequestException:
            return time.perf_counter() - t0, 0, None
        dt = time.perf_counter() - t0
        tier = None
        if r.status_code == 200:
            j = r.json()
            tier = (j["predictions"][0] if q["task"] == "ctr" else j)["tier"]
        return dt, r.status_code, tier

    def _session(self):
        self.local.s = self._requests.Session()
        return self.local.s

    def run(self, pool: list[dict], n: int | None, concurrency: int, deadline_s: float) -> list[tuple]:
        """``n`` requests (cycling over ``pool``), or as many as fit before the deadline when n is None."""
        stop = time.monotonic() + deadline_s
        counter, lock, out = iter(range(n if n is not None else 10**9)), threading.Lock(), []

        def worker():
            while time.monotonic() < stop:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                res = self.ask(pool[i % len(pool)])
                with lock:
                    out.append(res)

        with concurrent.futures.ThreadPoolExecutor(concurrency) as ex:
            for f in [ex.submit(worker) for _ in range(concurrency)]:
                f.result()
        return out


def pct(xs, p) -> float | None:
    return round(float(np.percentile(np.asarray(xs) * 1000, p)), 1) if len(xs) else None


def summarize(results: list[tuple], wall: float) -> dict:
    ok = [r for r in results if r[1] == 200]
    out = {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "wall_s": round(wall, 2),
        "req_per_s": round(len(ok) / wall, 2) if wall else None,
        "status_counts": {str(c): sum(1 for r in results if r[1] == c) for c in sorted({r[1] for r in results})},
    }
    for tier in TIERS + ("all",):
        lat = [r[0] for r in ok if tier == "all" or r[2] == tier]
        out[tier] = {"n": len(lat), "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99)}
    return out


def machine() -> dict:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    import ray

    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "ray": ray.__version__,
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=60, help="requests per concurrency level")
    p.add_argument("--sustain-s", type=float, default=30.0)
    p.add_argument("--sustain-concurrency", type=int, default=4)
    p.add_argument("--overhead-requests", type=int, default=30, help="low-tier queries in the overhead phase")
    p.add_argument("--overhead-rounds", type=int, default=3, help="times each of them is asked on each side")
    p.add_argument("--phase-timeout-s", type=float, default=180.0)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("overrides", nargs="*", help="config key=value (e.g. output_root=/tmp/runs)")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pyarrow as pa

    from reasonrec.config import load_config
    from reasonrec.data.schemas import QUERIES
    from reasonrec.io import open_store
    from reasonrec.scoring import build_router

    cfg = load_config(args.config, [*args.overrides, f"serve.port={_free_port()}", "serve.host=127.0.0.1"])
    store = open_store(cfg)
    by_task: dict[str, list[dict]] = {}
    for q in store.read_table("score", "queries").to_pylist():
        by_task.setdefault(q["task"], []).append(q)
    # Round-robin over tasks, so every phase's first requests already mix all tasks (and tiers).
    queries = [q for group in itertools.zip_longest(*by_task.values()) for q in group if q is not None]
    load = {"start": os.getloadavg()}
    t_start = time.perf_counter()
    from ray import serve

    from ray_jobs.serve import start

    url = start(cfg)
    startup_s = time.perf_counter() - t_start
    print(f"app up at {url} in {startup_s:.1f}s", flush=True)
    # In-process reference for the overhead phase, on one thread like the replicas (Ray sets
    # OMP_NUM_THREADS=1 for actors with fractional CPUs).
    import torch

    torch.set_num_threads(1)
    router = build_router(cfg, store)
    client = Client(url)
    report = {
        "command": "python -m bench.serve " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "run": store.url(),
        "app_startup_s": round(startup_s, 1),
        "pool": {t: sum(q["task"] == t for q in queries) for t in cfg.score.tasks},
        "levels": {},
    }
    try:
        client.run(queries, min(len(queries), 8), 2, args.phase_timeout_s)  # warm-up (not measured)
        for c in args.concurrency:
            t0 = time.perf_counter()
            res = client.run(queries, args.requests, c, args.phase_timeout_s)
            report["levels"][str(c)] = summarize(res, time.perf_counter() - t0)
            print(f"concurrency {c}: {json.dumps(report['levels'][str(c)])}", flush=True)
        t0 = time.perf_counter()
        res = client.run(queries, None, args.sustain_concurrency, args.sustain_s)
        report["sustained"] = {"concurrency": args.sustain_concurrency, **summarize(res, time.perf_counter() - t0)}
        print(f"sustained: {json.dumps(report['sustained'])}", flush=True)

        # Graph overhead on low-tier queries (the in-process router says which are low).
        ranking = [q for q in queries if q["task"] != "explanation"]
        routed = router(pa.Table.from_pylist(ranking, schema=QUERIES)).to_pylist()
        low = [q for q, r in zip(ranking, routed) if r["route"] == "low"][: args.overhead_requests]
        http, inproc, tools = [], [], []
        for _ in range(args.overhead_rounds):  # each side per query, interleaved: same load for both
            for q in low:
                t0 = time.perf_counter()
                router(pa.Table.from_pylist([q], schema=QUERIES))
                inproc.append(time.perf_counter() - t0)
                st = router.users.resolve(q["user_id"], None, "test")
                kw = (
                    {"candidates": np.array([q["candidates"]])}
                    if q["task"] == "direct"
                    else {"items": np.array([q["item_id"]])}
                    if q["task"] == "ctr"
                    else {}
                )
                t0 = time.perf_counter()
                router.toolbox.answer(q["task"], np.array([st.user_id]), [st.history], router.k, **kw)
                tools.append(time.perf_counter() - t0)
                dt, code, tier = client.ask(q)
                if code == 200 and tier == "low":
                    http.append(dt)
        report["overhead"] = {
            "low_tier_queries": len(low),
            "rounds": args.overhead_rounds,
            "http_ok": len(http),
            "http_p50_ms": pct(http, 50),
            "http_p95_ms": pct(http, 95),
            "router_inprocess_p50_ms": pct(inproc, 50),
            "tools_inprocess_p50_ms": pct(tools, 50),
            "graph_overhead_p50_ms": round(pct(http, 50) - pct(inproc, 50), 1) if http and inproc else None,
        }
        print(f"overhead: {json.dumps(report['overhead'])}", flush=True)
    finally:
        load["end"] = os.getloadavg()
        report["loadavg"] = {k: [round(x, 2) for x in v] for k, v in load.items()}
        serve.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(markdown(report))
    errors = sum(lv["errors"] for lv in report["levels"].values()) + report["sustained"]["errors"]
    return 1 if errors else 0


def markdown(r: dict) -> str:
    lines = [
        "| concurrency | requests | errors | req/s | tier | n | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c, lv in list(r["levels"].items()) + [(f"{r['sustained']['concurrency']} (sustained)", r["sustained"])]:
        for i, tier in enumerate(TIERS + ("all",)):
            t = lv[tier]
            head = f"| {c} | {lv['requests']} | {lv['errors']} | {lv['req_per_s']} " if i == 0 else "| | | | "
            lines.append(f"{head}| {tier} | {t['n']} | {t['p50_ms']} | {t['p95_ms']} | {t['p99_ms']} |")
    o = r["overhead"]
    lines.append("")
    lines.append(
        f"Low tier, one at a time ({o['low_tier_queries']} queries x {o['rounds']}): "
        f"HTTP p50 {o['http_p50_ms']} ms (p95 "
        f"{o['http_p95_ms']}), router in-process p50 {o['router_inprocess_p50_ms']} ms, tools alone "
        f"in-process p50 {o['tools_inprocess_p50_ms']} ms -> graph overhead p50 {o['graph_overhead_p50_ms']} ms"
    )
    lines.append(f"load average (1/5/15 min) at start {r['loadavg']['start']}, at end {r['loadavg']['end']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
