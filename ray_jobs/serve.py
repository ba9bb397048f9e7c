"""serve: the online app (Ray Serve) for a finished run, until interrupted.

    python -m ray_jobs.serve --config configs/quickstart.yaml [key=value ...]

Serves ``{output_root}/{run_name}`` (run the pipeline and ``ray_jobs.score`` first: the app needs
the tools, the planner and the fine-tuned adapter) on ``serve.host:serve.port`` (127.0.0.1:8000
by default), prints the URL and blocks; Ctrl-C or SIGTERM shuts the app down. Without
``ray.address`` it starts a local Ray bound to 127.0.0.1, with it it deploys onto that cluster.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from reasonrec.config import RunConfig, parse_cli, planner_warnings

APP_NAME = "reasonrec"


def start(cfg: RunConfig) -> str:
    """Deploy the app (returns once every replica is up); returns its base URL."""
    from ray import serve

    from reasonrec.runtime import init_ray
    from reasonrec.serve.app import build

    for warning in planner_warnings(cfg):
        logging.getLogger("reasonrec.serve").warning("serve: %s", warning)
    init_ray(cfg.ray)
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s})
    serve.run(build(cfg), name=APP_NAME, route_prefix="/")
    return f"http://{s.host}:{s.port}"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    _, cfg = parse_cli("Serve a finished run over HTTP (Ray Serve).", argv)
    from ray import serve

    url = start(cfg)
    print(
        f"serving run {cfg.run_name} from {cfg.output_root} at {url} (API docs: {url}/docs); Ctrl-C stops", flush=True
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the shutdown below, as Ctrl-C does
    try:
        threading.Event().wait()
    except (KeyboardInterrupt, SystemExit):
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
