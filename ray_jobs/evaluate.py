"""evaluate: metrics tables for the tools (and later the whole system) on the test queries.

    python -m ray_jobs.evaluate --config configs/quickstart.yaml [key=value ...] [--force]

Orchestration only: the protocols, segments, records and tables are ``reasonrec.evaluation``
(Ray-free). Every metric is reported overall and per EH bucket and cold-start group under the
protocol stated next to it. Writes ``{run}/report/``: ``metrics.jsonl`` (one JSON object per
number: task, model, protocol, metric, k, group, value, n), ``tools.md`` (readable tables) and,
once ``score`` has run, ``report.md`` with the system tables and PNG plots.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from reasonrec.config import RunConfig, parse_cli, section_hash
from reasonrec.evaluation import (
    KS,
    evaluate_tools,
    guard_markdown,
    markdown_tables,
    plots,
    protocols,
    system_markdown,
    system_records,
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
    config_hash = section_hash({"data": prep.config_hash, "ks": list(KS)})
    if not force and store.is_done(STAGE, config_hash, inputs):
        log.info("evaluate: manifest matches under %s; skipping (use --force)", store.url(STAGE))
        return {"skipped": True, **store.manifest(STAGE).metrics}
    records = evaluate_tools(store, cfg)
    tables = markdown_tables(records, protocols(cfg))
    system = ""
    if scored is not None:
        users = store.read_table("prepare", "users", columns=["user_id", "n_train", "eh_bucket"])
        sys_records = system_records(
            store.read_table("score", "predictions"), store.read_table("score", "queries"), users, cfg
        )
        system = system_markdown(sys_records) + guard_markdown(store)
        records += sys_records
    with store.stage_writer(STAGE, config_hash, inputs) as w:
        w.write_bytes("metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
        w.write_bytes("tools.md", (f"# Tool evaluation: run `{cfg.run_name}`\n\n" + tables).encode())
        pngs = []
        if system:
            pngs = plots([r for r in records if r["model"] == "reasonrec"], w)
            w.write_bytes(
                "report.md",
                (
                    f"# ReasonRec report: run `{cfg.run_name}`\n\n"
                    + system
                    + "\n"
                    + "".join(f"![{p}]({p})\n" for p in pngs)
                    + "\n"
                    + tables
                ).encode(),
            )
        w.manifest.rows["metrics"] = len(records)
        summary = {
            "n_records": len(records),
            "seconds": round(time.time() - t0, 1),
            "report": store.url(STAGE, "report.md" if system else "tools.md"),
            "plots": pngs,
        }
        w.manifest.metrics = summary
    summary["tables"] = system or tables
    return summary


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
