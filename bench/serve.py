"""Load test of the Serve app with locust (headless, loopback only, bounded in requests and time).

    python -m bench.serve --config configs/quickstart.yaml output_root=/tmp/runs            # before / after
    python -m bench.serve --scale --config configs/quickstart.yaml output_root=/tmp/runs    # VLM autoscaling

**Before / after** (default), in one run: the app is started (``ray_jobs.serve.start``: local Ray,
127.0.0.1, a free port) once per variant, one after the other: ``before`` = the old graph
(``serve.graph=split serve.count_flops=true``: ingress -> planner -> tools / VLM, FLOPs counted as
the app did), ``after`` = the config's own ``serve`` section (by default the fused graph). For each:

1. Workloads from the run's prepared test queries (``ray_jobs.score``'s), asked with their query
   ids, so each lands in the tier the batch job gave it: ``recommend`` (``POST /v1/recommend`` for
   the known users of the sequential and direct queries: the issue's load) and ``mix`` (every
   endpoint, round-robin over tasks: medium / high tiers alongside).
2. For each workload and each ``--concurrency``: a locust run (``bench/locustfile.py``, ``-u`` users
   sending back to back) bounded by ``--requests`` responses and ``--phase-s`` seconds; p50 / p95 /
   p99 per endpoint and tier, requests/s and errors (non-200; the exit status is 1 if any).
3. Where the time goes (low tier, one request at a time): HTTP vs the same router in this process
   (tools + planner, no Serve, one torch thread as in the replicas, FLOPs counted as the variant's
   app does).

**VLM autoscaling** (``--scale``): a burst of VLM requests (explanations: always medium / high)
at ``--scale-concurrency`` for ``--phase-s`` seconds with the VLM fixed at 1 replica, then at 2
(throughput of each), then with autoscaling ``[1, 2]`` and short delays (``SCALE``,
``--scale-overrides``): seconds from the burst's start until a second VLM replica is started and
until it runs (the burst then goes on ``--scale-hold-s`` and stops; at most ``--scale-burst-s``),
and from the burst's end until one replica is left.

Results: ``bench/results/serve.json`` (``serve_scale.json``) and a Markdown summary on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from reasonrec.vocab import RISK_TIERS

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
TIERS = RISK_TIERS
BEFORE = ["serve.graph=split", "serve.count_flops=true"]
# Two VLM replicas on 2 CPUs: half a CPU each (and little for the rest); short autoscaling delays
# so that the scale-up and -down happen within the bench (Serve's defaults: 30 s up, 600 s down).
SCALE = [
    "serve.vlm_cpus=0.5",
    "serve.ingress_cpus=0.1",
    "serve.ingress_replicas=[1,1]",  # only the VLM deployment scales here
    "serve.upscale_delay_s=2",
    "serve.downscale_delay_s=10",
    "serve.look_back_period_s=2",
    "serve.target_ongoing_requests=2",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_request(q: dict) -> tuple[str, dict]:
    """The HTTP request for a batch query (same user, item(s), query id)."""
    body = {"user_id": q["user_id"], "query_id": q["query_id"]}
    if q["task"] == "ctr":
        return "/v1/ctr", {**body, "items": [q["item_id"]]}
    if q["task"] == "explanation":
        return "/v1/explain", {**body, "item_id": q["item_id"], "rating": q["rating"]}
    return "/v1/recommend", {**body, **({"candidates": q["candidates"]} if q["task"] == "direct" else {})}


def pct(xs, p) -> float | None:
    return round(float(np.percentile(np.asarray(xs), p)), 1) if len(xs) else None


def _lat(samples: list) -> dict:
    lat = [s[3] for s in samples]
    return {"n": len(lat), "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99)}


def summarize(samples: list[list], wall: float) -> dict:
    """Locust samples ``[path, status, tier, latency_ms, end]`` -> requests/s, errors, latency per
    endpoint and tier (200s only) and over all."""
    ok = [s for s in samples if s[1] == 200]
    out = {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "wall_s": round(wall, 2),
        "req_per_s": round(len(ok) / wall, 2) if wall else None,
        "status_counts": {str(c): sum(1 for s in samples if s[1] == c) for c in sorted({s[1] for s in samples})},
        "all": _lat(ok),
        "by": {},
    }
    for path in sorted({s[0] for s in ok}):
        for tier in TIERS:
            sel = [s for s in ok if s[0] == path and s[2] == tier]
            if sel:
                out["by"][f"{path} {tier}"] = _lat(sel)
    return out


def locust(
    url: str, requests: list[tuple[str, dict]], users: int, max_requests: int, seconds: float, until=None
) -> dict:
    """One headless locust run (a subprocess: locust's gevent patches must stay out of this Ray
    driver) bounded by ``max_requests`` responses and ``seconds``, stopped early (SIGTERM) once
    ``until()`` (polled every 0.25 s) holds; its samples summarized."""
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        queries, samples = Path(tmp, "queries.json"), Path(tmp, "samples.jsonl")
        queries.write_text(json.dumps(requests))
        cmd = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "--only-summary",
            "--loglevel=WARNING",
            f"--users={users}",
            f"--spawn-rate={users}",
            f"--run-time={max(int(seconds), 1)}s",
            "--stop-timeout=10",  # requests still in flight then are cut off (not counted)
            f"--host={url}",
            f"--queries={queries}",
            f"--samples-out={samples}",
            f"--max-requests={max_requests}",
        ]
        t0 = time.perf_counter()
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
            try:
                while proc.poll() is None and time.perf_counter() < t0 + seconds + 120:
                    if until is not None and until():
                        proc.terminate()
                        break
                    time.sleep(0.25)
                proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            err.seek(0)
            stderr = err.read()
        wall = time.perf_counter() - t0
        rows = []
        for line in samples.read_text().splitlines() if samples.exists() else []:
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut off by the early stop
                pass
    if not rows:
        raise RuntimeError(f"locust sent nothing (exit {proc.returncode}): {stderr[-2000:]}")
    # Requests/s over the span of the requests (locust's own start-up and exit are not the app's time).
    span = max(r[4] for r in rows) - min(r[4] - r[3] / 1000 for r in rows)
    out = summarize(rows, span)
    out["locust_wall_s"] = round(wall, 2)
    return out


def _brief(res: dict) -> str:
    return json.dumps({k: res[k] for k in ("requests", "errors", "req_per_s", "all")})


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


def _warm(url: str, requests_: list[tuple[str, dict]], n: int = 8) -> None:
    import requests

    for path, body in requests_[:n]:
        requests.post(url + path, json=body, timeout=120)


_PORT: list[int] = []  # one HTTP port per bench run: Serve's proxy keeps the first one it was started on


def _deploy(config: str, overrides: list[str]):
    from ray_jobs.serve import start
    from reasonrec.config import load_config

    _PORT[:] = _PORT or [_free_port()]
    cfg = load_config(config, [*overrides, f"serve.port={_PORT[0]}", "serve.host=127.0.0.1"])
    t0 = time.perf_counter()
    url = start(cfg)
    return cfg, url, time.perf_counter() - t0


def _undeploy() -> None:
    from ray import serve

    from ray_jobs.serve import APP_NAME

    serve.delete(APP_NAME)


# ------------------------------------------------------------------------------ before / after
def where_the_time_goes(url: str, router, low: list[dict], rounds: int) -> dict:
    """Low-tier queries one at a time: over HTTP vs the router in this process (interleaved, so
    both see the same machine load)."""
    import pyarrow as pa
    import requests

    from reasonrec.data.schemas import QUERIES

    http, inproc = [], []
    with requests.Session() as s:
        for _ in range(rounds):
            for q in low:
                t0 = time.perf_counter()
                router(pa.Table.from_pylist([q], schema=QUERIES))
                inproc.append((time.perf_counter() - t0) * 1000)
                path, body = http_request(q)
                t0 = time.perf_counter()
                r = s.post(url + path, json=body, timeout=60)
                if r.status_code == 200:
                    http.append((time.perf_counter() - t0) * 1000)
    return {
        "low_tier_queries": len(low),
        "rounds": rounds,
        "http_p50_ms": pct(http, 50),
        "router_inprocess_p50_ms": pct(inproc, 50),
        "serving_overhead_p50_ms": round(pct(http, 50) - pct(inproc, 50), 1) if http and inproc else None,
    }


def before_after(args, store, queries: list[dict]) -> dict:
    import pyarrow as pa
    import torch

    from ray_jobs.serve import direct_urls
    from reasonrec.data.schemas import QUERIES
    from reasonrec.scoring import build_router
    from reasonrec.serve.deployments import serving_config

    workloads = {
        "recommend": [http_request(q) for q in queries if q["task"] in ("sequential", "direct")],
        "mix": [http_request(q) for q in queries],
    }
    torch.set_num_threads(1)  # as in the replicas (Ray sets OMP_NUM_THREADS=1 for fractional CPUs)
    variants = {"before": [*args.overrides, *BEFORE], "after": list(args.overrides)}
    out = {"variants": {}}
    router = None
    for name in args.variants:
        cfg, url, startup = _deploy(args.config, variants[name])
        print(f"{name}: app up at {url} in {startup:.1f} s (serve.graph={cfg.serve.graph})", flush=True)
        v = {"overrides": variants[name], "graph": cfg.serve.graph, "app_startup_s": round(startup, 1), "levels": {}}
        try:
            # The proxy (serve.port), and for `after` the ingress replica's own port as well
            # (serve.direct_ingress: no proxy hop), on the same deployment one after the other.
            targets = [("", url)] + ([(" direct", d) for d in direct_urls(cfg)[:1]] if name == "after" else [])
            v["direct_url"] = targets[1][1] if len(targets) > 1 else None
            _warm(url, workloads["mix"])
            for how, base in targets:
                for wl, reqs in workloads.items():
                    for c in args.concurrency:
                        res = locust(base, reqs, c, args.requests, args.phase_s)
                        v["levels"][f"{wl}{how} c={c}"] = res
                        print(f"{name} {wl}{how} c={c}: {_brief(res)}", flush=True)
            if router is None:
                router = build_router(serving_config(cfg), store)
                ranking = [q for q in queries if q["task"] != "explanation"]
                routed = router(pa.Table.from_pylist(ranking, schema=QUERIES)).to_pylist()
                low = [q for q, r in zip(ranking, routed) if r["route"] == "low"][: args.overhead_queries]
            router.count_flops = cfg.serve.count_flops  # what this variant's app does
            for how, base in targets:
                key = "time" + how.replace(" ", "_")
                v[key] = where_the_time_goes(base, router, low, args.overhead_rounds)
                print(f"{name}{how} {key}: {json.dumps(v[key])}", flush=True)
        finally:
            _undeploy()
        out["variants"][name] = v
    return out


def markdown(r: dict) -> str:
    cols = ["variant", "workload", "concurrency", "requests", "errors", "req/s", "endpoint, tier", "n"]
    cols += ["p50 ms", "p95 ms", "p99 ms"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, v in r["variants"].items():
        for level, lv in v["levels"].items():
            wl, c = level.split(" c=")
            rows = list(lv["by"].items()) + [("all", lv["all"])]
            for i, (key, t) in enumerate(rows):
                head = (
                    f"| {name} | {wl} | {c} | {lv['requests']} | {lv['errors']} | {lv['req_per_s']} "
                    if i == 0
                    else "| | | | | | "
                )
                lines.append(f"{head}| {key} | {t['n']} | {t['p50_ms']} | {t['p95_ms']} | {t['p99_ms']} |")
    lines.append("")
    for name, v in r["variants"].items():
        for key in ("time", "time_direct"):
            t = v.get(key)
            if not t:
                continue
            via = "the ingress replica's own port" if key == "time_direct" else "Serve's proxy"
            lines.append(
                f"{name} via {via} ({v['graph']}; app up in {v['app_startup_s']} s): low tier one at a time "
                f"({t['low_tier_queries']} queries x {t['rounds']}): HTTP p50 {t['http_p50_ms']} ms, router in "
                f"this process p50 {t['router_inprocess_p50_ms']} ms -> serving overhead p50 "
                f"{t['serving_overhead_p50_ms']} ms"
            )
    lines.append(f"load average (1/5/15 min) at start {r['loadavg']['start']}, at end {r['loadavg']['end']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ VLM autoscaling
def vlm_replicas(state: str | None = "RUNNING") -> int:
    """VLM replicas in ``state`` (None: in any state: the controller's decision, starting ones too)."""
    from ray import serve

    from ray_jobs.serve import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    states = app.deployments["VLM"].replica_states if app else {}
    return sum(states.values()) if state is None else states.get(state, 0)


def _poll(pred, deadline_s: float, every_s: float = 0.25) -> float | None:
    """Seconds until ``pred()`` holds, or None past the deadline."""
    t0 = time.monotonic()
    while time.monotonic() < t0 + deadline_s:
        if pred():
            return round(time.monotonic() - t0, 1)
        time.sleep(every_s)
    return None


def scale(args, queries: list[dict]) -> dict:
    vlm_reqs = [http_request(q) for q in queries if q["task"] == "explanation"]
    base = [*args.overrides, *SCALE, *args.scale_overrides]
    out = {"overrides": base, "burst": {}}
    for n in (1, 2):  # throughput with the VLM fixed at n replicas
        cfg, url, startup = _deploy(args.config, [*base, f"serve.vlm_replicas=[{n},{n}]"])
        try:
            _warm(url, vlm_reqs, 2)
            res = locust(url, vlm_reqs, args.scale_concurrency, 10**6, args.phase_s)
            out["burst"][f"vlm={n}"] = {"app_startup_s": round(startup, 1), **res}
            print(f"burst with {n} VLM replica(s): {_brief(res)}", flush=True)
        finally:
            _undeploy()
    cfg, url, _ = _deploy(args.config, [*base, "serve.vlm_replicas=[1,2]"])
    try:
        assert vlm_replicas() == 1, vlm_replicas()
        marks: dict = {}
        t0 = time.monotonic()

        def scaled_up() -> bool:
            """Records when the second replica was decided (any state) and when it ran; the burst
            goes on ``--scale-hold-s`` with 2 running replicas, then stops."""
            now = round(time.monotonic() - t0, 1)
            if "decided" not in marks and vlm_replicas(None) >= 2:
                marks["decided"] = now
            if "running" not in marks and vlm_replicas() >= 2:
                marks["running"] = now
            return "running" in marks and now >= marks["running"] + args.scale_hold_s

        burst = locust(url, vlm_reqs, args.scale_concurrency, 10**6, args.scale_burst_s, until=scaled_up)
        idle_from = time.monotonic()
        down = _poll(lambda: vlm_replicas(None) <= 1, args.scale_down_wait_s) if "running" in marks else None
        out["autoscale"] = {
            "burst_max_s": args.scale_burst_s,
            "scale_up_decided_s": marks.get("decided"),  # from the burst's start: a second replica starting
            "scale_up_s": marks.get("running"),  # from the burst's start: 2 replicas running
            "scale_down_s": down,  # from the burst's end: back to 1 replica
            "burst_wall_s": round(idle_from - t0, 1),
            "upscale_delay_s": cfg.serve.upscale_delay_s,
            "downscale_delay_s": cfg.serve.downscale_delay_s,
            "look_back_period_s": cfg.serve.look_back_period_s,
            "burst": {k: burst.get(k) for k in ("requests", "errors", "req_per_s", "all")},
        }
        print(f"autoscale: {json.dumps(out['autoscale'])}", flush=True)
    finally:
        _undeploy()
    return out


def scale_markdown(r: dict) -> str:
    lines = [
        "| VLM replicas | requests | errors | req/s | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, b in r["burst"].items():
        a = b["all"]
        lines.append(
            f"| {name.split('=')[1]} | {b['requests']} | {b['errors']} | {b['req_per_s']} "
            f"| {a['p50_ms']} | {a['p95_ms']} | {a['p99_ms']} |"
        )
    a = r["autoscale"]
    lines.append("")
    lines.append(
        f"Autoscaling [1, 2] (upscale delay {a['upscale_delay_s']} s, downscale delay {a['downscale_delay_s']} s, "
        f"look-back {a['look_back_period_s']} s): a second replica started {a['scale_up_decided_s']} s and "
        f"running {a['scale_up_s']} s after the burst started, "
        f"back to 1 {a['scale_down_s']} s after it ended; burst: {a['burst']}"
    )
    lines.append(f"load average (1/5/15 min) at start {r['loadavg']['start']}, at end {r['loadavg']['end']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--variants", nargs="+", default=["before", "after"], choices=["before", "after"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests", type=int, default=400, help="most responses per locust run")
    p.add_argument("--phase-s", type=float, default=15.0, help="longest locust run (seconds)")
    p.add_argument("--overhead-queries", type=int, default=20, help="low-tier queries asked one at a time")
    p.add_argument("--overhead-rounds", type=int, default=2)
    p.add_argument("--scale", action="store_true", help="the VLM autoscaling bench instead")
    p.add_argument("--scale-concurrency", type=int, default=8)
    p.add_argument("--scale-burst-s", type=float, default=150.0, help="longest autoscaling burst")
    p.add_argument("--scale-hold-s", type=float, default=10.0, help="burst seconds with 2 VLM replicas running")
    p.add_argument("--scale-down-wait-s", type=float, default=60.0)
    p.add_argument("--scale-overrides", nargs="*", default=[], help="more key=value for the scale bench")
    p.add_argument("--out", default=None)
    p.add_argument("overrides", nargs="*", help="config key=value (e.g. output_root=/tmp/runs)")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ray import serve

    from reasonrec.config import load_config
    from reasonrec.io import open_store

    store = open_store(load_config(args.config, args.overrides))
    by_task: dict[str, list[dict]] = {}
    for q in store.read_table("score", "queries").to_pylist():
        by_task.setdefault(q["task"], []).append(q)
    # Round-robin over tasks, so every run's first requests already mix all tasks (and tiers).
    queries = [q for group in itertools.zip_longest(*by_task.values()) for q in group if q is not None]
    load = {"start": os.getloadavg()}
    report = {
        "command": "python -m bench.serve " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "run": store.url(),
        "pool": {t: len(qs) for t, qs in by_task.items()},
    }
    try:
        report.update(scale(args, queries) if args.scale else before_after(args, store, queries))
    finally:
        load["end"] = os.getloadavg()
        report["loadavg"] = {k: [round(x, 2) for x in v] for k, v in load.items()}
        serve.shutdown()
    out = Path(args.out or RESULTS / ("serve_scale.json" if args.scale else "serve.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(scale_markdown(report) if args.scale else markdown(report))
    levels = (
        list(report["burst"].values())
        if args.scale
        else [lv for v in report["variants"].values() for lv in v["levels"].values()]
    )
    return 1 if sum(lv["errors"] for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
