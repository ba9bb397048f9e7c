"""The scoring job on multi-node Ray clusters on this machine (127.0.0.1), each run by
tests/cluster_rehearsal.py in a process of its own: a worker node killed mid-run, and Ray's fake
autoscaling cluster adding worker nodes for the job and removing them once idle. Every query is
answered exactly once in both. Tools mode (no VLM) on the session's tiny run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from cluster_rehearsal import fake_node_types, kill_under
from conftest import TINY_RUN

from ray_jobs import score
from reasonrec.config import CONFIG_DIR, load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("cluster_rehearsal.py")
POOL = ["score.tool_actors=2", "score.tool_cpus=1"]  # 2 router actors of 1 CPU each


def _overrides(cfg, stage: str, shard_rows: int) -> list[str]:
    return TINY_RUN + [
        f"output_root={cfg.output_root}",
        "score.mode=tools",
        "score.tasks=[sequential,direct,ctr]",  # (explanations always take the VLM)
        f"score.stage_name={stage}",
        f"score.shard_rows={shard_rows}",  # many small shards: the kill lands mid-run
        *POOL,
    ]


def _rehearse(what: str, overrides: list[str]) -> dict:
    """Run one rehearsal; its result. Every process of its cluster must be gone afterwards."""
    tmp = tempfile.mkdtemp(prefix="rrmn", dir="/tmp")  # short: Ray's socket paths < 108 bytes
    result = Path(tmp) / "result.json"
    env = {**os.environ, "RAY_TMPDIR": tmp}  # its own Ray temp dir: not the session cluster's
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), what, str(result), *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        try:
            log, _ = proc.communicate(timeout=420)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}); its log ends:\n{log[-8000:]}"
        out = json.loads(result.read_text())
    finally:
        survivors = kill_under(tmp, grace_s=15)
        shutil.rmtree(tmp, ignore_errors=True)
    assert not survivors, f"processes of the {what} cluster outlived it: {survivors}"
    return out


def _assert_exactly_once(store, stage: str, c) -> None:
    """The committed predictions + rejected hold every query of the job's input exactly once."""
    queries = score.score_queries(c, store)  # the input, rebuilt here from the prepared tables
    got = (
        store.read_table(stage, "predictions").column("query_id").to_pylist()
        + store.read_table(stage, "rejected").column("query_id").to_pylist()
    )
    assert len(got) == len(set(got)) == queries.num_rows == 36  # 12 per task x 3 tasks
    assert set(got) == set(queries.column("query_id").to_pylist())


def test_node_kill_mid_run_still_scores_every_query_exactly_once(tiny_run):
    """Head (0 CPUs) + two 2-CPU worker nodes; the worker node that wrote the first shard is
    killed (SIGKILL) while the job runs: its router actor is restarted on the other node, the
    shard it had in hand retried, and the job commits every query once."""
    cfg, store = tiny_run
    over = _overrides(cfg, "score_node_kill", shard_rows=2)
    r = _rehearse("node-kill", over)
    assert "killed" in r, "no worker node was killed: no shard was written"
    s, killed, workers = r["summary"], r["killed"], r["workers"]
    assert s["shards"] == 18 and s["shards_resumed"] == 0
    assert 1 <= r["written_at_kill"] < s["shards"]  # killed mid-run, after a shard was written
    assert killed in workers and killed not in r["alive_after"]
    # The shards were spread over both worker nodes (the killed one wrote before its loss), each
    # written once as far as the job saw it, and the lost node's actor was restarted by Ray.
    assert set(s["nodes"]) == set(workers) and s["nodes"][killed] >= 1
    assert sum(s["nodes"].values()) == s["shards"]
    assert s["actor_restarts"]["router"] >= 1
    assert "written on 2 nodes" in score.format_summary(s)
    _assert_exactly_once(store, "score_node_kill", load_config(CONFIG_DIR / "quickstart.yaml", over))


def test_autoscaler_adds_worker_nodes_for_the_job_and_removes_them_idle(tiny_run):
    """Ray's fake autoscaling cluster, autoscaler v2, with cluster/aws.yaml's head (0 CPUs) and
    CPU worker type (its name and resource names; 2 CPUs, at most 2 nodes): the router pool asks
    for CPUs the head has not, the autoscaler adds worker nodes, the job commits every query once,
    and the idle nodes are removed (idle timeout 3 s)."""
    cfg, store = tiny_run
    launcher = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    head_cpus, worker_types = fake_node_types(launcher)
    assert head_cpus == 0 and list(worker_types) == ["cpu_worker"]
    # The KubeRay cluster names the same Ray resources: a head without CPUs and a CPU-only group.
    (kube,) = yaml.safe_load_all((REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    assert kube["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    kube_groups = {
        g["groupName"]: {"CPU"} | ({"GPU"} if "num-gpus" in g["rayStartParams"] else set())
        for g in kube["spec"]["workerGroupSpecs"]
    }
    types = launcher["available_node_types"]
    launcher_types = [set(t["resources"]) for n, t in types.items() if n != launcher["head_node_type"]]
    assert sorted(map(sorted, kube_groups.values())) == sorted(map(sorted, launcher_types))

    over = _overrides(cfg, "score_autoscale", shard_rows=4)
    r = _rehearse("autoscale", over)
    s = r["summary"]
    (head,) = r["nodes_before"]  # the job started on a head alone, with no CPU for the pool
    assert r["nodes_seen"][head].get("CPU", 0) == 0
    added = set(r["nodes_seen"]) - {head}
    assert added, "the autoscaler added no worker node"
    for node in added:  # of the configured type
        assert r["nodes_seen"][node]["CPU"] == worker_types["cpu_worker"]["resources"]["CPU"]
        assert "GPU" not in r["nodes_seen"][node]
    assert set(s["nodes"]) <= added and sum(s["nodes"].values()) == s["shards"] == 9
    _assert_exactly_once(store, "score_autoscale", load_config(CONFIG_DIR / "quickstart.yaml", over))
    assert r["alive_after"] == [head], f"idle worker nodes not removed after {r['scale_down_s']} s"
