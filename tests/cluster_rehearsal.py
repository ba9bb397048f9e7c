"""Multi-node rehearsals of the scoring job, each on a Ray cluster of its own on 127.0.0.1.

    python tests/cluster_rehearsal.py node-kill RESULT.json key=value ...
    python tests/cluster_rehearsal.py autoscale RESULT.json key=value ...

Run by tests/test_multinode.py in a process of its own: the test session's Ray (tests/conftest.py)
lives in the pytest process, and a process joins one cluster only. The ``key=value`` arguments are
the scoring job's config overrides (on configs/quickstart.yaml); RESULT.json gets the job's summary
and what the rehearsal saw.

``node-kill``: ``ray.cluster_utils.Cluster``, a head without CPUs (as in cluster/aws.yaml) and two
2-CPU worker nodes; once the first shard is written, one worker node is killed (SIGKILL, as a
machine is lost) while the job runs on.

``autoscale``: Ray's fake multi-node provider with autoscaler v2, configured as
``ray.cluster_utils.AutoscalingCluster`` configures it, but started here: that class cannot run
on this Ray install or beside another Ray (see ``FakeAutoscalingCluster``). The head has no CPUs;
the worker node type is cluster/aws.yaml's CPU worker type (same name, same resource names,
fewer CPUs). The job's router pool makes the autoscaler add worker nodes; afterwards the idle
nodes must be removed.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("rehearsal")
# Node loss is noticed by the GCS's health checks: by default a dead raylet is declared dead after
# about 20 s; these make it a few seconds (this cluster only).
FAST_NODE_DEATH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 4,
}


def _config(overrides: list[str], address: str):
    from reasonrec.config import CONFIG_DIR, load_config

    return load_config(CONFIG_DIR / "quickstart.yaml", [*overrides, f"ray.address={address}"])


def _staging(cfg) -> str:
    from ray_jobs import score
    from reasonrec.io import TMP_DIR, open_store

    store = open_store(cfg)
    return store.path(TMP_DIR, score.staging_name(cfg, store), "predictions")


def _written(folder: str) -> int:
    return sum(p.endswith(".parquet") for p in os.listdir(folder)) if os.path.isdir(folder) else 0


def _alive_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"]]


def node_kill(overrides: list[str]) -> dict:
    import re

    import ray
    from ray.cluster_utils import Cluster

    from ray_jobs import score

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "no_monitor": True,  # no autoscaler: this cluster has the nodes it gets
            "_system_config": FAST_NODE_DEATH,
        },
    )
    seen: dict = {}
    first = threading.Event()

    class FirstShard(logging.Handler):
        """Catches the job's first "shard N written on node X" line: X is the victim."""

        def emit(self, record):
            m = re.match(r"score: shard \d+ written on node (\w+)", record.getMessage())
            if m and not first.is_set():
                seen["first_node"] = m.group(1)
                first.set()

    handler = FirstShard()
    logging.getLogger("reasonrec.score").addHandler(handler)
    try:
        workers = [cluster.add_node(wait=False, num_cpus=2, node_ip_address="127.0.0.1") for _ in range(2)]
        cluster.wait_for_nodes(timeout=120)
        seen["workers"] = [w.node_id for w in workers]
        log.info("cluster up: head + %d worker nodes", len(workers))
        cfg = _config(overrides, cluster.address)
        staging = _staging(cfg)

        def kill_the_first_writer() -> None:
            if not first.wait(timeout=300):
                return
            (victim,) = [w for w in workers if w.node_id.startswith(seen["first_node"])]
            seen["written_at_kill"] = _written(staging)
            cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: a lost machine
            seen["killed"] = victim.node_id
            log.info("killed worker node %s (%d shards written)", victim.node_id[:8], seen["written_at_kill"])

        killer = threading.Thread(target=kill_the_first_writer, daemon=True)
        killer.start()
        summary = score.run(cfg)
        killer.join(timeout=60)
        seen["alive_after"] = [n["NodeID"] for n in _alive_nodes(ray)]
        return {"summary": summary, **seen}
    finally:
        logging.getLogger("reasonrec.score").removeHandler(handler)
        ray.shutdown()
        cluster.shutdown()


