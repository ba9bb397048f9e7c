"""Scoring a run that has no fine-tuned VLM (only ``prepare`` and ``train_tools``): tools mode
works end to end and its planner fit skips the VLM calibration; routed mode fails naming the jobs
to run. And the scoring job's progress lines."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time

import pyarrow.compute as pc
import pytest
from conftest import TINY_RUN, metric_total, scrape_ours

from ray_jobs import fit_planner, score
from reasonrec.config import CONFIG_DIR, load_config
from reasonrec.io import TMP_DIR, MissingStage, open_store


def test_tools_mode_scores_a_run_without_finetune_and_routed_mode_names_the_missing_jobs(tiny_run, tmp_path, caplog):
    cfg, store = tiny_run
    root = tmp_path / "bare"
    base = TINY_RUN + [f"output_root={root}", "planner.vlm_aware=true", "score.tasks=[sequential,direct,ctr]"]
    c = load_config(CONFIG_DIR / "quickstart.yaml", base + ["score.mode=tools", "score.progress_every_s=0.05"])
    st = open_store(c)
    for stage in ("prepare", "train_tools"):  # a run that stopped before the VLM's stages
        shutil.copytree(store.path(stage), st.path(stage))
    with caplog.at_level(logging.INFO):
        s = score.run(c)
    assert not st.fs.exists(st.path("finetune")) and not st.fs.exists(st.path("instructions"))
    preds, queries = st.read_table("score", "predictions"), st.read_table("score", "queries")
    ids = preds.column("query_id").to_pylist()
    assert s["queries"] == queries.num_rows == len(ids) + s["rejected"] == 36  # 12 per task x 3 tasks
    assert len(set(ids)) == len(ids) and set(ids) == set(queries.column("query_id").to_pylist())
    assert s["vlm_calls"] == 0 and set(preds.column("route").to_pylist()) == {"low"}
    # The planner fit skipped the VLM calibration, said why, and does not depend on finetune.
    planner = st.read_json("planner", "summary.json")
    assert planner["vlm_calibration"].startswith("VLM calibration skipped: score.mode=tools")
    assert planner["vlm_right"] == {} and "finetune" not in st.manifest("planner").inputs
    assert "VLM calibration skipped: score.mode=tools" in caplog.text
    assert "VLM calibration skipped" in fit_planner.format_summary(planner)
    # ... hashed as the fit it is: the same as planner.vlm_aware=false, not the routed one.
    routed = load_config(CONFIG_DIR / "quickstart.yaml", base)
    off = load_config(CONFIG_DIR / "quickstart.yaml", base + ["planner.vlm_aware=false"])
    assert fit_planner.config_hash(c) == fit_planner.config_hash(off) != fit_planner.config_hash(routed)
    # Progress lines while scoring (score.progress_every_s=0.05).
    lines = [r.getMessage() for r in caplog.records if r.name == "reasonrec.score"]
    assert any(re.fullmatch(r"score: \d+/36 queries \(\d+%\) in .*q/s, ETA .*; VLM calls 0", m) for m in lines)
    # Routed mode needs the fine-tuned VLM: a clear error naming the jobs, before any work.
    with pytest.raises(MissingStage, match=r"score\.mode=routed answers queries with the fine-tuned VLM") as err:
        score.run(routed)
    assert "python -m ray_jobs.build_instructions" in str(err.value)
    assert "and then `python -m ray_jobs.finetune" in str(err.value)
    assert st.read_json("planner", "summary.json") == planner  # the tools-mode planner is untouched
    # A VLM budget of 0 needs no VLM either: routed tiers, every VLM-routed query answered by its tool.
    zero = load_config(CONFIG_DIR / "quickstart.yaml", base + ["score.vlm_budget=0", "score.stage_name=score_b0"])
    z = score.run(zero)
    zp = st.read_table("score_b0", "predictions").to_pylist()
    assert z["vlm_calls"] == 0 and len(zp) + z["rejected"] == 36
    routed_to_vlm = [p for p in zp if p["route"] in ("medium", "high")]
    assert routed_to_vlm and all(p["vlm_skipped"] and not p["vlm_called"] for p in routed_to_vlm)
    assert all(p["items"] or p["prob"] is not None for p in routed_to_vlm)  # the tool's answer
    # ... and its planner fit is the tools-mode one (no VLM calibration), reused, not refitted.
    assert fit_planner.config_hash(zero) == fit_planner.config_hash(c)
    assert (
        fit_planner.vlm_calibration_status(zero)
        == "VLM calibration skipped: score.vlm_budget=0: no query is answered by the VLM"
    )


def test_progress_line_gives_rate_and_eta():
    assert (
        score.progress_line(30, 120, 60.0, 7)
        == "score: 30/120 queries (25%) in 1m00s, 0.50 q/s, ETA 3m00s; VLM calls 7"
    )
    assert score.progress_line(0, 10, 4.2, 0) == "score: 0/10 queries (0%) in 4s, 0.00 q/s, ETA ?; VLM calls 0"
    assert "ETA 1h01m01s" in score.progress_line(1, 3662, 1.0, 0)


def test_progress_is_logged_while_no_shard_finishes(caplog):
    with caplog.at_level(logging.INFO, logger="reasonrec.score"):
        p = score.Progress(total=10, every_s=0.05)
        try:
            time.sleep(0.3)  # no shard finishes: the timer thread still logs
        finally:
            p.stop()
        n = len(caplog.records)
        assert n >= 2 and all("0/10 queries" in r.getMessage() for r in caplog.records)
        time.sleep(0.15)
        assert len(caplog.records) == n  # stopped
        off = score.Progress(total=10, every_s=0)
        off.add(5, 1)
        off.stop()
        assert len(caplog.records) == n


def test_tools_mode_numbers_equal_evaluates_numbers_for_the_tool_used(tiny_run, tmp_path):
    """Same protocol, same users: the system in tools mode with the fixed choice answers every test
    query with one tool, so its metrics must equal evaluate's metrics of that tool (the tools' CTR
    test AUC once saw a shorter history than the router's queries: this caught it)."""
    from reasonrec.evaluation import evaluate_tools, system_records

    cfg, store = tiny_run
    root = tmp_path / "eq"
    over = TINY_RUN + [
        f"output_root={root}",
        "score.tasks=[sequential,direct,ctr]",
        "score.mode=tools",
        "score.max_queries_per_task=0",
        "planner.tool_choice=fixed",
    ]
    c = load_config(CONFIG_DIR / "quickstart.yaml", over)
    st = open_store(c)
    for stage in ("prepare", "train_tools"):
        shutil.copytree(store.path(stage), st.path(stage))
    score.run(c)
    fixed = st.read_json("planner", "summary.json")["fixed_tools"]
    preds, queries = st.read_table("score", "predictions"), st.read_table("score", "queries")
    users = st.read_table("prepare", "users", columns=["user_id", "n_train", "eh_bucket"])
    system = system_records(preds, queries, users, c)
    tools = evaluate_tools(st, c)
    checked = 0
    for task, metric, k in (("sequential", "hr", 5), ("direct", "hr", 5), ("ctr", "auc", None)):
        tool = fixed[task][0]
        assert set(preds.filter(pc.equal(preds.column("task"), task)).column("primary_tool").to_pylist()) == {tool}

        def value(records, model, task=task, metric=metric, k=k):
            got = [
                r["value"]
                for r in records
                if r["model"] == model
                and r["task"] == task
                and r["metric"] == metric
                and r.get("k") == k
                and r["group"] == "all"
                and r.get("protocol") != "routing"
                and "masked" not in str(r.get("protocol"))
            ]
            assert len(got) == 1, (model, task, got)
            return got[0]

        assert value(system, "reasonrec") == pytest.approx(value(tools, tool), abs=1e-9), (task, tool)
        checked += 1
    assert checked == 3


