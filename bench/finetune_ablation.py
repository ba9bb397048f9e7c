"""Curriculum vs uniform sampling, template mixture vs one template: the paper's Figure 5
ablations, each fine-tuned on the same budget and scored on the same queries.

    python -m bench.finetune_ablation --config configs/quickstart.yaml [key=value ...] [--variants a,b,...]

Needs a run whose ``prepare`` and ``train_tools`` stages are done (``python -m ray_jobs.pipeline``).
Each variant gets its own run ``{run_name}-ablation-{variant}`` that starts from a copy of those two
stages, then runs ``build_instructions`` -> ``finetune`` -> ``score`` with ``score.mode=vlm`` (the
VLM answers every query, so the numbers measure the fine-tuned model, not the router) and is
scored by ``reasonrec.evaluation.system_records``:

* ``curriculum``      the preset as configured (EH curriculum, ten-template mixture)
* ``uniform``         ``curriculum.enabled=false``: uniform sampling over all examples
* ``single_template`` ``instructions.template_mixture=false``: every example in template 0

Prints one Markdown table (validation loss, sequential HR@5 / NDCG@5 for all and high-EH users,
direct HR@5, CTR AUC, explanation ROUGE-L, fine-tune wall time) and writes it with the raw numbers
to ``{run}/bench_finetune_ablation.json`` (with the overrides; each variant's row also to its own run).
"""

from __future__ import annotations

import json
import time

from bench.report import markdown_table, system_metric, variant_args
from ray_jobs import build_instructions, finetune, score
from reasonrec import evaluation
from reasonrec.config import load_config
from reasonrec.io import open_store

VARIANTS = {
    "curriculum": [],
    "uniform": ["curriculum.enabled=false"],
    "single_template": ["instructions.template_mixture=false"],
}
SHARED_STAGES = ("prepare", "train_tools")  # identical for every variant: copied, not re-run
# The VLM answers everything; the VLM-aware planner would only add a calibration pass.
SCORING = ["score.mode=vlm", "planner.vlm_aware=false", "score.count_flops=false"]


def main() -> None:
    a = variant_args(VARIANTS)
    base_cfg = load_config(a.config, list(a.overrides))
    base = open_store(base_cfg)
    for stage in SHARED_STAGES:
        base.require(stage)
    rows = []
    for name in a.variants.split(","):
        run_name = f"{base_cfg.run_name}-ablation-{name}"
        cfg = load_config(a.config, list(a.overrides) + VARIANTS[name] + SCORING + [f"run_name={run_name}"])
        store = open_store(cfg)
        for stage in SHARED_STAGES:
            if store.manifest(stage) is None:
                store.fs.copy(base.path(stage), store.path(stage), recursive=True)
        t0 = time.time()
        inst = build_instructions.run(cfg)
        ft = finetune.run(cfg)
        ft_wall = time.time() - t0
        s = score.run(cfg)
        users = store.read_table("prepare", "users", columns=["user_id", "n_train", "eh_bucket"])
        recs = evaluation.system_records(
            store.read_table(cfg.score.stage_name, "predictions"),
            store.read_table(cfg.score.stage_name, "queries"),
            users,
            cfg,
        )
        rows.append(
            {
                "variant": name,
                "examples": inst.get("examples"),
                "steps": ft.get("steps"),
                "valid_loss": ft.get("valid_loss"),
                "build_and_finetune_s": round(ft_wall, 1),
                "queries": s["queries"],
                "seq_hr5": system_metric(recs, "sequential", "hr", 5),
                "seq_ndcg5": system_metric(recs, "sequential", "ndcg", 5),
                "seq_hr5_eh_high": system_metric(recs, "sequential", "hr", 5, "eh:high"),
                "direct_hr5": system_metric(recs, "direct", "hr", 5),
                "ctr_auc": system_metric(recs, "ctr", "auc"),
                "expl_rouge_l": system_metric(recs, "explanation", "rouge_l"),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        # Each variant's own row stays with its run: a later command with other variants or
        # overrides rewrites the base run's table below, not this.
        with store.fs.open(store.path("bench_finetune_ablation.json"), "w") as f:
            json.dump({"row": rows[-1], "overrides": list(a.overrides)}, f, indent=2)
    table = markdown_table(rows, list(rows[0]), raw=("build_and_finetune_s",))
    print(table)
    with base.fs.open(base.path("bench_finetune_ablation.json"), "w") as f:
        json.dump({"rows": rows, "table": table, "overrides": list(a.overrides)}, f, indent=2)


if __name__ == "__main__":
    main()
