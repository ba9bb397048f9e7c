"""train_tools and evaluate end to end on a real local Ray (Ray Train, Ray Data actor pools)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.compute as pc
import pytest

from ray_jobs import evaluate, prepare, train_tools
from reasonrec.config import CONFIG_DIR, load_config
from reasonrec.io import open_store
from reasonrec.planner import load_toolbox
from reasonrec.tools.persist import load_tool

TINY = [
    "data.sources.0.synthetic.n_users=300",
    "data.sources.0.synthetic.n_items=80",
    "ray.shuffle_partitions=2",
    "data.direct_negatives=20",
    "tools.enabled=[popularity,sasrec,bpr_mf,dlrm,xgb_ctr]",
    "tools.params.sasrec.max_epochs=6",
    "tools.params.bpr_mf.max_epochs=10",
    "tools.params.dlrm.max_epochs=2",
    "tools.params.xgb_ctr.num_boost_round=30",
]


def _cfg(root, *extra):
    return load_config(CONFIG_DIR / "quickstart.yaml", TINY + [f"output_root={root}", *extra])


@pytest.fixture(scope="module")
def pipeline(ray_local, tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("runs"), "tools.holdout_items=1")
    prepare.run(cfg)
    summary = train_tools.run(cfg)
    report = evaluate.run(cfg)
    return cfg, summary, report, open_store(cfg)


def _metrics(store):
    with store.fs.open(store.path("report", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_every_tool_is_saved_and_reloads_with_identical_outputs(pipeline):
    cfg, summary, _, store = pipeline
    assert summary["tools"] == ["popularity", "sasrec", "bpr_mf", "dlrm", "xgb_ctr", "ensemble"]
    preds = store.read_table("train_tools", "predictions")
    loo = store.read_table("prepare", "loo").to_pylist()
    row = next(r for r in loo if r["valid_item"] is not None and len(r["train_items"]) >= 2)
    for name in ("sasrec", "bpr_mf", "ensemble"):
        tool = load_tool(store.url("train_tools", "tools", name))
        items, _ = tool.recommend(np.array([row["user_id"]]), [np.asarray(row["train_items"])], k=5, exclude_seen=False)
        mine = preds.filter(
            pc.and_(
                pc.equal(preds.column("tool"), name),
                pc.and_(pc.equal(preds.column("user_id"), row["user_id"]), pc.equal(preds.column("split"), "valid")),
            )
        )
        assert mine.column("items").to_pylist()[0][:5] == items[0].tolist()
    ctr = store.read_table("train_tools", "ctr_predictions")
    assert set(ctr.column("tool").to_pylist()) >= {"dlrm", "xgb_ctr", "ensemble"}
    assert set(ctr.column("split").to_pylist()) == {"valid", "test"}
    # A CTR row sees its split's history, as the router's query does: a test row also the valid item.
    sasrec = load_tool(store.url("train_tools", "tools", "sasrec"))
    by_user = {r["user_id"]: r for r in loo}
    for split in ("valid", "test"):
        rows = ctr.filter(pc.and_(pc.equal(ctr.column("tool"), "sasrec"), pc.equal(ctr.column("split"), split)))
        r = next(x for x in rows.to_pylist() if by_user[x["user_id"]]["valid_item"] is not None)
        u = by_user[r["user_id"]]
        hist = np.asarray(u["train_items"] + ([u["valid_item"]] if split == "test" else []))
        want = sasrec.predict_ctr(np.array([r["user_id"]]), np.array([r["item_id"]]), [hist])[0]
        assert abs(r["prob"] - want) < 1e-5


def test_holdout_copies_train_without_each_users_last_item(pipeline):
    cfg, summary, _, store = pipeline
    # Ranking tools only (dlrm and xgb_ctr are CTR tools), saved apart from the main ones.
    assert summary["holdout_tools"] == ["popularity", "sasrec", "bpr_mf"] and summary["holdout_items"] == 1
    assert load_toolbox(store, holdout=True).names("sequential") == ["bpr_mf", "popularity", "sasrec"]
    n_items = store.read_table("prepare", "items", columns=["item_id"]).num_rows
    counts = np.zeros(n_items)
    for seq in store.read_table("prepare", "loo").column("train_items").to_pylist():
        np.add.at(counts, seq[:-1], 1.0)
    held = load_tool(store.url("train_tools", "tools", "holdout", "popularity"))
    assert np.allclose(held.counts, counts)
    assert not np.allclose(load_tool(store.url("train_tools", "tools", "popularity")).counts, counts)
    # The predictions and the toolbox the planner loads are the main tools only.
    assert set(store.read_table("train_tools", "predictions").column("tool").to_pylist()) == {
        "popularity",
        "sasrec",
        "bpr_mf",
        "ensemble",
    }
    assert sorted(load_toolbox(store).tools) == sorted(summary["tools"])


def test_prediction_ranks_agree_with_top_k(pipeline):
    _, _, _, store = pipeline
    preds = store.read_table("train_tools", "predictions").to_pylist()
    assert {p["split"] for p in preds} == {"train", "valid", "test"}
    for p in preds[:2000]:
        in_top = p["target"] in p["items"]
        if p["rank"] < len(p["items"]):
            assert in_top, p
        elif in_top:
            # Ranks count ties pessimistically; top-K breaks them arbitrarily (the ensemble's
            # averaged ranks tie often). The target may then sit in the top-K only on a tie with
            # the K-th score.
            assert p["scores"][p["items"].index(p["target"])] == p["scores"][-1], p
        assert 0 <= p["rank_excl"] <= p["rank"]  # masking the history only removes competitors
        if p["n_candidates"]:
            assert 0 <= p["cand_rank"] < p["n_candidates"]


def test_sasrec_learns_the_sequential_structure(pipeline):
    _, _, _, store = pipeline
    m = {(r["model"], r["task"], r["metric"], r["k"], r["group"]): r["value"] for r in _metrics(store)}
    assert m[("sasrec", "sequential", "hr", 10, "all")] > m[("popularity", "sequential", "hr", 10, "all")] + 0.05


def test_metrics_jsonl_has_protocols_and_segments(pipeline):
    _, _, report, store = pipeline
    recs = _metrics(store)
    assert {r["task"] for r in recs} == {"sequential", "direct", "ctr"}
    assert all(set(r) == {"task", "model", "protocol", "metric", "k", "group", "value", "n"} for r in recs)
    groups = {r["group"] for r in recs}
    assert {"all", "eh:high", "cs:coldest", "cs:medium", "cs:normal", "cs:1", "cs:10"} <= groups
    direct = [r for r in recs if r["task"] == "direct"]
    assert direct and all("1 positive + 20 sampled negatives" in r["protocol"] for r in direct)
    auc = [r for r in recs if r["metric"] == "auc" and r["group"] == "all" and r["model"] == "xgb_ctr"]
    assert len(auc) == 1 and 0.5 < auc[0]["value"] <= 1.0
    assert "### sequential (full-catalog ranking" in report["tables"]
    assert "### sequential (full-catalog ranking with history items masked (RecBole" in report["tables"]
    masked = [
        r
        for r in recs
        if r["task"] == "sequential"
        and "masked" in r["protocol"]
        and r["group"] == "all"
        and r["metric"] == "hr"
        and r["k"] == 10
    ]
    kept = {
        r["model"]: r["value"]
        for r in recs
        if r["task"] == "sequential"
        and "masked" not in r["protocol"]
        and r["group"] == "all"
        and r["metric"] == "hr"
        and r["k"] == 10
    }
    assert masked and all(r["value"] >= kept[r["model"]] for r in masked)


def test_rerun_skips_both_stages(pipeline):
    cfg, _, _, _ = pipeline
    assert train_tools.run(cfg)["skipped"] is True
    assert evaluate.run(cfg)["skipped"] is True


def test_killed_training_resumes_from_its_checkpoint(ray_local, tmp_path):
    """Kill the driver mid-training (SASRec, after an epoch's checkpoint), start again: finished
    tools and epochs are not redone."""
    overrides = [
        "tools.enabled=[popularity,sasrec]",
        "tools.ensemble=false",
        "tools.params.sasrec.max_epochs=8",
        "tools.params.sasrec.patience=8",
        "tools.checkpoint_every_s=0",
        "run_name=killed",
    ]
    cfg = _cfg(tmp_path, *overrides)
    prepare.run(cfg)
    store = open_store(cfg)
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    args = [
        sys.executable,
        "-m",
        "ray_jobs.train_tools",
        "--config",
        str(CONFIG_DIR / "quickstart.yaml"),
        *TINY,
        f"output_root={tmp_path}",
        *overrides,
    ]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    progress = None
    try:
        while time.time() < deadline and proc.poll() is None:
            # Wait until Ray Train has *registered* a mid-SASRec checkpoint (its snapshot names it),
            # not merely written the files: only registered checkpoints are restored.
            for snap in store.fs.glob(store.path("_ray_train", "*", "checkpoint_manager_snapshot.json")):
                try:
                    with store.fs.open(snap) as f:
                        metrics = (json.load(f).get("latest_checkpoint_result") or {}).get("metrics", {})
                except ValueError:  # caught mid-write
                    continue
                if metrics.get("tool") == "sasrec" and metrics.get("epoch", -1) >= 1:
                    progress = metrics
            if progress:
                break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert progress is not None, "no mid-training checkpoint appeared"
    assert store.manifest("train_tools") is None  # the killed run committed nothing
    summary = train_tools.run(cfg)
    resumed = summary["resumes"]
    assert resumed and resumed[0]["done"] == ["popularity"]
    assert resumed[0]["current"] == "sasrec" and resumed[0]["next_epoch"] >= 2
    assert store.manifest("train_tools") is not None
    assert load_tool(store.url("train_tools", "tools", "sasrec")).n_items == 80


def test_torchrec_dlrm_trains_with_two_ray_train_workers(ray_local, tmp_path):
    cfg = _cfg(
        tmp_path,
        "tools.enabled=[dlrm]",
        "tools.ensemble=false",
        "tools.num_workers=2",
        "tools.params.dlrm.max_epochs=2",
        "run_name=dmp",
    )
    prepare.run(cfg)
    summary = train_tools.run(cfg)
    assert summary["num_workers"] == 2
    m = summary["validation"]["dlrm"]
    assert 0.5 < m["auc"] <= 1.0
    store = open_store(cfg)
    tool = load_tool(store.url("train_tools", "tools", "dlrm"))
    assert tool.train_info["world"] == 2  # trained under DistributedModelParallel
