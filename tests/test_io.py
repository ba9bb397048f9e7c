"""Artifact store: atomic stage writes, manifests, skip logic, the same code path on S3 (moto)."""

import pyarrow as pa
import pytest

from reasonrec.config import StorageConfig
from reasonrec.io import ArtifactStore, file_fingerprint


def _write_stage(store, stage="prepare", h="abc", inputs=None, rows=3):
    with store.stage_writer(stage, h, inputs or {"src": "1"}) as w:
        w.write_table("t.parquet", pa.table({"x": list(range(rows))}))
        w.write_json("summary.json", {"ok": True})


def _roundtrip(store):
    assert store.manifest("prepare") is None
    _write_stage(store)
    m = store.manifest("prepare")
    assert m.rows == {"t": 3} and m.config_hash == "abc" and "pyarrow" in m.versions
    assert store.read_table("prepare", "t.parquet").column("x").to_pylist() == [0, 1, 2]
    assert store.read_json("prepare", "summary.json") == {"ok": True}
    assert store.is_done("prepare", "abc", {"src": "1"})
    assert not store.is_done("prepare", "abc", {"src": "2"})  # input changed
    assert not store.is_done("prepare", "other", {"src": "1"})  # config changed
    # A stage written again with the same config and inputs is a new input to its readers.
    first = store.manifest("prepare").fingerprint
    assert store.manifest("prepare").fingerprint == first  # stable while the stage stands
    _write_stage(store)
    assert store.manifest("prepare").fingerprint != first
    # Overwrite with new content: old files are replaced, not merged.
    _write_stage(store, h="def", rows=5)
    assert store.read_table("prepare", "t.parquet").num_rows == 5
    assert store.manifest("prepare").config_hash == "def"


def test_local_roundtrip(tmp_path):
    _roundtrip(ArtifactStore(str(tmp_path), "run1"))


def test_s3_roundtrip_same_code_path(s3_bucket):
    endpoint, bucket = s3_bucket
    store = ArtifactStore(f"{bucket}/runs", "run1", StorageConfig(s3_endpoint_url=endpoint))
    assert store.url("prepare").startswith("s3://")
    _roundtrip(store)


@pytest.mark.parametrize("remote", [False, True])
def test_interrupted_write_leaves_nothing_visible(tmp_path, request, remote):
    if remote:
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        store = ArtifactStore(f"{bucket}/runs", "r", StorageConfig(s3_endpoint_url=endpoint))
    else:
        store = ArtifactStore(str(tmp_path), "r")
    with pytest.raises(KeyboardInterrupt):
        with store.stage_writer("prepare", "h", {}) as w:
            w.write_table("t.parquet", pa.table({"x": [1]}))
            raise KeyboardInterrupt  # killed mid-stage
    assert store.manifest("prepare") is None
    assert not store.fs.exists(store.path("prepare"))
    assert store.fs.find(store.path("_tmp")) == []  # temporary prefix cleaned up
    with pytest.raises(FileNotFoundError, match="ray_jobs.prepare"):
        store.read_table("prepare", "t.parquet")


def test_interrupted_overwrite_keeps_old_stage_hidden_or_intact(tmp_path):
    store = ArtifactStore(str(tmp_path), "r")
    _write_stage(store, rows=2)
    with pytest.raises(RuntimeError):
        with store.stage_writer("prepare", "new", {}) as w:
            w.write_table("t.parquet", pa.table({"x": [9]}))
            raise RuntimeError("boom")
    # The failed re-run never committed: the previous complete output is still what readers see.
    assert store.manifest("prepare").config_hash == "abc"
    assert store.read_table("prepare", "t.parquet").num_rows == 2


def test_file_fingerprint_changes_with_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    a = file_fingerprint(str(f))
    f.write_text("one more")
    assert file_fingerprint(str(f)) != a
    with pytest.raises(FileNotFoundError):
        file_fingerprint(str(tmp_path / "missing"))


@pytest.mark.parametrize("remote", [False, True])
def test_write_dataset_empty_and_full(ray_local, tmp_path, request, remote):
    """A Ray Dataset written as a stage table: rows counted from the files; an empty dataset
    (e.g. no quarantined rows) still leaves a readable zero-row table, on disk and on S3."""
    from ray_jobs.common import write_dataset

    if remote:
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        store = ArtifactStore(f"{bucket}/runs", "r", StorageConfig(s3_endpoint_url=endpoint))
    else:
        store = ArtifactStore(str(tmp_path), "r")
    schema = pa.schema([("x", pa.int64())])
    full = ray_local.data.from_arrow(pa.table({"x": list(range(7))}))
    empty = full.filter(lambda row: row["x"] < 0)
    with store.stage_writer("prepare", "h", {}) as w:
        assert write_dataset(full, w, store, "full", schema) == 7
        assert write_dataset(empty, w, store, "empty", schema) == 0
    assert store.manifest("prepare").rows == {"full": 7, "empty": 0}
    assert sorted(store.read_table("prepare", "full").column("x").to_pylist()) == list(range(7))
    got = store.read_table("prepare", "empty")
    assert got.num_rows == 0 and got.schema.field("x").type == pa.int64()
