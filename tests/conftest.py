"""Shared test fixtures: one local Ray cluster per session, a moto S3 server on loopback."""

from __future__ import annotations

import logging
import os
import socket
import tempfile

import pytest

from reasonrec.config import ServeConfig
from reasonrec.runtime import serve_env

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto server request logs

# Keep every Ray port on loopback, no usage stats, no hub downloads, and Ray's state in a temp dir.
_RAY_HOME = tempfile.mkdtemp(prefix="reasonrec-test-home-")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("RAY_TMPDIR", os.path.join(_RAY_HOME, "ray"))
os.environ["HOME"] = _RAY_HOME
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
# Test-only credentials for the moto server, set before Ray starts so its workers inherit them.
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("RAY_ADDRESS", None)
# The session's Ray serves the app as `python -m ray_jobs.serve` starts it (serve.direct_ingress:
# Ray Serve's throughput-optimized mode, ingress replicas answering HTTP on their own ports too).
for _key, _value in serve_env(ServeConfig.direct_port).items():
    os.environ.setdefault(_key, _value)
# Ray Train's controller polls its workers every 2 s by default, so each tiny fit waits up to that
# long to see its workers finish; the tests run a dozen fits.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(scope="session")
def ray_local():
    """A real 2-CPU local Ray cluster shared by the whole test session."""
    import ray

    from reasonrec.config import RayConfig
    from reasonrec.runtime import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto server) on 127.0.0.1; yields the endpoint URL. Test credentials only."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the moto server; yields (endpoint_url, 's3://bucket')."""
    import uuid

    import s3fs

    name = f"test-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir(name)
    yield s3_endpoint, f"s3://{name}"


# A whole tiny run (every pipeline stage), built once per session and shared by the scoring and
# serving tests. Small enough for 2 CPUs; the numbers it produces mean nothing.
TINY_RUN = [
    "data.sources.0.synthetic.n_users=120",
    "data.sources.0.synthetic.n_items=40",
    "ray.shuffle_partitions=2",
    "data.direct_negatives=10",
    "tools.enabled=[popularity,sasrec,bpr_mf,xgb_ctr]",
    "tools.params.sasrec.max_epochs=3",
    "tools.params.bpr_mf.max_epochs=5",
    "tools.params.xgb_ctr.num_boost_round=20",
    "vlm.max_length=256",
    "vlm.max_history_items=4",
    "vlm.max_history_photos=1",
    "vlm.num_beams=4",
    "vlm.max_thought_tokens=12",
    "vlm.max_explanation_tokens=8",
    "instructions.max_examples_per_task=24",
    "instructions.prompt_candidates=5",
    "finetune.max_steps=6",
    "finetune.checkpoint_every=3",
    "finetune.per_device_batch_size=2",
    "planner.max_fit_queries=200",
    "planner.confidence_rounds=20",
    "planner.bypass_buckets=[low,medium,high]",
    "planner.bypass_confidence=0.4",
    "planner.vlm_aware=false",
    "score.count_flops=false",  # tests that want them switch them on
    "score.max_queries_per_task=12",
    "score.shard_rows=16",
    "score.vlm_batch_size=4",
]


@pytest.fixture(scope="session")
def tiny_run(ray_local, tmp_path_factory):
    """(cfg, store) of a finished tiny run: prepare -> train_tools -> build_instructions ->
    finetune -> score -> evaluate.

    Built as a user runs the main command: from the working directory the run lives in, with the
    default relative ``output_root: runs``. Ray Train workers, Ray Data tasks and actors work in
    other directories, so every stage here checks that the config's paths were resolved on the
    driver (tests/test_paths.py checks where the files went)."""
    import contextlib

    from ray_jobs import pipeline
    from reasonrec.config import CONFIG_DIR, load_config
    from reasonrec.io import open_store

    workdir = tmp_path_factory.mktemp("tiny-run")
    with contextlib.chdir(workdir):
        cfg = load_config(CONFIG_DIR / "quickstart.yaml", TINY_RUN + ["output_root=runs"])
        for _, stage in pipeline.STAGES:
            stage.run(cfg)
    return cfg, open_store(cfg)


# Tests that need a Ray cluster (the session's, or one of their own) are marked ``ray``;
# `make test-fast` runs the others alone (`pytest -m "not ray"`).
_RAY_FIXTURES = {"ray_local", "tiny_run"}
_RAY_MODULES = {"test_job_submit"}  # starts its own head with `ray start`


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: needs a Ray cluster (the session's or its own); slow")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _RAY_FIXTURES & set(item.fixturenames) or item.module.__name__ in _RAY_MODULES:
            item.add_marker(pytest.mark.ray)


def scrape_ours(port: int) -> dict[tuple, float]:
    """Ray's metrics export endpoint on 127.0.0.1, parsed with prometheus_client's text parser:
    {(sample name, sorted labels without Ray's own): value} for our ``ray_reasonrec_*`` series."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    ours: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_reasonrec_"):
                labels = tuple(
                    sorted(
                        (k, v)
                        for k, v in sample.labels.items()
                        if k not in ("Component", "NodeAddress", "SessionName", "Version", "WorkerId")
                        and not k.startswith("otel_")
                    )
                )
                ours[sample.name, labels] = ours.get((sample.name, labels), 0.0) + sample.value
    return ours


def metric_total(scraped: dict, name: str, **labels) -> float:
    """Sum of the ``name`` samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in scraped.items() if n == name and want <= set(ls))


def score_until_commit(cfg, monkeypatch) -> None:
    """Run the score job until every shard is written, then stop it before it commits (as a job
    killed at that point): ``summarize`` raises, the staged shards stay for the test to read."""
    from ray_jobs import score

    class Interrupted(Exception):
        pass

    def interrupted(*a, **kw):
        raise Interrupted

    monkeypatch.setattr(score, "summarize", interrupted)
    with pytest.raises(Interrupted):
        score.run(cfg)
    monkeypatch.undo()
