"""build_instructions: reasoning-aware instruction examples for the VLM fine-tune (Ray Data).

    python -m ray_jobs.build_instructions --config configs/quickstart.yaml [key=value ...] [--force]

For every task in ``instructions.tasks`` and split in ``instructions.splits`` the prepared queries
(hash-sampled to ``instructions.max_examples_per_task``) stream through an actor pool that loads
the trained tools once per actor and labels each query (usable tools, hints, reference answer
right or not); the calibrated confidence table is fitted on the validation rows; a second actor
pool renders prompts and chain-of-thought targets. Output: ``{run}/instructions/examples/``
(schema ``INSTRUCTIONS``; photos referenced by item id) and ``summary.json``.
"""

from __future__ import annotations

import logging
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc

from ray_jobs.common import arrow_blocks, write_dataset
from reasonrec.config import RunConfig, parse_cli, section_hash
from reasonrec.data.images import photo_inputs
from reasonrec.data.schemas import INSTRUCTIONS
from reasonrec.io import open_store

STAGE = "instructions"
log = logging.getLogger("reasonrec.build_instructions")


class _Context:
    """Per actor: the run's catalog, users, prompt builder and (optionally) tools, loaded once."""

    def __init__(self, cfg: RunConfig, with_tools: bool):
        from reasonrec.data.catalog import load_context
        from reasonrec.planner import load_toolbox
        from reasonrec.prompts.templates import TemplateSampler

        self.cfg = cfg
        self.store = store = open_store(cfg)
        ic = cfg.instructions
        sampler = TemplateSampler(ic.template_mixture, ic.single_template, ic.seed)
        self.catalog, self.users, self.prompts = load_context(
            store, cfg.vlm, cfg.data.eh_thresholds, sampler, ic.prompt_candidates
        )
        self.toolbox = load_toolbox(store) if with_tools else None


class _Labeler(_Context):
    def __init__(self, cfg: RunConfig, holdout_items: int):
        from reasonrec.planner import load_toolbox

        super().__init__(cfg, with_tools=True)
        self.holdout_items = holdout_items
        self.holdout = load_toolbox(self.store, holdout=True) if holdout_items else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from reasonrec.instructions import label_batch

        parts = []
        for split in pc.unique(batch.column("split")).to_pylist():
            sub = batch.filter(pc.equal(batch.column("split"), split)).drop_columns(["split"])
            parts.append(
                label_batch(
                    sub,
                    split,
                    self.toolbox,
                    self.users,
                    self.catalog,
                    self.cfg.instructions,
                    self.holdout,
                    self.holdout_items,
                )
            )
        return pa.concat_tables(parts)


class _Renderer(_Context):
    def __init__(self, cfg: RunConfig, conf: dict, tool_rank: dict, hint_keep: dict):
        super().__init__(cfg, with_tools=False)
        self.conf, self.tool_rank, self.hint_keep = conf, tool_rank, hint_keep

    def __call__(self, batch: pa.Table) -> pa.Table:
        from reasonrec.instructions import render_batch

        return render_batch(
            batch,
            self.conf,
            self.prompts,
            self.users,
            self.catalog,
            self.cfg.instructions,
            self.tool_rank,
            self.hint_keep,
        )


def config_hash(cfg: RunConfig) -> str:
    v = cfg.vlm
    return section_hash(
        {
            "instructions": section_hash(cfg.instructions),
            "direct_negatives": cfg.data.direct_negatives,
            "render": [v.max_history_items, v.max_history_photos, v.max_candidate_photos],
            "eh_thresholds": list(cfg.data.eh_thresholds),
        }
    )


