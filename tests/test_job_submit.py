"""A real ``ray job submit``: a separate Ray head on 127.0.0.1 (its own temp dir and free ports),
the prepare stage submitted to it with the project as the job's working dir, exactly as on a
cluster (DESIGN: every stage runs as ``ray job submit --working-dir . -- python -m ray_jobs.<stage>``).

The head runs in its own process group and is stopped by that group (plus any process naming its
temp dir or the job's output dir): never ``ray stop``, which stops every Ray on the machine,
including the session's ``ray_local`` cluster and other people's. cluster/local_job_submit.sh
does the same by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
EXCLUDES = [".venv", "runs", ".git", "bench/results", "__pycache__", "*.egg-info", ".pytest_cache", "out"]
# Every port the head binds, free ones: Ray's fixed defaults (dashboard agent 52365, client
# server 10001, ...) are taken whenever another Ray runs on the machine, and a dashboard agent
# that cannot bind its port leaves the job API with "No available agent" for good.
PORT_FLAGS = [
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--node-manager-port",
    "--object-manager-port",
]
TINY = [
    "data.sources.0.synthetic.n_users=60",
    "data.sources.0.synthetic.n_items=30",
    "data.direct_negatives=5",
    "ray.shuffle_partitions=2",
]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env() -> dict:
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    # `python` in the job's entrypoint resolves on the head's PATH: make it this venv's.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    # On a loaded 2-core machine the dashboard agent can take longer than the raylet's default
    # wait for its port file (~15 s), and the raylet then aborts the head's start-up.
    env["RAY_agent_register_timeout_ms"] = "120000"
    # Token auth with a token of this head's own, in the environment of the head, its workers and
    # every client below (whatever HOME/.ray/auth_token and this process's RAY_AUTH_MODE are:
    # Ray turns token auth on for a head when that file exists, but a CLI with RAY_AUTH_MODE
    # unset sends no token).
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    return env


def _stop_head(pgid: int, markers: list[str]) -> list[int]:
    """Stop this head only: every process in its process group, and any process whose command
    line names one of ``markers`` (its temp dir, the job's output dir). Returns survivors' pids."""
    assert pgid != os.getpgrp()
    me = os.getpid()
    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid == me:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if os.getpgid(p.pid) == pgid or any(m in cmd for m in markers):
                procs.append(p)
        except (psutil.Error, ProcessLookupError):
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in alive]


@contextlib.contextmanager
def local_head(markers: list[str], attempts: int = 2):
    """A Ray head on 127.0.0.1 with its own temp dir and free ports; yields the job API address,
    the environment for its clients and the head's temp dir.
    A start that fails (on a loaded machine the raylet can abort while the dashboard agent is
    still importing) is cleaned up and tried once more on fresh ports."""
    env = _env()
    for attempt in range(attempts):
        temp_dir = tempfile.mkdtemp(prefix="rrj", dir="/tmp")  # short: Ray socket paths < 108 bytes
        ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
        dash_port = ports["--dashboard-port"]
        head = subprocess.Popen(
            [
                RAY,
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1",
                "--include-dashboard=true",
                *(f"{flag}={port}" for flag, port in ports.items()),
                "--num-cpus=2",
                f"--temp-dir={temp_dir}",
                "--disable-usage-stats",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )  # its own process group: see _stop_head
        try:
            try:
                start_log, _ = head.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                start_log = "ray start timed out"
            if head.returncode == 0:
                yield f"http://127.0.0.1:{dash_port}", env, temp_dir
                return
            if attempt == attempts - 1:
                raise AssertionError(f"ray start failed {attempts} times; last:\n{start_log[-4000:]}")
        finally:
            survivors = _stop_head(head.pid, [temp_dir, *markers])
            shutil.rmtree(temp_dir, ignore_errors=True)
            assert not survivors, f"processes of the test head survived: {survivors}"


def test_ray_job_submit_prepare():
    """Submitted with a relative ``output_root``: the job's driver runs in the job's working
    directory (the project, unpacked on the head) and its Ray Data tasks elsewhere; the run lands
    in the working directory, where the manifest says it is."""
    run = f"jobrun-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    with local_head([run]) as (address, env, temp_dir):
        t_head = time.monotonic() - t0
        runtime_env = {"excludes": EXCLUDES, "env_vars": {"HF_HUB_OFFLINE": "1"}}
        # `ray start` returns before the head's dashboard agent has registered; until it has, the
        # job API answers "No available agent" after waiting (10 s) for it server-side. Only that
        # answer is retried: it comes before any job is created.
        for attempt in range(12):  # noqa: B007 (named in the failure message)
            sid = f"jobtest-{uuid.uuid4().hex[:8]}"
            submit = subprocess.run(
                [
                    RAY,
                    "job",
                    "submit",
                    "--address",
                    address,
                    "--submission-id",
                    sid,
                    "--working-dir",
                    ".",
                    "--runtime-env-json",
                    json.dumps(runtime_env),
                    "--",
                    "python",
                    "-m",
                    "ray_jobs.prepare",
                    "--config",
                    "configs/quickstart.yaml",
                    "output_root=runs",
                    f"run_name={run}",
                    *TINY,
                ],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=420,
            )
            log = submit.stdout + submit.stderr
            if submit.returncode == 0 or "No available agent to submit job" not in log:
                break
        assert submit.returncode == 0, f"ray job submit failed (attempt {attempt + 1}):\n{log[-8000:]}"
        assert f"Job '{sid}' succeeded" in log
        assert "prepare summary" in log  # the driver's output streamed back

        # The entrypoint attached to THIS head (RAY_ADDRESS set by the job supervisor) instead of
        # starting its own local Ray: its driver is registered under the submission. (Asked in a
        # subprocess: the client needs the head's token from the environment.)
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from ray.job_submission import JobSubmissionClient; "
                "i = JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2]); "
                "print(i.model_dump_json() if hasattr(i, 'model_dump_json') else i.json())",
                address,
                sid,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert probe.returncode == 0, probe.stderr[-3000:]
        info = json.loads(probe.stdout.strip().splitlines()[-1])
        assert info["status"] == "SUCCEEDED", info
        assert info["driver_info"] is not None, info
        assert info["entrypoint"].startswith("python -m ray_jobs.prepare")

        # The job's working directory: the uploaded project, unpacked under the head's temp dir.
        (stage,) = {p.parent.resolve() for p in Path(temp_dir).rglob(f"runs/{run}/prepare/_manifest.json")}
        workdir = stage.parents[2]
        assert (workdir / "ray_jobs" / "prepare.py").is_file() and "working_dir_files" in workdir.parts
        manifest = json.loads((stage / "_manifest.json").read_text())
        summary = json.loads((stage / "summary.json").read_text())
        assert summary["n_users"] == 60 and manifest["rows"]["users"] == 60
        assert manifest["stage"] == "prepare" and manifest["metrics"]["n_users"] == 60
        assert manifest["paths"]["output_root"] == str(workdir / "runs")
        assert {"items", "interactions", "users", "loo", "quarantine"} <= set(manifest["rows"])
        print(f"head start {t_head:.1f}s, head + job {time.monotonic() - t0:.1f}s, submit attempts {attempt + 1}")
