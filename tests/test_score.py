"""The scoring job end to end on a real local Ray: routing, exactly-once output, the VLM only
on medium/high risk, batch == serial, kill + resume, bad query files, the system report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_RUN

from ray_jobs import fit_planner, score
from reasonrec.config import CONFIG_DIR, load_config
from reasonrec.data.catalog import load_context
from reasonrec.data.schemas import QUERIES
from reasonrec.io import TMP_DIR, open_store
from reasonrec.planner import load_planners, load_toolbox
from reasonrec.prompts.cot import parse_output
from reasonrec.prompts.templates import TemplateSampler
from reasonrec.scoring import Router, VLMAnswerer
from reasonrec.vlm.infer import VLMPredictor
from reasonrec.vlm.train import load_finetuned


def test_every_query_is_answered_once_with_a_recorded_decision(tiny_run):
    cfg, store = tiny_run
    s = store.read_json("score", "summary.json")
    preds = store.read_table("score", "predictions")
    queries = store.read_table("score", "queries")
    assert s["queries"] == queries.num_rows == preds.num_rows + s["rejected"] == 48  # 12 per task x 4 tasks
    assert sorted(preds.column("query_id").to_pylist()) == sorted(queries.column("query_id").to_pylist())
    for r in preds.to_pylist():
        assert r["route"] in ("low", "medium", "high") and r["rationale"]
        # The VLM's thought is kept where it answered (without the answer marker), absent elsewhere.
        assert (r["thought"] is not None) == r["vlm_called"] and "Answer:" not in (r["thought"] or "")
        assert len(r["tools_used"]) <= 3
        if r["route"] == "low":
            assert not r["vlm_called"] and len(r["tools_used"]) == 1
            assert (r["prob"] is not None) if r["task"] == "ctr" else len(r["items"]) == cfg.score.k
        else:
            assert r["vlm_called"]
        if r["task"] == "explanation":
            assert r["route"] == "medium" and r["tools_used"] == [] and r["text"] is not None
        if r["route"] == "high":
            assert 1 <= len(r["tools_used"]) <= 3 and r["tools_used"][0] == r["primary_tool"]
        if r["task"] != "explanation":  # the primary tool's own answer is kept on every tier
            assert r["primary_tool"] and (r["tool_prob"] is not None if r["task"] == "ctr" else r["tool_items"])
            if r["route"] == "low":
                assert (r["items"], r["prob"]) == (r["tool_items"], r["tool_prob"])
        # Both VLM confidences where it answered (the verbalised one only where its thought states
        # one, which `confidence` then is), neither elsewhere; the planner's P(tool right) on every
        # ranking / CTR query (the answer's confidence where the tool answered).
        if r["vlm_called"]:
            assert r["conf_token"] is not None and 0.0 <= r["conf_token"] <= 1.0
            assert r["confidence"] == (r["conf_verbal"] if r["conf_verbal"] is not None else r["conf_token"])
            stated = parse_output(r["thought"], r["task"]).thought.confidence
            assert r["conf_verbal"] == (None if stated is None else pytest.approx(stated, abs=1e-6))
        else:
            assert r["conf_verbal"] is None and r["conf_token"] is None
        if r["task"] == "explanation":
            assert r["tool_confidence"] is None
        else:
            assert r["tool_confidence"] is not None and 0.0 <= r["tool_confidence"] <= 1.0
            if not r["vlm_called"]:
                assert r["confidence"] == r["tool_confidence"]
    assert s["vlm_calls"] == int(pc.sum(preds.column("vlm_called")).as_py())
    assert 0 < s["bypass_rate"] < 1  # both paths exercised
    report = store.fs.cat(store.path("report", "report.md")).decode()
    assert "## System" in report and "tier:low" in report
    for png in ("metric_by_eh.png", "route_shares.png", "latency_by_tier.png"):
        assert store.fs.cat(store.path("report", png))[:4] == b"\x89PNG"


class _Counting:
    """The real predictor, counting the examples each call receives."""

    def __init__(self, inner):
        self.inner, self.tok, self.seen, self.shown = inner, inner.tok, 0, []

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        def counted(examples, *a, **kw):
            self.seen += len(examples)
            self.shown += kw.get("shown_tools") or []
            return fn(examples, *a, **kw)

        return counted


def _router_and_vlm(cfg, store, batch_size, mode="routed"):
    torch.manual_seed(0)
    ic = cfg.instructions
    catalog, users, prompts = load_context(
        store,
        cfg.vlm,
        cfg.data.eh_thresholds,
        TemplateSampler(ic.template_mixture, ic.single_template, ic.seed),
        ic.prompt_candidates,
    )
    router = Router(
        load_toolbox(store), load_planners(store, cfg.planner), users, catalog, cfg.planner, cfg.score.k, mode
    )
    vlm = VLMAnswerer(
        _Counting(VLMPredictor(load_finetuned(store, cfg.vlm))),
        prompts,
        users,
        catalog,
        cfg.score.k,
        batch_size=batch_size,
    )
    return router, vlm


def test_vlm_sees_only_medium_and_high_risk_and_batch_equals_serial(tiny_run):
    cfg, store = tiny_run
    queries = store.read_table("score", "queries")
    router, vlm = _router_and_vlm(cfg, store, batch_size=4)
    routed = router(queries)
    out = vlm(routed)
    routes = routed.column("route").to_pylist()
    assert vlm.predictor.seen == sum(r in ("medium", "high") for r in routes) > 0
    # The router's P(tool right) reaches the scored rows unchanged (the VLM's step adds its own two).
    assert out.column("tool_confidence").equals(routed.column("tool_confidence"))
    assert vlm.predictor.seen < len(routes)
    # Serial: one query at a time through both steps gives the same decisions and answers.
    router1, vlm1 = _router_and_vlm(cfg, store, batch_size=1)
    serial = pa.concat_tables([vlm1(router1(queries.slice(i, 1))) for i in range(queries.num_rows)])
    for a, b in zip(out.to_pylist(), serial.to_pylist()):
        assert (a["route"], a["tools_used"], a["items"]) == (b["route"], b["tools_used"], b["items"]), a["query_id"]
        if a["prob"] is not None:
            assert a["prob"] == pytest.approx(b["prob"], abs=1e-4)
    # And the job's own output agrees with this in-process run.
    job = {r["query_id"]: r for r in store.read_table("score", "predictions").to_pylist()}
    for a in out.to_pylist():
        assert (a["route"], a["tools_used"], a["items"]) == (
            job[a["query_id"]]["route"],
            job[a["query_id"]]["tools_used"],
            job[a["query_id"]]["items"],
        )


def test_ranking_is_told_which_tools_each_prompt_shows(tiny_run):
    cfg, store = tiny_run
    queries = store.read_table("score", "queries")
    queries = queries.filter(pc.equal(queries.column("task"), "sequential"))
    router, vlm = _router_and_vlm(cfg, store, batch_size=4, mode="vlm_tools")
    routed = router(queries)
    vlm(routed)
    # vlm_tools: every query consults tools; the ranking gets the tools whose answers its prompt
    # shows (the thought's tool field ranges over them under vlm.thought_tool_sets)
    assert routed.column("route").to_pylist() == ["high"] * queries.num_rows
    assert vlm.predictor.shown == routed.column("tools_used").to_pylist() and all(vlm.predictor.shown)


def _query_file(tmp_path, rows):
    path = str(tmp_path / "queries.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=QUERIES), path)
    return path


def test_unknown_users_are_cold_and_bad_items_are_rejected(tiny_run, tmp_path):
    cfg, store = tiny_run
    path = _query_file(
        tmp_path,
        [
            {"query_id": 1, "task": "sequential", "user_id": 10**9},  # unknown, no history
            {
                "query_id": 2,
                "task": "sequential",
                "user_id": 10**9 + 1,
                "history": [1, 2, 3],
            },  # unknown + inline history
            {"query_id": 3, "task": "direct", "user_id": 0, "candidates": [1, 2, 10**6]},  # unknown item
            {"query_id": 4, "task": "ctr", "user_id": 0, "item_id": 3},
        ],
    )
    c = load_config(
        CONFIG_DIR / "quickstart.yaml",
        TINY_RUN + [f"output_root={cfg.output_root}", f"score.queries_path={path}", "score.stage_name=score_adhoc"],
    )
    s = score.run(c)
    assert (s["queries"], s["predictions"], s["rejected"]) == (4, 3, 1)
    preds = {r["query_id"]: r for r in store.read_table("score_adhoc", "predictions").to_pylist()}
    assert preds[1]["cold_user"] and preds[1]["eh_bucket"] == "high" and "unknown user" in preds[1]["rationale"]
    assert preds[2]["cold_user"] and not preds[4]["cold_user"]
    rej = store.read_table("score_adhoc", "rejected").to_pylist()
    assert rej[0]["query_id"] == 3 and "unknown item id" in rej[0]["error"]


def test_empty_or_malformed_query_files_fail_fast_naming_the_row(tiny_run, tmp_path):
    cfg, store = tiny_run
    empty = str(tmp_path / "empty.parquet")
    pq.write_table(QUERIES.empty_table(), empty)
    with pytest.raises(score.QueryFileError, match="no rows"):
        score.load_query_file(empty, store)
    bad = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"query_id": [1, 2, 3], "task": ["ctr", "ctr", "ctr"], "user_id": [1, 2, None]}), bad)
    with pytest.raises(score.QueryFileError, match="row 2 has a null 'user_id'"):
        score.load_query_file(bad, store)
    dup = str(tmp_path / "dup.parquet")
    pq.write_table(pa.table({"query_id": [5, 5], "task": ["ctr", "ctr"], "user_id": [1, 2]}), dup)
    with pytest.raises(score.QueryFileError, match="query_id 5 is not unique"):
        score.load_query_file(dup, store)
    nocol = str(tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"query_id": [1], "user_id": [1]}), nocol)
    with pytest.raises(score.QueryFileError, match=r"missing required column\(s\) \['task'\]"):
        score.load_query_file(nocol, store)


def test_killed_job_resumes_and_writes_every_query_once(tiny_run, tmp_path):
    cfg, store = tiny_run
    extra = ["score.shard_rows=4", "score.stage_name=score_resume"]
    args = [
        sys.executable,
        "-m",
        "ray_jobs.score",
        "--config",
        str(CONFIG_DIR / "quickstart.yaml"),
        *TINY_RUN,
        f"output_root={cfg.output_root}",
        *extra,
    ]
    c = load_config(CONFIG_DIR / "quickstart.yaml", TINY_RUN + [f"output_root={cfg.output_root}", *extra])
    staging = store.path(TMP_DIR, score.staging_name(c, store), "predictions")
    env = {**os.environ, "RAY_ADDRESS": ""}
    log = tmp_path / "score.log"
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if store.fs.exists(staging) and len(store.fs.ls(staging)) >= 2:
                break
            time.sleep(0.2)  # polling a file system for another process's progress, not a fixed wait
        assert proc.poll() is None, (
            f"the job ended (exit {proc.returncode}) before it could be killed; "
            f"its log ends:\n{log.read_text()[-3000:]}"
        )
        written = len(store.fs.ls(staging))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    s = score.run(c)
    assert s["shards_resumed"] >= written >= 2
    preds = store.read_table("score_resume", "predictions")
    ids = preds.column("query_id").to_pylist()
    assert len(ids) == len(set(ids)) == s["queries"] - s["rejected"] == 48


class _CrashOnceRouter(score._RouterActor):
    """The real router actor, except that its process dies (``os._exit``) after the first batch
    of the run: a real crash, which Ray must answer by restarting the actor and retrying."""

    flag = ""  # a file that exists once the crash happened

    def __call__(self, batch):
        out = super().__call__(batch)
        if not os.path.exists(self.flag):
            open(self.flag, "w").close()
            os._exit(1)
        return out


def test_crashed_actor_is_restarted_its_batch_retried_and_counted(tiny_run, tmp_path, monkeypatch):
    import ray.cloudpickle

    cfg, store = tiny_run
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    monkeypatch.setattr(_CrashOnceRouter, "flag", str(tmp_path / "crashed"))
    monkeypatch.setattr(score, "_RouterActor", _CrashOnceRouter)
    c = load_config(
        CONFIG_DIR / "quickstart.yaml", TINY_RUN + [f"output_root={cfg.output_root}", "score.stage_name=score_crash"]
    )
    s = score.run(c)
    assert os.path.exists(tmp_path / "crashed")
    assert s["actor_restarts"]["router"] >= 1 and s["batch_retries"]["router"] >= 1
    assert s["actor_restarts"]["vlm"] == 0 and s["batch_retries"]["vlm"] == 0
    assert "crashed actors restarted by Ray" in score.format_summary(s)
    # Nothing lost or doubled, and the retried shard gives the same decisions as the clean run.
    got = {r["query_id"]: r for r in store.read_table("score_crash", "predictions").to_pylist()}
    clean = {r["query_id"]: r for r in store.read_table("score", "predictions").to_pylist()}
    assert len(got) == s["predictions"] == s["queries"] - s["rejected"] and got.keys() == clean.keys()
    assert all((got[q]["route"], got[q]["tools_used"]) == (clean[q]["route"], clean[q]["tools_used"]) for q in got)


def test_vlm_aware_planner_bypasses_where_the_tool_is_likelier_right(tiny_run, tmp_path):
    """The planner stage measures the VLM on validation queries; routing then also bypasses
    queries whose tool confidence reaches the VLM's rate for their EH bucket."""
    import shutil

    cfg, store = tiny_run
    root = tmp_path / "copy"
    shutil.copytree(cfg.output_root, root)  # the shared run's planner stays untouched
    base = TINY_RUN + [
        f"output_root={root}",
        "planner.bypass_buckets=[low]",
        "planner.bypass_confidence=0.5",
        "score.max_queries_per_task=6",
    ]
    paper = score.run(load_config(CONFIG_DIR / "quickstart.yaml", base + ["score.stage_name=paper"]))
    # Two actors per pool on the 2-CPU test cluster: pools as large as the cluster must not
    # starve the planner fit's input (it once hung on a repartition waiting for a CPU).
    c_overrides = base + [
        "planner.vlm_aware=true",
        "planner.vlm_fit_queries=6",
        "score.stage_name=aware",
        "score.count_flops=true",
        "score.tool_actors=2",
        "score.vlm_actors=2",
    ]
    c = load_config(CONFIG_DIR / "quickstart.yaml", c_overrides)
    aware = score.run(c)
    st = open_store(c)
    fitted = st.read_json("planner", "summary.json")["vlm_right"]
    assert set(fitted) == {"sequential", "direct", "ctr"}
    assert all(sum(b["n"] for b in fitted[t].values()) == 6 for t in fitted)  # 6 validation queries per task
    # Tools mode ignores the VLM's record: it keeps this planner instead of refitting one without it.
    fingerprint = st.manifest("planner").fingerprint
    tools = load_config(CONFIG_DIR / "quickstart.yaml", c_overrides + ["score.mode=tools"])
    assert fit_planner.run(tools)["skipped"] and st.manifest("planner").fingerprint == fingerprint
    planners = load_planners(st, c.planner)
    assert aware["bypass_rate"] >= paper["bypass_rate"]
    for r in st.read_table("aware", "predictions").to_pylist():
        if (
            r["route"] == "low"
            and r["task"] != "explanation"
            and not (r["eh_bucket"] == "low" and r["confidence"] >= 0.5)
        ):
            assert r["confidence"] >= planners[r["task"]].vlm_right[r["eh_bucket"]] - 1e-6
            assert ("validation AUC" if r["task"] == "ctr" else "P(VLM right)=") in r["rationale"]
    # score.count_flops: torch FLOPs per query; the VLM tiers cost more than the tool tier.
    from reasonrec.evaluation import cost_markdown, system_records

    preds = st.read_table("aware", "predictions")
    rows = preds.to_pylist()
    assert all(r["flops"] > 0 for r in rows if r["vlm_called"])
    low = [r["flops"] for r in rows if r["route"] == "low"]
    vlm = [r["flops"] for r in rows if r["vlm_called"]]
    assert low and vlm and sum(vlm) / len(vlm) > 10 * sum(low) / len(low)
    table = cost_markdown(
        system_records(preds, st.read_table("aware", "queries"), st.read_table("prepare", "users"), c)
    )
    assert "Table A3" in table and "| sequential | low |" in table
    # The paper-rule run sends ranking / CTR queries to the VLM: the disagreement table exists.
    from reasonrec.evaluation import system_markdown

    assert any(
        r["route"] != "low" and r["task"] != "explanation" for r in st.read_table("paper", "predictions").to_pylist()
    )
    assert "(paper Table 7;" in system_markdown(
        system_records(
            st.read_table("paper", "predictions"),
            st.read_table("paper", "queries"),
            st.read_table("prepare", "users"),
            c,
        )
    )


