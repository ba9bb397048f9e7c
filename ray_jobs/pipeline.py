"""pipeline: run the stages in order, each skipped when its manifest matches.

    python -m ray_jobs.pipeline --config configs/quickstart.yaml [key=value ...] [--force]

Stages: prepare -> images -> train_tools -> build_instructions -> finetune -> score (runs the ``planner`` stage,
``ray_jobs.fit_planner``, first) -> evaluate. ``--force`` re-runs every stage.

With ``pipeline.timeshift_comparison`` the pipeline also runs the time-shift comparison (paper
Fig. A1) before ``evaluate``: a second run of the same world under ``data.split_protocol=timeshift``,
tools only (:func:`timeshift_config`: prepare -> train_tools -> score in ``score.mode=tools`` ->
evaluate, no instructions, no fine-tune), whose numbers this run's report then shows next to its
own (``evaluate.compare_with``). Its stages are cached like the main run's.
"""

from __future__ import annotations

import copy
import logging
import sys
import time

from ray_jobs import build_instructions, evaluate, finetune, images, prepare, score, train_tools
from reasonrec.config import RunConfig, parse_cli, validate

STAGES = (
    ("prepare", prepare),
    ("images", images),
    ("train_tools", train_tools),
    ("build_instructions", build_instructions),
    ("finetune", finetune),
    ("score", score),
    ("evaluate", evaluate),
)
# The time-shift run's stages: tools mode needs neither photos nor the VLM.
TIMESHIFT_STAGES = (("prepare", prepare), ("train_tools", train_tools), ("score", score), ("evaluate", evaluate))

log = logging.getLogger("reasonrec.pipeline")


def timeshift_config(cfg: RunConfig) -> RunConfig:
    """The time-shift run of ``cfg`` (``pipeline.timeshift_*``): the same world and settings under
    ``data.split_protocol=timeshift`` as run ``pipeline.timeshift_run_name`` (default
    ``<run_name>-timeshift``), its cut-off at ``pipeline.timeshift_quantile`` and its tools
    ``pipeline.timeshift_tools`` where set; scored with ``score.mode=tools`` (the planner's tool
    choice answers every query: no VLM, so no explanation queries) on the prepared test queries."""
    p = cfg.pipeline
    ts = copy.deepcopy(cfg)
    ts.run_name = p.timeshift_run_name or f"{cfg.run_name}-timeshift"
    ts.data.split_protocol = "timeshift"
    if p.timeshift_quantile is not None:
        ts.data.timeshift_quantile = p.timeshift_quantile
    if p.timeshift_tools:
        ts.tools.enabled = list(p.timeshift_tools)
    # Its evaluate reads the tools' test predictions only (the planner asks the tools live).
    ts.tools.predict_splits = ["test"]
    ts.score.mode = "tools"
    ts.score.tasks = [t for t in cfg.score.tasks if t != "explanation"]
    ts.score.queries_path = None
    ts.planner.vlm_aware = False  # applies to score.mode=routed only (the fit would warn)
    ts.evaluate.compare_with = []
    ts.pipeline.timeshift_comparison = False
    validate(ts)
    return ts


def with_comparison(cfg: RunConfig, ts: RunConfig) -> RunConfig:
    """``cfg`` whose evaluate also compares with the time-shift run ``ts``."""
    out = copy.deepcopy(cfg)
    if ts.run_name not in out.evaluate.compare_with:
        out.evaluate.compare_with = [*out.evaluate.compare_with, ts.run_name]
    return out


def _print_summary(name: str, stage, summary: dict) -> None:
    if name == "evaluate":
        if summary.get("skipped"):
            print(f"evaluate: skipped (outputs up to date); report at {summary.get('report')}")
        else:
            print(summary["tables"])
            print(f"report: {summary['report']}")
    else:
        print(stage.format_summary(summary))
    print()


def run_timeshift(cfg: RunConfig, force: bool = False) -> RunConfig:
    """Run the time-shift comparison's stages (:data:`TIMESHIFT_STAGES`) for ``cfg``; returns its config."""
    ts = timeshift_config(cfg)
    t0 = time.time()
    for name, stage in TIMESHIFT_STAGES:
        log.info("time-shift run %s: stage %s", ts.run_name, name)
        summary = stage.run(ts, force=force)
        if name != "evaluate":  # its tables are in the main report, side by side
            print(f"[time-shift run {ts.run_name}] " + stage.format_summary(summary))
    print(f"time-shift run {ts.run_name} finished in {time.time() - t0:.0f}s\n")
    return ts


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args, cfg = parse_cli("Run the ReasonRec pipeline end to end.", argv)
    t0 = time.time()
    timeshift = cfg.pipeline.timeshift_comparison and cfg.data.split_protocol != "timeshift"
    if cfg.pipeline.timeshift_comparison and not timeshift:
        log.info("pipeline.timeshift_comparison: this run is a time-shift run itself; no second run")
    for name, stage in STAGES:
        if name == "evaluate" and timeshift:
            cfg = with_comparison(cfg, run_timeshift(cfg, force=args.force))
        log.info("stage %s", name)
        _print_summary(name, stage, stage.run(cfg, force=args.force))
    print(f"pipeline finished in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
