"""evaluate: metrics tables for the tools (and later the whole system) on the test queries.

    python -m ray_jobs.evaluate --config configs/quickstart.yaml [key=value ...] [--force]

Orchestration only: the protocols, segments, records and tables are ``reasonrec.evaluation``
(Ray-free). Every metric is reported overall and per EH bucket and cold-start group under the
protocol stated next to it. Writes ``{run}/report/``: ``metrics.jsonl`` (one JSON object per
number: task, model, protocol, metric, k, group, value, n), ``tools.md`` (readable tables) and,
once ``score`` has run, ``report.md`` with the system tables and PNG plots. A run whose test queries
span several domains also gets every table per domain (records with ``group`` ``domain:{d}`` /
``domain:{d}|{segment}``) and, for the domains ``evaluate.domain_baselines`` names a
single-domain run for, the per-domain drop (multi - single) next to that run's numbers.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from reasonrec.config import RunConfig, parse_cli, section_hash
from reasonrec.evaluation import (
    KS,
    TIMESHIFT_ITEM,
    calibration_markdown,
    calibration_records,
    comparison_markdown,
    domain_drop_markdown,
    domain_drop_records,
    domain_markdown,
    evaluate_tools,
    evaluate_tools_by_domain,
    guard_markdown,
    markdown_tables,
    plots,
    protocols,
    reliability_plot,
    split_domain_group,
    system_markdown,
    system_records,
    system_records_by_domain,
)
from reasonrec.io import open_store
from reasonrec.runtime import init_ray

STAGE = "report"
log = logging.getLogger("reasonrec.evaluate")


def run(cfg: RunConfig, force: bool = False) -> dict:
    init_ray(cfg.ray)
    t0 = time.time()
    store = open_store(cfg)
    tools = store.require("train_tools")
    prep = store.require("prepare")
    inputs = {"prepare": prep.fingerprint, "train_tools": tools.fingerprint}
    scored = store.manifest("score")
    if scored is not None:
        inputs["score"] = scored.fingerprint
    others = _compared_runs(cfg)
    for name, other in others.items():
        inputs[f"compare:{name}"] = other.fingerprint
    # A single-domain run not evaluated yet is named as missing in the report (not an error): its
    # report, once there, is a new input, so the next evaluate re-runs with it.
    baselines = _compared_runs(
        cfg, sorted(set(cfg.evaluate.domain_baselines.values())), "domain_baselines", required=False
    )
    for name, other in baselines.items():
        inputs[f"domain_baseline:{name}"] = other.fingerprint
    config_hash = section_hash(
        {
            "data": prep.config_hash,
            "ks": list(KS),
            "compare_with": sorted(others),
            "domain_baselines": dict(sorted(cfg.evaluate.domain_baselines.items())),
        }
    )
    if not force and store.is_done(STAGE, config_hash, inputs):
        log.info("evaluate: manifest matches under %s; skipping (use --force)", store.url(STAGE))
        return {"skipped": True, **store.manifest(STAGE).metrics}
    records = evaluate_tools(store, cfg)
    tables = markdown_tables(records, protocols(cfg))
    by_domain = evaluate_tools_by_domain(store, cfg)
    system, cal_records = "", []
    if scored is not None:
        users = store.read_table("prepare", "users", columns=["user_id", "n_train", "eh_bucket", "domain"])
        preds, queries = store.read_table("score", "predictions"), store.read_table("score", "queries")
        sys_records = system_records(preds, queries, users, cfg)
        by_domain += system_records_by_domain(preds, queries, users, cfg)
        cal_records = calibration_records(preds, queries, cfg)
        system = (
            system_markdown(sys_records)
            + guard_markdown(store)
            + "\n"
            + calibration_markdown(cal_records, preds.column_names)
        )
        records += sys_records + cal_records
    compared = ""
    if others:
        runs = [(cfg.run_name, run_line(store), records)]
        for name in others:
            ostore = open_store(_run_cfg(cfg, name))
            runs.append((name, run_line(ostore, _tools(store)), _read_records(ostore)))
        compared = comparison_markdown(runs) + "\n"
    domains, drops = sorted({split_domain_group(r["group"])[0] for r in by_domain}), []
    if by_domain:
        named = {
            d: (run, _read_records(open_store(_run_cfg(cfg, run))))
            for d, run in cfg.evaluate.domain_baselines.items()
            if run in baselines
        }
        drops = domain_drop_records(by_domain, named)
        missing = {d: cfg.evaluate.domain_baselines.get(d) for d in domains if d not in named}
        tables = (
            domain_drop_markdown(drops, cfg.run_name, missing)
            + "\n"
            + tables
            + "\n"
            + domain_markdown(by_domain, protocols(cfg))
        )
    with store.stage_writer(STAGE, config_hash, inputs) as w:
        every = records + by_domain + drops
        w.write_bytes("metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in every).encode())
        head = f"Split protocol: {protocol_line(prep)}\n\n"
        w.write_bytes("tools.md", (f"# Tool evaluation: run `{cfg.run_name}`\n\n" + head + compared + tables).encode())
        pngs = []
        if system:
            pngs = plots([r for r in records if r["model"] == "reasonrec"], w) + reliability_plot(cal_records, w)
            w.write_bytes(
                "report.md",
                (
                    f"# ReasonRec report: run `{cfg.run_name}`\n\n"
                    + head
                    + compared
                    + system
                    + "\n"
                    + "".join(f"![{p}]({p})\n" for p in pngs)
                    + "\n"
                    + tables
                ).encode(),
            )
        w.manifest.rows["metrics"] = len(every)
        summary = {
            "n_records": len(every),
            "seconds": round(time.time() - t0, 1),
            "report": store.url(STAGE, "report.md" if system else "tools.md"),
            "plots": pngs,
            "domains": domains,
        }
        w.manifest.metrics = summary
    summary["tables"] = system or tables
    return summary


def protocol_line(prep) -> str:
    """A run's split protocol in words, from its ``prepare`` summary (runs prepared before the
    switch existed used the random split), with the cut-off under the time shift."""
    if prep.metrics.get("split_protocol", "loo") != "timeshift":
        return (
            "random split (`data.split_protocol=loo`): each user's last interaction is the test item, "
            "the second last the valid item"
        )
    c = prep.metrics.get("timeshift_split", {})
    return (
        f"time shift (`data.split_protocol=timeshift`, paper Fig. A1) at ts={prep.metrics.get('timeshift_cutoff')}: "
        f"{TIMESHIFT_ITEM}; {c.get('users_tested', '?')} users tested. P5 bundles have no timestamps "
        "(ts = position): there it is a shift in position only"
    )


SCORE_MODES = {
    "routed": "the planner routes: its tools answer low risk, the fine-tuned VLM medium / high",
    "tools": "tools only: the planner's tool choice answers every query, no VLM",
    "vlm": "the fine-tuned VLM alone",
    "vlm_tools": "the fine-tuned VLM with tool answers on every query",
}


def run_line(store, tools: list[str] | None = None) -> str:
    """A run as the protocol comparison names it: its split protocol (:func:`protocol_line`), how
    its ``reasonrec`` rows were scored (``score.mode``) and, where they differ from ``tools`` (this
    run's), the tools it trained."""
    line = protocol_line(store.require("prepare"))
    scored = store.manifest("score")
    if scored is not None:
        mode = scored.metrics.get("mode", "routed")
        line += f"; `reasonrec` scored with `score.mode={mode}` ({SCORE_MODES.get(mode, mode)})"
    own = _tools(store)
    if tools is not None and sorted(own) != sorted(tools):
        line += f"; tools trained: {', '.join(own)} (not this run's set)"
    return line


def _tools(store) -> list[str]:
    return list(store.read_json("train_tools", "metrics.json").get("tools", []))


def _run_cfg(cfg: RunConfig, name: str) -> RunConfig:
    import copy

    other = copy.deepcopy(cfg)
    other.run_name = name
    return other


def _compared_runs(
    cfg: RunConfig, names: list[str] | None = None, key: str = "compare_with", required: bool = True
) -> dict:
    """The report manifests of ``evaluate.compare_with``'s runs (or of ``names``, the runs that
    ``evaluate.{key}`` names); each must be evaluated already (without ``required``, a run with no
    report is left out, with a warning)."""
    out = {}
    for name in cfg.evaluate.compare_with if names is None else names:
        m = open_store(_run_cfg(cfg, name)).manifest(STAGE)
        if m is None:
            if not required:
                log.warning("evaluate.%s: run %r has no report under %s yet", key, name, cfg.output_root)
                continue
            raise RuntimeError(f"evaluate.{key}: run {name!r} has no report under {cfg.output_root}")
        out[name] = m
    return out


def _read_records(store) -> list[dict]:
    with store.fs.open(store.path(STAGE, "metrics.jsonl"), "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args, cfg = parse_cli("Evaluate tools (and the system) on the test queries.", argv)
    s = run(cfg, force=args.force)
    if s.get("skipped"):
        print("evaluate: skipped (outputs up to date); report at", s.get("report"))
    else:
        print(s["tables"])
        print(f"report: {s['report']} ({s['n_records']} numbers in metrics.jsonl)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
