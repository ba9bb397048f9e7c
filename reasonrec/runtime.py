"""Starting or attaching to Ray from an entry point (the only Ray start-up code in the project)."""
from __future__ import annotations

import logging
import os

from reasonrec.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig):
    """Attach to a cluster (``ray.address`` or the RAY_ADDRESS that ``ray job submit`` sets) or start
    a local one bound to 127.0.0.1. Idempotent."""
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(include_dashboard=cfg.include_dashboard, log_to_driver=True,
                  logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=cfg.num_cpus, _node_ip_address="127.0.0.1", **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False
    return ray
