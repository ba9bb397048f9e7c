"""Shared test fixtures: one local Ray cluster per session, a moto S3 server on loopback."""
from __future__ import annotations

import os
import socket
import tempfile

import logging

import pytest

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


@pytest.fixture(scope="session")
def ray_local():
    """A real 2-CPU local Ray cluster shared by the whole test session."""
    import ray

    from reasonrec.runtime import init_ray
    from reasonrec.config import RayConfig

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
