"""serve: the online app (Ray Serve) for a finished run, until interrupted.

    python -m ray_jobs.serve --config configs/quickstart.yaml [key=value ...]

Serves ``{output_root}/{run_name}`` (run the pipeline and ``ray_jobs.score`` first: the app needs
the tools, the planner and the fine-tuned adapter) on ``serve.host:serve.port`` (127.0.0.1:8000
by default), prints the URL and blocks; Ctrl-C or SIGTERM shuts the app down. Without
``ray.address`` it starts a local Ray bound to 127.0.0.1, with it it deploys onto that cluster.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from reasonrec.config import RunConfig, parse_cli, planner_warnings

APP_NAME = "reasonrec"


def start(cfg: RunConfig) -> str:
    """Deploy the app (returns once every replica is up); returns its base URL (Serve's proxy;
    :func:`direct_urls` gives the ingress replicas' own)."""
    import ray
    from ray import serve

    from reasonrec.runtime import init_ray, serve_env
    from reasonrec.serve.app import build

    for warning in planner_warnings(cfg):
        logging.getLogger("reasonrec.serve").warning("serve: %s", warning)
    s = cfg.serve
    if s.direct_ingress and not ray.is_initialized() and not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        for key, value in serve_env(s.direct_port).items():  # the local Ray about to start inherits them
            os.environ.setdefault(key, value)
    init_ray(cfg.ray)
    serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s})
    serve.run(build(cfg), name=APP_NAME, route_prefix="/")
    return f"http://{s.host}:{s.port}"


def direct_urls(cfg: RunConfig) -> list[str]:
    """Base URLs of the ingress replicas that answer HTTP themselves (Serve's direct ingress,
    ``serve.direct_ingress``); empty when the cluster runs without it. From the controller's target
    groups (Serve has no public call for them yet; its REST API serves the same list)."""
    from ray.serve.context import _get_global_client

    try:
        details = _get_global_client().get_serve_details()
    except Exception:  # noqa: BLE001 -- no Serve instance or an older Ray: no direct URLs
        return []
    ports = set()
    for group in details.get("target_groups", []):
        if str(group.get("protocol")).upper().endswith("HTTP") and group.get("route_prefix") == "/":
            ports.update(t["port"] for t in group.get("targets", []))
    ports.discard(cfg.serve.port)  # without direct ingress the targets are the proxies
    return [f"http://{cfg.serve.host}:{p}" for p in sorted(ports)]


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    _, cfg = parse_cli("Serve a finished run over HTTP (Ray Serve).", argv)
    from ray import serve

    url = start(cfg)
    print(
        f"serving run {cfg.run_name} from {cfg.output_root} at {url} (API docs: {url}/docs); Ctrl-C stops", flush=True
    )
    direct = direct_urls(cfg)
    if direct:
        print(f"ingress replicas answering directly (no proxy hop, lowest latency): {', '.join(direct)}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the shutdown below, as Ctrl-C does
    try:
        threading.Event().wait()
    except (KeyboardInterrupt, SystemExit):
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
