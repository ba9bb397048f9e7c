"""Artifact store: one root per run on local disk or ``s3://``, one code path for both.

Layout: ``{output_root}/{run_name}/{stage}/...`` plus ``{stage}/_manifest.json``.

Atomicity: a stage writes into ``{run}/_tmp/{stage}-{uuid}/`` and :meth:`StageWriter.commit`
moves that prefix to ``{run}/{stage}/`` and writes the manifest *last*. A stage is visible only
when its manifest exists, so an interrupted write (before or during the move) never exposes
partial output: readers and the skip logic look for the manifest first. On local disk the move is
a single rename; on S3 it is a server-side copy, still hidden behind the missing manifest.
"""

from __future__ import annotations

import hashlib
import json
import platform
import posixpath
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from reasonrec.config import StorageConfig

if TYPE_CHECKING:
    from reasonrec.config import RunConfig

MANIFEST = "_manifest.json"
TMP_DIR = "_tmp"
# The ``ray_jobs`` module that writes a stage, where it is not named after the stage.
STAGE_JOBS = {"instructions": "build_instructions", "planner": "fit_planner"}


class MissingStage(FileNotFoundError):
    """A stage this one reads has no committed output; the message names the job to run."""


def filesystem(url: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and bare path for a local path or ``s3://`` URL."""
    storage = storage or StorageConfig()
    opts: dict[str, Any] = {}
    if url.startswith("s3://"):
        opts["anon"] = storage.s3_anon
        if storage.s3_endpoint_url:
            opts["client_kwargs"] = {"endpoint_url": storage.s3_endpoint_url}
        # Listings must reflect our own writes immediately (commit, then skip checks).
        opts["use_listings_cache"] = False
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs, path


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """The same filesystem as a pyarrow FileSystem (for Parquet and Ray Data I/O)."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("reasonrec", "ray", "pyarrow", "torch", "transformers", "peft", "torchrec", "xgboost-cpu", "xgboost"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


@dataclass
class Manifest:
    stage: str
    config_hash: str
    inputs: dict[str, str] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=versions)
    paths: dict[str, str] = field(default_factory=dict)  # the config's (absolute) locations
    created_at: float = field(default_factory=time.time)
    duration_s: float = 0.0

    @property
    def fingerprint(self) -> str:
        """What a downstream stage records as this input's fingerprint. It names one write of the
        stage (the commit time included): re-running a stage with the same config and inputs, e.g.
        with ``--force`` after a code change, makes every stage that read it run again (config and
        inputs alone said "unchanged", so downstream outputs of the old write were kept)."""
        blob = json.dumps([self.stage, self.config_hash, self.inputs, self.rows, self.created_at], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def matches(self, config_hash: str, inputs: dict[str, str]) -> bool:
        return self.config_hash == config_hash and self.inputs == inputs


class ArtifactStore:
    """Paths, Parquet I/O and manifests under one run root (local or s3://)."""

    def __init__(
        self, output_root: str, run_name: str, storage: StorageConfig | None = None, paths: dict[str, str] | None = None
    ):
        if "://" not in output_root and not posixpath.isabs(output_root):
            # A relative root means another folder in each Ray worker's working directory; the
            # config's paths are made absolute once, on the driver (reasonrec.config.resolve_paths).
            raise ValueError(
                f"output_root must be absolute or an s3:// URL, got {output_root!r} "
                f"(load the config with reasonrec.config.load_config, which resolves it)"
            )
        self.storage = storage or StorageConfig()
        self.fs, root = filesystem(output_root, self.storage)
        self.scheme = "s3://" if output_root.startswith("s3://") else ""
        self.root = posixpath.join(root, run_name)
        self.arrow_fs = arrow_filesystem(self.fs)
        self.paths = dict(paths or {})  # the config's locations, recorded in every manifest

    # ------------------------------------------------------------------------------ paths
    def path(self, *parts: str) -> str:
        """Bare path (no scheme) under the run root, for fs / pyarrow calls."""
        return posixpath.join(self.root, *parts)

    def url(self, *parts: str) -> str:
        """Full URL (with s3:// when remote) under the run root, for display and Ray Data."""
        return self.scheme + self.path(*parts)

    # -------------------------------------------------------------------------- manifests
    def manifest(self, stage: str) -> Manifest | None:
        p = self.path(stage, MANIFEST)
        if not self.fs.exists(p):
            return None
        with self.fs.open(p, "r") as f:
            return Manifest(**json.load(f))

    def is_done(self, stage: str, config_hash: str, inputs: dict[str, str]) -> bool:
        m = self.manifest(stage)
        return m is not None and m.matches(config_hash, inputs)

    def require(self, stage: str) -> Manifest:
        m = self.manifest(stage)
        if m is None:
            raise MissingStage(
                f"stage '{stage}' has no committed output under {self.url()}; "
                f"run `python -m ray_jobs.{STAGE_JOBS.get(stage, stage)}` first"
            )
        return m

    # ------------------------------------------------------------------------------ writes
    @contextmanager
    def stage_writer(self, stage: str, config_hash: str, inputs: dict[str, str]) -> Iterator[StageWriter]:
        """Write a stage atomically: ``with store.stage_writer(...) as w: ...; w.commit()`` happens
        on clean exit; on an exception the temporary prefix is removed and nothing is visible."""
        writer = StageWriter(self, stage, config_hash, inputs)
        try:
            yield writer
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    # ------------------------------------------------------------------------------- reads
    def read_table(self, stage: str, name: str, columns: list[str] | None = None) -> pa.Table:
        """Read one committed table (a Parquet file or a folder of Parquet files)."""
        self.require(stage)
        return pq.read_table(self.path(stage, name), filesystem=self.arrow_fs, columns=columns)

    def read_json(self, stage: str, name: str) -> Any:
        with self.fs.open(self.path(stage, name), "r") as f:
            return json.load(f)


def open_store(cfg: RunConfig) -> ArtifactStore:
    """The artifact store of ``cfg``'s run (``{output_root}/{run_name}``), its manifests recording
    the config's resolved file and folder locations."""
    from reasonrec.config import config_paths

    return ArtifactStore(cfg.output_root, cfg.run_name, cfg.storage, paths=config_paths(cfg))


class StageWriter:
    """Collects a stage's outputs under a temporary prefix; see :class:`ArtifactStore`."""

    def __init__(self, store: ArtifactStore, stage: str, config_hash: str, inputs: dict[str, str]):
        self.store = store
        self.stage = stage
        self.tmp = store.path(TMP_DIR, f"{stage}-{uuid.uuid4().hex[:12]}")
        self.manifest = Manifest(stage=stage, config_hash=config_hash, inputs=dict(inputs), paths=dict(store.paths))
        self._t0 = time.time()
        store.fs.makedirs(self.tmp, exist_ok=True)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.tmp, *parts)

    def url(self, *parts: str) -> str:
        return self.store.scheme + self.path(*parts)

    def _open(self, name: str, mode: str):
        self.store.fs.makedirs(posixpath.dirname(self.path(name)), exist_ok=True)
        return self.store.fs.open(self.path(name), mode)

    def write_table(self, name: str, table: pa.Table) -> None:
        with self._open(name, "wb") as f:
            pq.write_table(table, f)
        self.manifest.rows[name.split("/")[0].removesuffix(".parquet")] = table.num_rows

    def write_json(self, name: str, obj: Any) -> None:
        with self._open(name, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)

    def write_bytes(self, name: str, data: bytes) -> None:
        with self._open(name, "wb") as f:
            f.write(data)

    def commit(self) -> Manifest:
        fs, final = self.store.fs, self.store.path(self.stage)
        # The old manifest goes first, so a crash mid-commit leaves the stage invisible, not stale.
        if fs.exists(posixpath.join(final, MANIFEST)):
            fs.rm(posixpath.join(final, MANIFEST))
        if fs.exists(final):
            fs.rm(final, recursive=True)
        _move_tree(fs, self.tmp, final)
        self.manifest.duration_s = round(time.time() - self._t0, 3)
        with fs.open(posixpath.join(final, MANIFEST), "w") as f:
            json.dump(self.manifest.__dict__, f, indent=2, sort_keys=True)
        return self.manifest

    def abort(self) -> None:
        try:
            if self.store.fs.exists(self.tmp):
                self.store.fs.rm(self.tmp, recursive=True)
        except Exception:  # cleanup must not hide the original error
            pass


def _move_tree(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move a folder: one rename on local disk; per-object server-side copies on object stores
    (which have no folders to rename)."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        fs.mv(src, dst, recursive=True)
        return
    for f in fs.find(src):
        fs.copy(f, posixpath.join(dst, posixpath.relpath(f, src)))
    fs.rm(src, recursive=True)


def file_fingerprint(url: str, storage: StorageConfig | None = None) -> str:
    """Fingerprint of a source file or folder: names, sizes and modification stamps (ETags on S3)."""
    fs, path = filesystem(url, storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"input not found: {url}")
    entries = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    parts = []
    for name in sorted(entries):
        info = entries[name]
        stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
        parts.append(f"{name}:{info.get('size')}:{stamp}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
