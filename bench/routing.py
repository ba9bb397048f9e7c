"""Does the planner's tool choice pay? The system in tools mode (every query answered by the tool the
planner picks, no VLM) under each tool choice, against every single tool, on a run's whole test set.

    python -m bench.routing --config configs/quickstart.yaml output_root=/tmp/routing run_name=syn5k \
        data.sources.0.synthetic.n_users=5000

Runs ``prepare`` and ``train_tools`` (skipped where up to date), then scores every test query of
sequential, direct and CTR in tools mode (``score.max_queries_per_task=0``, ``planner.vlm_aware=false``)
once per choice: ``learned`` (guarded, the default), ``learned`` without the guard
(``planner.guard_z=-1``), ``fixed``, ``random`` and ``oracle`` (the truth picks: an upper bound), each
into its own stage ``bench_routing_<choice>``; the tools' own test metrics come from ``evaluate``'s
functions on the same queries. Prints one Markdown table per task (paper Tables 5 / A4) and writes
``{run}/bench_routing.json``. Protocols: sequential HR@5 = full-catalog ranking of the leave-one-out
test item, history kept; direct HR@5 = 1 positive + ``data.direct_negatives`` sampled negatives; CTR AUC
on the CTR test split.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

CHOICES = {
    "learned": [],
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


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)

    from ray_jobs import prepare, score, train_tools
    from reasonrec.config import load_config
    from reasonrec.evaluation import evaluate_tools, system_records
    from reasonrec.io import open_store

    cfg = load_config(a.config, [*a.overrides, *BASE])
    prepare.run(cfg)
    train_tools.run(cfg)
    store = open_store(cfg)
    tool_records = evaluate_tools(store, cfg)
    users = store.read_table("prepare", "users", columns=["user_id", "n_train", "eh_bucket"])
    out: dict = {"overrides": a.overrides, "tasks": {}}
    system: dict[str, dict[str, float]] = {t: {} for t in METRIC}
    guards, counts = {}, {}
    for choice, extra in CHOICES.items():
        stage = "bench_routing_" + choice.replace(", ", "_").replace(" ", "_")
        c = load_config(a.config, [*a.overrides, *BASE, *extra, f"score.stage_name={stage}"])
        summary = score.run(c)
        if choice == "learned":
            guards = store.read_json("planner", "summary.json").get("guard", {})
        preds, queries = store.read_table(stage, "predictions"), store.read_table(stage, "queries")
        recs = system_records(preds, queries, users, c)
        for task in METRIC:
            system[task][choice] = _pick(recs, task).get("reasonrec", float("nan"))
            counts[task] = sum(1 for t in preds.column("task").to_pylist() if t == task)
        out.setdefault("score_seconds", {})[choice] = summary.get("seconds")
    for task in METRIC:
        tools = {m: v for m, v in _pick(tool_records, task).items() if m != "ensemble"}
        out["tasks"][task] = {"system": system[task], "tools": tools, "n": counts[task], "guard": guards.get(task)}
        print(table(task, system[task], tools, counts[task], guards.get(task)))
    with store.fs.open(store.path("bench_routing.json"), "w") as f:
        json.dump(out, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
