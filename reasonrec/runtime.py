"""Starting or attaching to Ray from an entry point (the only Ray start-up code in the project)."""

from __future__ import annotations

import logging
import os

from reasonrec.config import RayConfig

log = logging.getLogger(__name__)
# Ray Train's placement-group cleaner (a detached actor per training run) asks the State API every
# second whether the run's controller lives. A local cluster started without a dashboard has no
# State API, so each check fails and logs this warning: most lines of a long CPU fine-tune's log.
TRAIN_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
STATE_API_MISS = "Failed to query Ray Train Controller actor state"


def _not_a_state_api_miss(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(STATE_API_MISS)


def quiet_train_cleaner() -> None:
    """Ray ``worker_process_setup_hook`` of a local cluster started without a dashboard: drops the
    cleaner's State API misses (which cannot succeed there) and keeps its other messages, e.g. the
    one saying it removed a dead run's placement group."""
    logger = logging.getLogger(TRAIN_CLEANER_LOGGER)
    if _not_a_state_api_miss not in logger.filters:
        logger.addFilter(_not_a_state_api_miss)


# ray.shuffle_strategy=auto: a sort shuffle up to this many input rows, Ray's hash shuffle above. On
# 2 CPUs (BENCHMARKS.md, prepare): 1M interactions 25.6 s sort vs 61.6 s hash, cluster PSS 2.3 vs
# 1.5 GB; 10M: the sort's cluster PSS 9.0 GB vs 4.8 GB, its RSS 22.6 GB on a 24 GB machine.
AUTO_SORT_SHUFFLE_MAX_ROWS = 2_000_000


def pick_shuffle_strategy(cfg: RayConfig, rows: int) -> str:
    """Set Ray Data's shuffle strategy for a job about to shuffle ``rows`` rows; returns its name."""
    import ray

    ctx = ray.data.DataContext.get_current()
    if cfg.shuffle_strategy == "auto":
        name = "sort_shuffle_pull_based" if rows <= AUTO_SORT_SHUFFLE_MAX_ROWS else "shuffle_v2"
        ctx.shuffle_strategy = ray.data.context.ShuffleStrategy(name)
    return ctx.shuffle_strategy.value


def serve_env(direct_port: int) -> dict[str, str]:
    """The environment of a Ray cluster that serves the app in Ray Serve's throughput-optimized mode
    (``serve.direct_ingress``): the ingress replicas answer HTTP themselves on ports from
    ``direct_port`` (100 of them; a replica's port is quarantined for a while after it stops, so a
    redeploy takes the next), skipping the proxy hop (~10 ms of a low-tier request on 2 CPUs);
    user code runs on the replica's event loop; deployments talk gRPC. Ray reads these when its
    processes start, so they must be set before the cluster starts (``ray start`` on a cluster).

    A stopping ingress replica keeps answering for a drain period so that a load balancer in front
    can take it out first; Ray's default is 30 s. Here it is 2 s: a Ray this launcher starts has no
    load balancer in front (on a cluster behind one, leave that variable unset)."""
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(direct_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(direct_port + 99),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        # The mode would also run the deployment handles' router on the replica's event loop; the
        # split graph's planner calls the tools' handle from a worker thread (the Router is sync
        # code), which a handle can then not do: keep Ray's default, a loop of its own.
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    }


def init_ray(cfg: RayConfig):
    """Attach to a cluster (``ray.address`` or the RAY_ADDRESS that ``ray job submit`` sets) or start
    a local one bound to 127.0.0.1. Idempotent."""
    import ray

    if not ray.is_initialized():
        _start_or_attach(ray, cfg)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False
    if cfg.shuffle_strategy != "auto":
        ctx.shuffle_strategy = ray.data.context.ShuffleStrategy(cfg.shuffle_strategy)
    if cfg.data_no_progress_timeout_s:  # per job, also on a cluster this process already joined
        ctx.execution_no_progress_timeout_s = cfg.data_no_progress_timeout_s
    return ray


def _start_or_attach(ray, cfg: RayConfig) -> None:
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(include_dashboard=cfg.include_dashboard, log_to_driver=True, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if not cfg.include_dashboard:
            kwargs["runtime_env"] = {"worker_process_setup_hook": f"{__name__}.quiet_train_cleaner"}
        ray.init(num_cpus=cfg.num_cpus, _node_ip_address="127.0.0.1", **kwargs)
