"""pipeline: run the stages in order, each skipped when its manifest matches.

    python -m ray_jobs.pipeline --config configs/quickstart.yaml [key=value ...] [--force]

Stages: prepare -> images -> train_tools -> build_instructions -> finetune -> score (runs the ``planner`` stage,
``ray_jobs.fit_planner``, first) -> evaluate. ``--force`` re-runs every stage.
"""

from __future__ import annotations

import logging
import sys
import time

from ray_jobs import build_instructions, evaluate, finetune, images, prepare, score, train_tools
from reasonrec.config import parse_cli

STAGES = (
    ("prepare", prepare),
    ("images", images),
    ("train_tools", train_tools),
    ("build_instructions", build_instructions),
    ("finetune", finetune),
    ("score", score),
    ("evaluate", evaluate),
)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args, cfg = parse_cli("Run the ReasonRec pipeline end to end.", argv)
    t0 = time.time()
    for name, stage in STAGES:
        logging.getLogger("reasonrec.pipeline").info("stage %s", name)
        summary = stage.run(cfg, force=args.force)
        if name == "evaluate":
            if summary.get("skipped"):
                print(f"evaluate: skipped (outputs up to date); report at {summary.get('report')}")
            else:
                print(summary["tables"])
                print(f"report: {summary['report']}")
        else:
            print(stage.format_summary(summary))
        print()
    print(f"pipeline finished in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
