"""Does the planner's tool choice pay? The system in tools mode (every query answered by the tool the
planner picks, no VLM) under each tool choice, against every single tool, on a run's whole test set.

    python -m bench.routing --config configs/quickstart.yaml output_root=/tmp/routing run_name=syn5k \
        data.sources.0.synthetic.n_users=5000

Runs ``prepare`` and ``train_tools`` (skipped where up to date), then scores every test query of
sequential, direct and CTR in tools mode (``score.max_queries_per_task=0``, ``planner.vlm_aware=false``)
once per choice: ``learned`` (guarded, with the fused ranking: the default), ``learned`` without the
fused ranking (``planner.fusion=false``), ``learned`` without the guard
(``planner.guard_z=-1``), ``fixed``, ``random`` and ``oracle`` (the truth picks: an upper bound), each
into its own stage ``bench_routing_<choice>``; the tools' own test metrics come from ``evaluate``'s
functions on the same queries. Prints one Markdown table per task (paper Tables 5 / A4) and writes
``{run}/bench_routing.json``. Protocols: sequential HR@5 = full-catalog ranking of the leave-one-out
test item, history kept; direct HR@5 = 1 positive + ``data.direct_negatives`` sampled negatives; CTR AUC
on the CTR test split. Each ranking table also shows, on every test user, the expected hit rate of a
tool drawn at random per query and the oracle (the truth in any tool's top 5), computed from the
tools' own test answers (:func:`choice_bounds`). ``--from-stage S`` reports an already committed
tools-mode stage (e.g. ``bench.score_scale``'s ``score_scale_tools``) as the learned choice.

Then the diagnosis of the tool choice (:mod:`reasonrec.diagnosis`) on the same test queries, for
the ``learned`` and ``learned, no guard`` stages: every tool answers every test query once more
through the scoring path, so per task, EH bucket and cold-start group one sees how often each tool
was picked as primary, how often it was right there, which tool would have been right on those
queries, and the calibration of the planner's P(tool right) per tool (reliability table, ECE,
Brier). Right = the truth in the tool's top ``planner.correct_k`` (CTR: the label's side of 0.5,
the planner's own "usable" label; CTR is judged by AUC in the tables above). ``--no-diagnose``
skips it; ``--diagnose-only`` runs only it, on the committed ``bench_routing_*`` stages (no
re-scoring; it merges into an existing ``bench_routing.json``); ``--diagnose-max-queries N``
caps it to N evenly spaced test queries per task.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np

log = logging.getLogger("bench.routing")

CHOICES = {
    "learned": [],
    "learned, no fusion": ["planner.fusion=false"],
    "learned, no guard": ["planner.guard_z=-1"],
    "fixed": ["planner.tool_choice=fixed"],
    "random": ["planner.tool_choice=random"],
    "oracle": ["planner.tool_choice=oracle"],
}
BASE = [
    "score.mode=tools",
    "score.tasks=[sequential,direct,ctr]",
    "score.max_queries_per_task=0",
    "planner.vlm_aware=false",
]
METRIC = {"sequential": ("hr", 5), "direct": ("hr", 5), "ctr": ("auc", None)}
DIAGNOSED = ("learned", "learned, no fusion", "learned, no guard")  # the choices whose picks the diagnosis breaks down


def stage_name(choice: str) -> str:
    return "bench_routing_" + choice.replace(", ", "_").replace(" ", "_")


def _pick(records: list[dict], task: str, group: str = "all") -> dict[str, float]:
    """model -> the task's headline metric (group ``all``) from evaluate records."""
    metric, k = METRIC[task]
    return {
        r["model"]: r["value"]
        for r in records
        if r["task"] == task
        and r["metric"] == metric
        and r.get("k") == k
        and r["group"] == group
        and r.get("protocol") != "routing"
        and "masked" not in str(r.get("protocol"))
    }