def test_fixed_tool_choice_shows_the_tools_in_the_order_the_vlm_trained_on(tiny_run, tmp_path, caplog):
    """instructions.hint_order=usable_rate: the planner's fixed choice takes the instructions'
    recorded tool ranking (what the VLM's training prompts showed), not a refit of its own."""
    import json
    import shutil

    cfg, store = tiny_run
    root = tmp_path / "copy"
    shutil.copytree(cfg.output_root, root)  # the shared run's planner stays untouched
    ranked = {t: [p.names[i] for i in p.fixed_ranking()] for t, p in load_planners(store, cfg.planner).items()}
    by_rate = {t: names[:3] for t, names in ranked.items()}
    # A ranking the planner's own fit would not give: its tools worst-first by validation usable rate.
    trained = {t: names[::-1] for t, names in ranked.items()}
    c = load_config(
        CONFIG_DIR / "quickstart.yaml",
        TINY_RUN + [f"output_root={root}", "planner.tool_choice=fixed", "instructions.hint_order=usable_rate"],
    )
    st = open_store(c)
    summary_path = root / c.run_name / "instructions" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "tool_ranking": trained}))
    fitted = fit_planner.run(c)
    assert fitted["fixed_tools"] == {t: names[:3] for t, names in trained.items()} != by_rate
    # Saved with the planner: scoring and Serve load it from planner.json.
    assert {t: [p.names[i] for i in p.fixed_ranking()] for t, p in load_planners(st, c.planner).items()} == trained
    # Without an instructions stage the fixed choice falls back to the planner's own ranking.
    shutil.rmtree(root / c.run_name / "instructions")
    with caplog.at_level("WARNING", logger="reasonrec.fit_planner"):
        assert fit_planner.run(c)["fixed_tools"] == by_rate
    assert "no instructions stage" in caplog.text


def test_the_tool_choice_guard_is_saved_with_the_planner_and_in_the_report(tiny_run):
    cfg, store = tiny_run
    guard = store.read_json("planner", "summary.json")["guard"]
    assert set(guard) == {"sequential", "direct", "ctr"}
    planners = load_planners(store, cfg.planner)
    for task, g in guard.items():
        assert g["use"] in ("learned", "fixed") and g["n"] >= 20 and g["fixed_tool"] in planners[task].names
        assert planners[task].guard == g  # scoring and Serve load the same decision
    report = store.fs.open(store.path("report", "report.md")).read().decode()
    assert "Tool choice guard" in report and all(f"| {t} | {g['use']}" in report for t, g in guard.items())
