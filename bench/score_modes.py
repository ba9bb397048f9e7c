"""Routed scoring vs the paper's baselines, measured in one run on the same queries.

    python -m bench.score_modes --config configs/quickstart.yaml [key=value ...] [--variants a,b,...]

Needs a run whose stages up to ``finetune`` are done (``python -m ray_jobs.pipeline``). Each
variant is one ``ray_jobs.score`` run written to its own stage (``bench_<variant>``) and scored by
``reasonrec.evaluation.system_records``:

* ``routed``      the planner decides (learned tool choice)         -- ReasonRec
* ``paper_rule``  routed, tiers from the paper's rule only (no VLM-aware bypass; same planner fit)
* ``tools``       tools only (the primary tool answers everything)  -- tool-only baseline
* ``vlm``         the VLM alone for every query                     -- VLM-only baseline
* ``vlm_tools``   the VLM consults the chosen tools for every query -- VLM + tools always
* ``vlm_tools_mixed``: vlm_tools, sequential ranked as a mixture over the 3 likeliest values of
  the thought's tool field (``vlm.thought_tool_sets=3``) instead of under the greedy thought
* ``vlm_tools_wide_beam``: vlm_tools with 120 beams, one query per VLM batch (bounds the beams'
  KV cache): exhaustive on the 120-item synthetic catalog (live prefixes never outnumber items),
  so against ``vlm_tools`` it measures what the default beam search loses there
* ``random`` / ``oracle`` / ``fixed``: routed with that tool choice (paper Table A4)
* ``routed_8shards`` / ``routed_8shards_2actors``: routed in 8 shards with 1 or 2 router and VLM actors
  (pool scaling); ``routed_8shards_2actors_half_cpu``: 2 + 2 actors reserving 0.5 CPU each

Prints one Markdown table (queries/s, VLM calls, wall time, HR@5 / NDCG@5 sequential, HR@5
direct, AUC CTR, ROUGE-L explanation, bypass rate) and writes it with the raw numbers to
``{run}/bench_score_modes.json``.
"""

from __future__ import annotations

import json
import time

from bench.report import markdown_table, system_metric, variant_args
from ray_jobs import fit_planner, score
from reasonrec import evaluation
from reasonrec.config import load_config
from reasonrec.io import open_store

VARIANTS = {
    "routed": [],
    "paper_rule": ["planner.vlm_margin=2"],  # the VLM-aware bypass can never fire: the paper's rule
    "tools": ["score.mode=tools"],
    "vlm": ["score.mode=vlm"],
    "vlm_tools": ["score.mode=vlm_tools"],
    "vlm_tools_mixed": ["score.mode=vlm_tools", "vlm.thought_tool_sets=3"],
    "vlm_tools_wide_beam": ["score.mode=vlm_tools", "vlm.num_beams=120", "score.vlm_batch_size=1"],
    "random": ["planner.tool_choice=random"],
    "oracle": ["planner.tool_choice=oracle"],
    "fixed": ["planner.tool_choice=fixed"],
    # Pool scaling: the same routed job cut into 8 shards (one block each) so that two actors
    # have work to share; 1 vs 2 router and VLM actors.
    "routed_8shards": ["score.shard_rows=40"],
    "routed_8shards_2actors": ["score.shard_rows=40", "score.tool_actors=2", "score.vlm_actors=2"],
    # ... and with half a CPU reserved per actor, so both 2-actor pools fit on 2 CPUs at once.
    "routed_8shards_2actors_half_cpu": [
        "score.shard_rows=40",
        "score.tool_actors=2",
        "score.vlm_actors=2",
        "score.tool_cpus=0.5",
        "score.vlm_cpus=0.5",
    ],
}


def main() -> None:
    a = variant_args(VARIANTS)
    rows = []
    for name in a.variants.split(","):
        extra = VARIANTS[name]
        cfg = load_config(a.config, list(a.overrides) + extra + [f"score.stage_name=bench_{name}"])
        store = open_store(cfg)
        # Fit (or find) the planner outside the timer: tool_choice is part of the fit, so the
        # strategy variants each fit their own; the scoring timed below does not include it.
        fit_planner.run(cfg)
        t0 = time.time()
        s = score.run(cfg, force=True, refit_planner=False)
        wall = time.time() - t0
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
                "queries": s["queries"],
                "wall_s": round(wall, 1),
                "queries_per_s": round(s["queries"] / wall, 2),
                "vlm_calls": s["vlm_calls"],
                "bypass_rate": round(s["bypass_rate"], 3),
                "seq_hr5": system_metric(recs, "sequential", "hr", 5),
                "seq_ndcg5": system_metric(recs, "sequential", "ndcg", 5),
                "direct_hr5": system_metric(recs, "direct", "hr", 5),
                "ctr_auc": system_metric(recs, "ctr", "auc"),
                "expl_rouge_l": system_metric(recs, "explanation", "rouge_l"),
                "routes": s["routes"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    cols = [
        "variant",
        "queries",
        "wall_s",
        "queries_per_s",
        "vlm_calls",
        "bypass_rate",
        "seq_hr5",
        "seq_ndcg5",
        "direct_hr5",
        "ctr_auc",
        "expl_rouge_l",
    ]
    table = markdown_table(rows, cols, raw=("wall_s", "queries_per_s", "bypass_rate"))
    print(table)
    with store.fs.open(store.path("bench_score_modes.json"), "w") as f:
        json.dump({"rows": rows, "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