# The fake provider's head node type (its name is fixed by the provider).
FAKE_HEAD_TYPE = "ray.head.default"


class FakeAutoscalingCluster:
    """Ray's fake autoscaling cluster (``fake_multinode`` provider, autoscaler v2) with the config
    and environment ``ray.cluster_utils.AutoscalingCluster`` gives it, started differently:

    - AutoscalingCluster reads its base config from ``fake_multi_node/example.yaml``, which the Ray
      wheel does not ship (FileNotFoundError on construction); the same base config is here. The
      autoscaler reads that file too, as the defaults of provider type ``fake_multinode``, so the
      same provider class is named as an ``external`` provider (which needs no defaults file);
    - its ``start()`` and ``shutdown()`` run ``ray stop --force``, which kills every Ray process on
      the machine (the test session's own cluster too); here the head is a
      ``ray.cluster_utils.Cluster`` head on a free port with its own temp dir, and shutdown ends
      only processes that run under that temp dir.
    """

    def __init__(self, head_cpus: int, worker_node_types: dict, idle_timeout_minutes: float):
        self.port = _free_port()
        # Short (Ray's socket paths must fit in 107 bytes); under RAY_TMPDIR when it is set.
        self.temp_dir = tempfile.mkdtemp(prefix="as-", dir=os.environ.get("RAY_TMPDIR"))
        self.config = {
            "cluster_name": "fake_multinode",
            "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
            "provider": {
                # Ray's fake provider as an external provider class (see the class docstring)
                "type": "external",
                "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                # autoscaler v2, as AutoscalingCluster(autoscaler_v2=True) sets it
                "launch_multiple": True,
                "head_node_id": FAKE_HEAD_NODE_ID,
                "gcs_address": f"127.0.0.1:{self.port}",  # not the default 6379: ours only
            },
            "available_node_types": {
                **worker_node_types,
                FAKE_HEAD_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            },
            "head_node_type": FAKE_HEAD_TYPE,
            "auth": {},
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_timeout_minutes,
            "docker": {},
            **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands")},
            **{k: [] for k in ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
        }
        self.head_cpus = head_cpus
        self.cluster = None

    def start(self):
        from ray._common.utils import get_ray_address_file
        from ray.cluster_utils import Cluster

        # Cluster records the head's address in Ray's default temp dir (which the head does not use).
        os.makedirs(os.path.dirname(get_ray_address_file(None)), exist_ok=True)
        path = Path(self.temp_dir) / "autoscaling.json"
        path.write_text(json.dumps(self.config))
        env = {
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_FAKE_CLUSTER": "1",
            "RAY_enable_autoscaler_v2": "1",
            "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
        }
        os.environ.update(env)  # inherited by the head's processes (the autoscaler among them)
        try:
            self.cluster = Cluster(
                initialize_head=True,
                head_node_args={
                    "num_cpus": self.head_cpus,
                    "gcs_server_port": self.port,
                    "node_ip_address": "127.0.0.1",
                    "temp_dir": self.temp_dir,
                    "include_dashboard": False,
                    "autoscaling_config": str(path),
                },
            )
        finally:
            for k in ("RAY_CLOUD_INSTANCE_ID", "RAY_OVERRIDE_NODE_ID_FOR_TESTING"):  # the head's only
                os.environ.pop(k, None)
        return self.cluster.address

    def shutdown(self):
        if self.cluster is not None:
            self.cluster.shutdown()
        # Worker nodes the autoscaler started and has not removed yet (the provider starts them in
        # the autoscaler's process, without fate sharing): the processes under our temp dir.
        kill_under(self.temp_dir)


FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"  # ray.cluster_utils'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_under(temp_dir: str) -> list[int]:
    """The processes whose command line names ``temp_dir`` (one test cluster's), but this one."""
    import re

    under = re.compile(re.escape(temp_dir) + r"(/|\s|$)")
    pids = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if under.search(cmd) and pid != os.getpid():
            pids.append(pid)
    return pids


def kill_under(temp_dir: str, grace_s: float = 0.0) -> list[int]:
    """Give the processes under ``temp_dir`` ``grace_s`` seconds to exit, then SIGKILL those left;
    returns their pids."""
    import signal

    deadline = time.monotonic() + grace_s
    while (left := processes_under(temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)  # polling for processes that are exiting
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


# The launcher's worker node types shrunk to this machine: the same names and resource names, at
# most this many CPUs and nodes each.
SHRUNK_CPUS, SHRUNK_MAX_WORKERS = 2, 2


def fake_node_types(launcher: dict) -> tuple[float, dict]:
    """(head CPUs, worker node types) for the fake cluster from a cluster-launcher config: its CPU
    worker types (the tools-mode job asks for CPUs only; with the GPU type offered as well, the
    autoscaler also started GPU nodes for that demand, which only slowed the rehearsal)."""
    types = launcher["available_node_types"]
    head = launcher["head_node_type"]
    workers = {}
    for name, t in types.items():
        if name == head or t["resources"].get("GPU", 0):
            continue
        resources = dict(t["resources"])
        resources["CPU"] = min(resources["CPU"], SHRUNK_CPUS)
        workers[name] = {
            "resources": resources,
            "node_config": {},
            "min_workers": t.get("min_workers", 0),
            "max_workers": min(t["max_workers"], SHRUNK_MAX_WORKERS),
        }
    return types[head]["resources"].get("CPU", 0), workers


def autoscale(overrides: list[str]) -> dict:
    import ray

    from ray_jobs import score

    launcher = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    head_cpus, worker_types = fake_node_types(launcher)
    fake = FakeAutoscalingCluster(head_cpus, worker_types, idle_timeout_minutes=0.05)  # idle 3 s
    seen: dict = {"worker_types": worker_types, "head_cpus": head_cpus, "nodes_seen": {}}
    stop = threading.Event()

    def watch_nodes() -> None:
        """Every node seen alive while the job runs: id -> its resources (a removed node's are gone)."""
        while not stop.is_set():
            for n in _alive_nodes(ray):
                seen["nodes_seen"].setdefault(n["NodeID"], n["Resources"])
            stop.wait(0.5)

    try:
        address = fake.start()
        cfg = _config(overrides, address)
        ray.init(address=address, logging_level="WARNING")
        seen["nodes_before"] = [n["NodeID"] for n in _alive_nodes(ray)]
        log.info("cluster up: head alone")
        watcher = threading.Thread(target=watch_nodes, daemon=True)
        watcher.start()
        try:
            summary = score.run(cfg)
        finally:
            stop.set()
            watcher.join(timeout=30)
        log.info("job done; %d nodes seen", len(seen["nodes_seen"]))
        t0 = time.monotonic()
        while len(_alive_nodes(ray)) > 1 and time.monotonic() < t0 + 120:
            time.sleep(0.5)  # polling the cluster for the autoscaler's removal of idle nodes
        seen["alive_after"] = [n["NodeID"] for n in _alive_nodes(ray)]
        seen["scale_down_s"] = round(time.monotonic() - t0, 1)
        log.info("%d nodes alive after %.1f s", len(seen["alive_after"]), seen["scale_down_s"])
        return {"summary": summary, **seen}
    finally:
        ray.shutdown()
        fake.shutdown()


def main() -> None:
    # As tests/conftest.py: Ray keeps 127.0.0.1 as the address of every node (and of the address a
    # driver joins) instead of resolving it to the machine's outward address. Set before Ray loads.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.pop("RAY_ADDRESS", None)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    what, result, *overrides = sys.argv[1:]
    log.info("%s: starting", what)
    out = {"node-kill": node_kill, "autoscale": autoscale}[what](overrides)
    log.info("%s: cluster shut down", what)
    Path(result).write_text(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
