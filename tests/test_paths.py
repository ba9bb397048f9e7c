"""Paths in the config are made absolute once, on the driver (``reasonrec.config.resolve_paths``):
Ray Train workers, Ray Data tasks and actors and Serve replicas run in other working directories,
where a relative path names another folder. The session's ``tiny_run`` is built from a temporary
working directory with the default relative ``output_root: runs``; the Serve tests serve a run
named by a relative root too (tests/test_serve.py)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from reasonrec.config import CONFIG_DIR, config_paths, load_config, parse_cli, resolve_paths
from reasonrec.io import ArtifactStore

STAGES = ("prepare", "train_tools", "instructions", "finetune", "planner", "score", "report")


def test_every_local_path_is_made_absolute_against_the_working_directory(tmp_path):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    with contextlib.chdir(tmp_path):
        cfg = load_config(
            CONFIG_DIR / "beauty.yaml",
            [
                "output_root=runs",
                "score.queries_path=q/queries.parquet",
                "vlm.cache_dir=~/cache",
                "data.sources.0.images_dir=img",
                "vlm.model=models/mine",
            ],
        )
    assert cfg.output_root == str(tmp_path / "runs")
    assert cfg.score.queries_path == str(tmp_path / "q" / "queries.parquet")
    assert cfg.vlm.cache_dir == os.path.expanduser("~/cache")
    assert cfg.vlm.model == str(tmp_path / "models" / "mine")
    # configs/data/beauty.yaml's "data/amazon_beauty" is relative to where the job runs.
    assert cfg.data.sources[0].path == str(tmp_path / "data" / "amazon_beauty")
    assert cfg.data.sources[0].images_dir == str(tmp_path / "img")
    assert config_paths(cfg) == {
        "output_root": cfg.output_root,
        "score.queries_path": cfg.score.queries_path,
        "vlm.cache_dir": cfg.vlm.cache_dir,
        "vlm.model": cfg.vlm.model,
        "data.sources.0.path": cfg.data.sources[0].path,
        "data.sources.0.images_dir": cfg.data.sources[0].images_dir,
    }


def test_urls_model_names_and_absolute_paths_are_left_alone(tmp_path):
    with contextlib.chdir(tmp_path):
        cfg = load_config(
            CONFIG_DIR / "beauty.yaml",
            [
                "output_root=s3://bucket/runs",
                "data.sources.0.path=s3://bucket/beauty",
                "vlm.model=org/some-vlm",
                "score.queries_path=/abs/q.parquet",
            ],
        )
        assert (cfg.output_root, cfg.data.sources[0].path) == ("s3://bucket/runs", "s3://bucket/beauty")
        assert cfg.vlm.model == "org/some-vlm"  # a hub id: no such folder here
        assert cfg.score.queries_path == "/abs/q.parquet"
        assert load_config(CONFIG_DIR / "quickstart.yaml").vlm.model == "tiny"
        before = json.dumps(config_paths(cfg), sort_keys=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert json.dumps(config_paths(resolve_paths(cfg, str(elsewhere))), sort_keys=True) == before  # idempotent


def test_print_config_shows_the_resolved_paths(tmp_path, capsys):
    with contextlib.chdir(tmp_path), pytest.raises(SystemExit) as done:
        parse_cli("x", ["--print-config", "output_root=out/runs"])
    assert done.value.code == 0
    assert f"output_root: {tmp_path / 'out' / 'runs'}" in capsys.readouterr().out


def test_a_store_refuses_a_relative_root():
    with pytest.raises(ValueError, match="output_root must be absolute"):
        ArtifactStore("runs", "r")


def test_every_stage_of_a_run_with_a_relative_root_reads_and_writes_one_run_folder(tiny_run, ray_local):
    """The tiny run was started from a temporary working directory with ``output_root=runs``;
    train_tools and finetune train on Ray Train workers (whose working directory is the Ray
    session's ``artifacts/<run>``), prepare, build_instructions and score run Ray Data tasks and
    actor pools. Each stage found the previous one's output (else the run would have failed), and
    every output and Ray Train checkpoint is in the one run folder."""
    cfg, store = tiny_run
    root = Path(cfg.output_root)
    assert root.is_absolute() and root.name == "runs" and root.parent.name.startswith("tiny-run")
    assert store.root == str(root / cfg.run_name)
    for stage in STAGES:
        manifest = json.loads((root / cfg.run_name / stage / "_manifest.json").read_text())
        assert manifest["paths"]["output_root"] == str(root), stage
    assert sorted(p.name.split("-")[0] for p in (root / cfg.run_name / "_ray_train").iterdir()) == [
        "finetune",
        "train_tools",
    ]
    # Nothing went to a "runs" folder relative to a worker's working directory.
    session_dir = Path(ray_local._private.worker._global_node.get_session_dir_path())
    assert not [p for p in session_dir.rglob(cfg.run_name) if p.parent.name == "runs"]