def run(cfg: RunConfig, force: bool = False) -> dict:
    from reasonrec.runtime import init_ray

    t0 = time.time()
    store = open_store(cfg)
    inputs = {
        "prepare": store.require("prepare").fingerprint,
        "train_tools": store.require("train_tools").fingerprint,
        **photo_inputs(store),
    }  # which items show a photo changes the prompts
    chash = config_hash(cfg)
    if not force and store.is_done(STAGE, chash, inputs):
        log.info("instructions: manifest matches under %s; skipping (use --force to re-run)", store.url(STAGE))
        return {"skipped": True, **store.manifest(STAGE).metrics}
    ray = init_ray(cfg.ray)
    from ray.data import ActorPoolStrategy

    from reasonrec.data.queries import prepared_queries
    from reasonrec.instructions import confidence_table, hint_keep_rates, tool_ranking

    ic = cfg.instructions
    n_items = store.read_table("prepare", "items", columns=["item_id"]).num_rows
    tables = {n: store.read_table("prepare", n) for n in ("loo", "direct_candidates", "ctr", "explanation")}
    # Several domains: training direct lists draw negatives within the user's domain, as prepare's do.
    domain_starts = store.manifest("prepare").metrics.get("domain_item_starts", [])
    blocks = []
    for task in ic.tasks:
        for split in ic.splits:
            q = prepared_queries(
                tables,
                task,
                split,
                n_items,
                cfg.data.direct_negatives,
                ic.seed,
                ic.max_examples_per_task,
                ic.train_prefixes,
                domain_starts,
            )
            blocks.append(q.append_column("split", pa.array([split] * q.num_rows, pa.string())))
    queries = pa.concat_tables(blocks)
    del tables
    log.info(
        "instructions: labelling %d queries with the tools (%s)", queries.num_rows, ", ".join(f"{t}" for t in ic.tasks)
    )
    # What train_tools actually held out (a skipped stage may predate this run's overrides).
    holdout = store.read_json("train_tools", "metrics.json").get("holdout_items", 0)
    pool = ActorPoolStrategy(size=max(cfg.score.tool_actors, 1))
    labeled = (
        ray.data.from_arrow(arrow_blocks(queries, max(cfg.score.tool_actors, 1) * 4))
        .map_batches(
            _Labeler,
            fn_constructor_kwargs={"cfg": cfg, "holdout_items": holdout},
            batch_format="pyarrow",
            batch_size=cfg.score.tool_batch_size,
            compute=pool,
        )
        .materialize()
    )
    # Six small columns per query: the only data the driver collects.
    stats = pa.concat_tables(
        ray.get(
            labeled.select_columns(["task", "split", "eh_bucket", "len_bin", "ref_right", "usable"]).to_arrow_refs()
        )
    )
    fit = stats.filter(pc.equal(stats.column("split"), "valid"))
    fit = fit if fit.num_rows else stats
    conf = confidence_table(*(fit.column(c).to_pylist() for c in ("task", "eh_bucket", "len_bin", "ref_right")))
    tool_rank = tool_ranking(fit.column("task").to_pylist(), fit.column("usable").to_pylist(), ic.tool_order)
    unknown = sorted(set(ic.tool_order) - {n for names in tool_rank.values() for n in names})
    if unknown:
        raise ValueError(
            f"instructions.tool_order names {unknown}, which no task's ranking holds "
            f"(tools right on at least one validation query): {tool_rank}"
        )
    hint_keep = hint_keep_rates(*(stats.column(c).to_pylist() for c in ("task", "split", "usable")))
    if ic.hint_calibration:
        log.info(
            "instructions: hint calibration keeps these shares of each tool's right training answers: %s",
            {t: {n: round(k, 3) for n, k in v.items()} for t, v in hint_keep.items()},
        )
    examples = labeled.map_batches(
        _Renderer,
        fn_constructor_kwargs={"cfg": cfg, "conf": conf, "tool_rank": tool_rank, "hint_keep": hint_keep},
        batch_format="pyarrow",
        batch_size=cfg.score.tool_batch_size,
        compute=pool,
    )
    with store.stage_writer(STAGE, chash, inputs) as w:
        rows = write_dataset(examples, w, store, "examples", INSTRUCTIONS)
        counts = {}
        for t, s in zip(stats.column("task").to_pylist(), stats.column("split").to_pylist()):
            counts[f"{t}/{s}"] = counts.get(f"{t}/{s}", 0) + 1
        summary = {
            "examples": rows,
            "by_task_split": counts,
            "hints_holdout_items": holdout,
            "confidence_table": conf,
            "tool_ranking": tool_rank,
            "hint_keep": hint_keep,
            "seconds": round(time.time() - t0, 1),
        }
        w.write_json("summary.json", summary)
        w.manifest.metrics = {
            k: v for k, v in summary.items() if k not in ("confidence_table", "tool_ranking", "hint_keep")
        }
    return summary


def format_summary(s: dict) -> str:
    if s.get("skipped"):
        return "build_instructions: skipped (outputs up to date)"
    lines = [f"build_instructions: {s['examples']} examples in {s['seconds']:.0f}s"]
    lines += [f"  {k:24s} {v}" for k, v in sorted(s["by_task_split"].items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args, cfg = parse_cli("Build the reasoning-aware instruction examples.", argv)
    print(format_summary(run(cfg, force=args.force)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