class _DieOnThirdShard(score._RouterActor):
    """The real router actor, except that its process dies (``os._exit``) when its third shard
    arrives: with no retries the job fails there, like a machine lost mid-run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        if self.calls == 3:
            os._exit(1)
        return super().__call__(batch)


def test_tools_mode_writes_each_shard_as_it_is_routed_so_a_failed_run_resumes_from_it(tiny_run, tmp_path, monkeypatch):
    """In tools mode the router actors write their own shards: on 2 CPUs a separate write step
    waited for the whole routing (Ray Data's budget gave the CPUs to the router pool), so a run
    that died before the end had saved nothing to resume from."""
    import ray.cloudpickle

    cfg, store = tiny_run
    base = TINY_RUN + [
        f"output_root={cfg.output_root}",
        "score.mode=tools",
        "score.tasks=[sequential,direct,ctr]",  # (explanations always take the VLM)
        "score.stage_name=score_tools_resume",
    ]
    c = load_config(CONFIG_DIR / "quickstart.yaml", base + ["score.shard_rows=4", "score.max_task_retries=0"])
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    monkeypatch.setattr(score, "_RouterActor", _DieOnThirdShard)
    with pytest.raises(Exception):  # noqa: B017  (Ray wraps the lost actor in its own error types)
        score.run(c)
    staging = store.path(TMP_DIR, score.staging_name(c, store), "predictions")
    written = [p for p in store.fs.ls(staging) if p.endswith(".parquet")]
    assert len(written) == 2  # the two shards routed before the loss, each whole (no temp file left)
    monkeypatch.undo()
    import ray

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    port = node["MetricsExportPort"]
    before = scrape_ours(port)
    s = score.run(c)
    assert s["shards_resumed"] == 2
    preds = store.read_table("score_tools_resume", "predictions")
    ids = preds.column("query_id").to_pylist()
    assert len(ids) == len(set(ids)) == s["queries"] - s["rejected"]
    assert set(preds.column("route").to_pylist()) == {"low"} and s["vlm_calls"] == 0
    # The batch job's counters (recorded by the shard writers, exported by Ray): the resumed run
    # wrote every prediction but the 2 resumed shards' (<= 8 rows), all low tier. Polled: Ray's
    # metrics agent exports every few seconds.
    tasks = set(preds.column("task").to_pylist())
    t0 = time.monotonic()
    while True:
        now = scrape_ours(port)
        moved = {
            t: metric_total(now, "ray_reasonrec_batch_queries_total", task=t, tier="low")
            - metric_total(before, "ray_reasonrec_batch_queries_total", task=t, tier="low")
            for t in tasks
        }
        if sum(moved.values()) >= preds.num_rows - 8 or time.monotonic() > t0 + 90:
            break
        time.sleep(1)  # polling another process's export, not a fixed wait
    assert sum(moved.values()) >= preds.num_rows - 8 and all(v > 0 for v in moved.values()), moved