def table(task: str, system: dict[str, float], tools: dict[str, float], n: int, guard: dict | None) -> str:
    metric, k = METRIC[task]
    name = f"{metric.upper()}@{k}" if k else metric.upper()
    best = max(tools, key=tools.get) if tools else None
    lines = [f"### {task} ({n} test queries, {name})", "", "| | " + name + " | vs best tool |", "|---|---|---|"]
    for choice, v in system.items():
        rel = f"{(v / tools[best] - 1) * 100:+.1f}%" if best and tools[best] else "-"
        lines.append(f"| system, {choice} choice | {v:.4f} | {rel} |")
    for tool, v in sorted(tools.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {tool}{' (best tool)' if tool == best else ''} | {v:.4f} | |")
    if guard:
        lines.append(f"\nguard: {guard['use']} ({guard['why']})")
    return "\n".join(lines) + "\n"


def choice_bounds(store, k: int = 5) -> dict[str, dict[str, float]]:
    """Per ranking task, on every test user, from the tools' own test answers (``train_tools``
    predictions, the answers the system's tools give: a tools-mode run with a fixed tool equals
    them, tests/test_score_without_vlm.py): ``oracle`` = the truth in some tool's top ``k`` (a
    perfect per-query choice), ``random`` = the expected hit rate of a tool drawn uniformly per
    query (the mean of the tools' hit rates), ``n`` = test users. The ensemble is not a tool to
    choose. No scoring run needed: these two choices need no planner."""
    import pyarrow.compute as pc

    from reasonrec.evaluation import read_split

    preds = read_split(store, "train_tools", "predictions", ["user_id", "tool", "rank", "cand_rank", "n_candidates"])
    preds = preds.filter(pc.not_equal(preds.column("tool"), "ensemble"))
    users = preds.column("user_id").to_numpy()
    tools = preds.column("tool").to_numpy(zero_copy_only=False)
    out = {}
    for task, col in (("sequential", "rank"), ("direct", "cand_rank")):
        rank = preds.column(col).to_numpy()
        keep = np.ones(len(rank), bool) if task == "sequential" else preds.column("n_candidates").to_numpy() > 0
        uid, inv = np.unique(users[keep], return_inverse=True)
        hit = rank[keep] < k
        any_hit = np.zeros(len(uid), bool)
        np.logical_or.at(any_hit, inv, hit)
        per_tool = [hit[tools[keep] == t].mean() for t in np.unique(tools[keep])]
        out[task] = {"oracle": float(any_hit.mean()), "random": float(np.mean(per_tool)), "n": len(uid)}
    return out


def system_right(preds, queries, correct_k: int = 5) -> np.ndarray:
    """Per prediction row (predictions' order): was the system right? Ranking: the truth in its
    top ``correct_k``; CTR: its probability on the label's side of 0.5."""
    from reasonrec.evaluation import per_query_correct

    truth = per_query_correct(preds, queries)
    tasks = preds.column("task").to_numpy(zero_copy_only=False)
    prob = np.array([np.nan if p is None else p for p in preds.column("prob").to_pylist()], np.float64)
    label = np.array([-1 if x is None else x for x in truth["label"]], np.float64)
    ctr_right = ~np.isnan(prob) & ((prob >= 0.5) == (label > 0))
    return np.where(tasks == "ctr", ctr_right, truth["rank"] < correct_k)


def diagnose_task(
    task: str,
    rows: list[dict],
    preds: dict,
    queries,
    users_table,
    toolbox,
    planner,
    userdir,
    popularity: np.ndarray,
    split: str = "test",
    k: int = 10,
    correct_k: int = 5,
    batch: int = 1000,
) -> tuple[dict, str]:
    """The diagnosis of one task's tool choice (:mod:`reasonrec.diagnosis`): ``rows`` its test
    QUERIES rows, ``preds`` choice -> that stage's predictions (``primary_tool``), ``queries`` the
    stage's queries (truth for the system's own answers). Queries some stage did not answer are
    left out. Returns (JSON-able dict, Markdown)."""
    from reasonrec import diagnosis as dg
    from reasonrec.evaluation import segments

    by_choice = {}
    for choice, p in preds.items():
        p = p.filter(np.asarray(p.column("task").to_numpy(zero_copy_only=False) == task))
        by_choice[choice] = (p, {int(q): i for i, q in enumerate(p.column("query_id").to_pylist())})
    rows = [r for r in rows if all(int(r["query_id"]) in pos for _, pos in by_choice.values())]
    right_is = (
        "the label's side of 0.5 (the planner's usable label; CTR's metric is AUC)"
        if task == "ctr"
        else f"truth in the tool's top {correct_k}"
    )
    if not rows:
        return {"n": 0, "right": right_is}, ""
    got = dg.answer_rightness(rows, toolbox, planner, userdir, popularity, split, k, correct_k, batch)
    uids = got["user_id"]
    known = np.isin(uids, users_table.column("user_id").to_numpy())
    buckets, cs = np.full(len(uids), "high", dtype=object), np.zeros(len(uids), np.int64)
    if known.any():
        b, g = segments(users_table, uids[known])
        buckets[known], cs[known] = b, g
    groups = {"eh_bucket": buckets, "cold_start": dg.cold_start_labels(cs)}
    names = got["names"]
    out = {"n": len(rows), "right": right_is, "choices": {}, "calibration": {}}
    md = []
    picked = set()
    for choice, (p, pos) in by_choice.items():
        idx = np.array([pos[int(q)] for q in got["query_id"]], np.int64)
        primary = np.asarray(p.column("primary_tool").to_pylist(), dtype=object)[idx]
        sys_ok = system_right(p, queries, correct_k)[idx]
        # A primary that is no tool (``fusion``: the fused ranking answered) is judged by the system's answer.
        is_tool = np.array([t in got["right"] for t in primary.tolist()], bool)
        tool_ok = np.array(
            [bool(got["right"][t][i]) if ok else False for i, (t, ok) in enumerate(zip(primary, is_tool))]
        )
        rows_ = dg.pick_table(primary, got["right"], groups, prob=got["prob"], system=sys_ok)
        picked |= {t for t in primary.tolist() if t in got["right"]}
        out["choices"][choice] = {
            "picks": rows_,
            # Sanity: the primary tool's answer here vs the stage's own (equal in tools mode).
            "primary_vs_system_mismatch": int((tool_ok != sys_ok)[is_tool].sum()),
            # Share of the queries with a tool as primary where it is the tool with the highest P(right).
            "primary_is_highest_p": float(np.mean((primary == got["learned"])[is_tool])) if is_tool.any() else None,
            "primary_not_a_tool": {
                str(t): int(n) for t, n in zip(*np.unique(primary[~is_tool].astype(str), return_counts=True))
            },
        }
        md.append(
            dg.pick_markdown(
                rows_, f"{task}, {choice} choice: tool picks ({len(rows)} test queries; right = {right_is})"
            )
        )
        c = out["choices"][choice]
        other = "".join(f"; {n} queries answered by {t} (no tool)" for t, n in c["primary_not_a_tool"].items())
        top = c["primary_is_highest_p"]
        md.append(
            (
                f"primary = the highest P(right) tool on {top:.1%} of the tool-answered queries; "
                if top is not None
                else ""
            )
            + f"primary tool's answer vs the system's disagree on {c['primary_vs_system_mismatch']} queries{other}\n"
        )
    out["calibration"] = {t: dg.reliability(got["prob"][t], got["right"][t]) for t in names}
    md.append(
        dg.calibration_markdown(
            out["calibration"], f"{task}: calibration of the planner's P(tool right), every tool on every query"
        )
    )
    for t in names:
        if t in picked:
            md.append(dg.reliability_markdown(out["calibration"][t], f"{task}, {t} (picked as primary)"))
    return out, "\n".join(md)


def diagnose(store, cfg, planners=None, choices=DIAGNOSED, batch: int = 1000, max_queries: int = 0) -> tuple[dict, str]:
    """The diagnosis of every task on the committed stages of ``choices`` (those present); the
    tools and user context come from the run, the planners (their per-tool P(right) models) from
    ``planners`` or the ``planner`` stage. ``max_queries`` > 0: that many evenly spaced test
    queries per task. Returns (JSON-able dict by task, Markdown)."""
    from reasonrec.data.catalog import UserDirectory, load_catalog
    from reasonrec.planner import load_planners, load_toolbox

    stages = {c: stage_name(c) for c in choices if store.manifest(stage_name(c)) is not None}
    if not stages:
        return {}, ""
    planners = planners if planners is not None else load_planners(store, cfg.planner)
    queries = store.read_table(next(iter(stages.values())), "queries")
    preds = {c: store.read_table(s, "predictions") for c, s in stages.items()}
    users_table = store.read_table("prepare", "users", columns=["user_id", "n_train", "eh_bucket"])
    catalog = load_catalog(store, photos=False)
    userdir = UserDirectory.from_store(store, catalog, cfg.data.eh_thresholds)
    toolbox = load_toolbox(store)
    out, md = {"choices": list(stages), "tasks": {}}, ["## Tool choice diagnosis\n"]
    qtask = queries.column("task").to_numpy(zero_copy_only=False)
    for task in METRIC:
        if task not in planners or not (qtask == task).any():
            continue
        rows = queries.filter(np.asarray(qtask == task)).to_pylist()
        if max_queries and len(rows) > max_queries:
            rows = [rows[i] for i in np.unique(np.linspace(0, len(rows) - 1, max_queries).round().astype(int))]
        log.info("diagnosis: %s, %d queries", task, len(rows))
        out["tasks"][task], text = diagnose_task(
            task,
            rows,
            preds,
            queries,
            users_table,
            toolbox,
            planners[task],
            userdir,
            catalog.popularity,
            cfg.score.split,
            cfg.score.k,
            cfg.planner.correct_k,
            batch,
        )
        md.append(text)
    return out, "\n".join(md)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--no-diagnose", action="store_true", help="skip the tool choice diagnosis")
    ap.add_argument(
        "--diagnose-only",
        action="store_true",
        help="only the diagnosis, on the committed bench_routing_* stages (no scoring)",
    )
    ap.add_argument("--diagnose-max-queries", type=int, default=0, help="per task, 0 = every test query")
    ap.add_argument("--diagnose-batch", type=int, default=1000, help="queries per tools call")
    ids = {c.replace(", ", "_").replace(" ", "_"): c for c in CHOICES}  # learned_no_fusion, ...
    ap.add_argument(
        "--choices", default=",".join(ids), help=f"comma-separated tool choices to score (of: {', '.join(ids)})"
    )
    ap.add_argument("--tasks", default=",".join(METRIC), help="comma-separated tasks (of sequential, direct, ctr)")
    ap.add_argument(
        "--from-stage",
        help="report this committed tools-mode score stage as the learned choice instead of scoring it again "
        "(it must have been scored with the planner stage as it is now, e.g. by bench.score_scale)",
    )
    a = ap.parse_args(argv)
    if not set(a.choices.split(",")) <= set(ids):
        ap.error(f"--choices: choose from {', '.join(ids)}")
    choices = {ids[c]: CHOICES[ids[c]] for c in a.choices.split(",")}
    tasks = a.tasks.split(",")
    if "learned" not in choices or not set(tasks) <= set(METRIC):
        ap.error("--choices must include 'learned'; --tasks must be among sequential, direct, ctr")
    base = [*BASE, f"score.tasks=[{','.join(tasks)}]"]

    from reasonrec.config import load_config
    from reasonrec.io import open_store
    from reasonrec.planner import load_planners

    learned_cfg = load_config(a.config, [*a.overrides, *base, f"score.stage_name={stage_name('learned')}"])
    if a.diagnose_only:
        store = open_store(learned_cfg)
        if store.manifest(stage_name("learned")) is None:
            print(
                f"no committed {stage_name('learned')} stage under {store.url()}: run the bench first", file=sys.stderr
            )
            return 2
        # The planner stage holds the last choice's fit; the per-tool P(right) models do not depend
        # on the choice (fitted alike for every choice), which is all the diagnosis uses.
        diag, md = diagnose(store, learned_cfg, batch=a.diagnose_batch, max_queries=a.diagnose_max_queries)
        print(md)
        path = store.path("bench_routing.json")
        out = {"overrides": a.overrides}
        if store.fs.exists(path):
            with store.fs.open(path) as f:
                out = json.load(f)
        out["diagnosis"] = diag
        with store.fs.open(path, "w") as f:
            json.dump(out, f, indent=2, default=str)
        return 0

    from ray_jobs import prepare, score, train_tools
    from reasonrec.evaluation import evaluate_tools, system_records

    cfg = load_config(a.config, [*a.overrides, *base])
    if not a.from_stage:  # a committed stage is read as it is: re-running a stage would re-write it
        prepare.run(cfg)
        train_tools.run(cfg)
    store = open_store(cfg)
    tool_records = evaluate_tools(store, cfg)
    users = store.read_table("prepare", "users", columns=["user_id", "n_train", "eh_bucket"])
    out: dict = {"overrides": a.overrides, "tasks": {}}
    system: dict[str, dict[str, float]] = {t: {} for t in tasks}
    guards, counts, planners = {}, {}, None
    for choice, extra in choices.items():
        stage = stage_name(choice)
        c = load_config(a.config, [*a.overrides, *base, *extra, f"score.stage_name={stage}"])
        if choice == "learned" and a.from_stage:
            stage, m = a.from_stage, store.manifest(a.from_stage)
            if m is None or m.inputs.get("planner") != store.manifest("planner").fingerprint():
                print(f"{a.from_stage}: not committed, or scored with another planner fit", file=sys.stderr)
                return 2
            summary = m.metrics
        else:
            summary = score.run(c)
        if choice == "learned":
            guards = store.read_json("planner", "summary.json").get("guard", {})
            planners = load_planners(store, c.planner)  # the planners that made the learned choice
        preds, queries = store.read_table(stage, "predictions"), store.read_table(stage, "queries")
        recs = system_records(preds, queries, users, c)
        for task in tasks:
            system[task][choice] = _pick(recs, task).get("reasonrec", float("nan"))
            counts[task] = sum(1 for t in preds.column("task").to_pylist() if t == task)
        out.setdefault("score_seconds", {})[choice] = summary.get("seconds")
    bounds = choice_bounds(store)  # random (expected) and oracle from the tools' own test answers
    for task in tasks:
        for name in ("random", "oracle"):
            if task in bounds and name not in system[task]:
                system[task][f"{name} (from the tools' answers)"] = bounds[task][name]
        tools = {m: v for m, v in _pick(tool_records, task).items() if m != "ensemble"}
        out["tasks"][task] = {"system": system[task], "tools": tools, "n": counts[task], "guard": guards.get(task)}
        print(table(task, system[task], tools, counts[task], guards.get(task)))
    if not a.no_diagnose:
        out["diagnosis"], md = diagnose(
            store, learned_cfg, planners, batch=a.diagnose_batch, max_queries=a.diagnose_max_queries
        )
        print(md)
    with store.fs.open(store.path("bench_routing.json"), "w") as f:
        json.dump(out, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
