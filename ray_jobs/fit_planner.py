"""fit_planner: the ``planner`` stage. Fits the per-task risk-aware planners (Ray Data actor pools).

    python -m ray_jobs.fit_planner --config configs/quickstart.yaml [key=value ...] [--force]

The tools answer validation queries (the prepared ``valid`` split of each task in ``score.tasks``
but explanation, hash-sampled to ``planner.max_fit_queries``) in an actor pool; the driver fits
the per-task planners (tool choice + calibrated confidence, xgboost) on the small feature table
and reports calibration on a held-out share (``planner.calibration_holdout``). With
``planner.vlm_aware`` and ``score.mode=routed`` (the one mode whose tiers use it) the fine-tuned
VLM then answers the first ``planner.vlm_fit_queries`` of each task in a second pool, and its
record per EH bucket goes into the planners' state; other modes skip that calibration and need no
``finetune`` stage for it.
Output: ``{run}/planner/planner.json`` and ``summary.json``. ``ray_jobs.score`` runs this stage
first (skipped when up to date).
"""

from __future__ import annotations

import logging
import sys
import time

import pyarrow as pa

from ray_jobs.common import arrow_blocks
from reasonrec.config import RunConfig, parse_cli, section_hash
from reasonrec.data.images import photo_inputs
from reasonrec.io import ArtifactStore, open_store
from reasonrec.planner import STAGE, VLM_RULE_VERSION, fit_tasks

log = logging.getLogger("reasonrec.fit_planner")
# The planner.* fields the fit uses: tier thresholds and buckets apply at scoring time, changing
# them must not refit.
FIT_KEYS = (
    "tool_choice",
    "max_tools",
    "correct_k",
    "confidence_rounds",
    "max_fit_queries",
    "calibration_holdout",
    "seed",
    "vlm_aware",
    "vlm_fit_queries",
    "guard_z",
    "fusion",
    "fusion_top_n",
    "fusion_rounds",
)


class _PlannerFeatures:
    """Validation queries -> planner features and per-tool usable labels."""

    def __init__(self, cfg: RunConfig):
        from reasonrec.data.catalog import load_context
        from reasonrec.planner import load_toolbox

        store = open_store(cfg)
        self.cfg = cfg
        self.catalog, self.users, _ = load_context(store, cfg.vlm, cfg.data.eh_thresholds)
        self.toolbox = load_toolbox(store)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from reasonrec.planner import feature_rows

        p = self.cfg.planner
        return feature_rows(
            batch.to_pylist(),
            self.toolbox,
            self.users,
            self.catalog,
            self.cfg.score.k,
            p.correct_k,
            p.fusion_top_n if p.fusion else 0,
        )


class _VLMCalibration:
    """Validation queries -> was the fine-tuned VLM, with the planner's chosen tools in its prompt
    (the strongest VLM path), right? Feeds the VLM-aware bypass (``planner.vlm_aware``)."""

    def __init__(self, cfg: RunConfig, planner_state: dict):
        from reasonrec.data.catalog import load_context
        from reasonrec.planner import TaskPlanner, load_toolbox
        from reasonrec.scoring import Router, build_vlm_answerer

        store = open_store(cfg)
        catalog, users, _ = load_context(store, cfg.vlm, cfg.data.eh_thresholds)
        planners = {t: TaskPlanner.from_state(st, cfg.planner) for t, st in planner_state["tasks"].items()}
        self.router = Router(
            load_toolbox(store), planners, users, catalog, cfg.planner, cfg.score.k, "vlm_tools", "valid"
        )
        self.answerer = build_vlm_answerer(cfg, store, "valid")
        self.correct_k = cfg.planner.correct_k

    def __call__(self, batch: pa.Table) -> pa.Table:
        from reasonrec.planner import vlm_right_rows

        routed = self.router(batch)
        return vlm_right_rows(batch, routed, self.answerer(routed).to_pylist(), self.correct_k)


def calibrates_vlm(cfg: RunConfig) -> bool:
    """Whether the fit measures the fine-tuned VLM on validation queries: ``planner.vlm_aware``
    with ``score.mode=routed``, the one mode whose tiers use that record (the others force a tier)."""
    return cfg.planner.vlm_aware and cfg.score.mode == "routed" and cfg.score.vlm_budget != 0


def vlm_calibration_skipped(cfg: RunConfig) -> str | None:
    """Why ``planner.vlm_aware`` is set but the fit skips the VLM calibration (None: it does not)."""
    if not cfg.planner.vlm_aware or calibrates_vlm(cfg):
        return None
    if cfg.score.vlm_budget == 0:
        return "score.vlm_budget=0: no query is answered by the VLM"
    return (
        f"score.mode={cfg.score.mode} never routes by the VLM's validation record "
        f"(planner.vlm_aware applies to score.mode=routed only)"
    )


def vlm_calibration_status(cfg: RunConfig) -> str:
    """One line for the summary and the log: does the fit measure the VLM, and if not, why."""
    if calibrates_vlm(cfg):
        return f"VLM calibration done (the VLM answers up to {cfg.planner.vlm_fit_queries} validation queries per task)"
    why = vlm_calibration_skipped(cfg)
    return f"VLM calibration skipped: {why}" if why else "VLM calibration off (planner.vlm_aware=false)"


def _as_routed(cfg: RunConfig) -> RunConfig:
    import dataclasses

    return dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, mode="routed"))


def config_hash(cfg: RunConfig) -> str:
    fit_keys = {k: getattr(cfg.planner, k) for k in FIT_KEYS}
    # vlm_aware as applied: a fit without the VLM hashes as one with planner.vlm_aware=false, so a
    # later routed run refits with it (the hash of a routed config is unchanged).
    fit_keys["vlm_aware"] = calibrates_vlm(cfg)
    if fit_keys["vlm_aware"]:
        fit_keys["vlm_rule"] = VLM_RULE_VERSION
    return section_hash(
        {"planner": fit_keys, "k": cfg.score.k, "neg": cfg.data.direct_negatives, "tasks": fit_tasks(cfg.score.tasks)}
    )


def _inputs(cfg: RunConfig, store: ArtifactStore) -> tuple[dict, dict[str, list[str]]]:
    """The stage's inputs, and the tool ranking the VLM's instructions showed (if the fixed choice uses it)."""
    inputs = {"prepare": store.require("prepare").fingerprint, "train_tools": store.require("train_tools").fingerprint}
    if calibrates_vlm(cfg):
        inputs.update(_vlm_inputs(store))
    # The VLM learned from hints in the instructions' tool ranking: the fixed choice shows that
    # ranking (one order for training and scoring, not two fits of "usable rate" that can differ).
    trained_order: dict[str, list[str]] = {}
    if cfg.instructions.hint_order == "usable_rate":
        built = store.manifest("instructions")
        if built is not None:
            inputs["instructions"] = built.fingerprint
            trained_order = store.read_json("instructions", "summary.json").get("tool_ranking", {})
        else:
            log.warning(
                "instructions.hint_order=usable_rate but no instructions stage: the fixed tool choice "
                "ranks the tools by its own validation usable rate"
            )
    return inputs, trained_order


def _vlm_inputs(store: ArtifactStore) -> dict[str, str]:
    return {"finetune": store.require("finetune").fingerprint, **photo_inputs(store)}  # the VLM sees the photos


def _routed_fit_current(cfg: RunConfig, store: ArtifactStore, inputs: dict[str, str]) -> bool:
    """A mode that skips the VLM calibration can keep the committed planner of the same config's
    routed run: it holds everything else (refitting would also invalidate the routed scores)."""
    if vlm_calibration_skipped(cfg) is None or store.manifest("finetune") is None:
        return False
    return store.is_done(STAGE, config_hash(_as_routed(cfg)), {**inputs, **_vlm_inputs(store)})


def run(cfg: RunConfig, force: bool = False) -> dict:
    from reasonrec.runtime import init_ray

    ray = init_ray(cfg.ray)
    from ray.data import ActorPoolStrategy

    from reasonrec.data.queries import prepared_queries
    from reasonrec.planner import fit_planners

    store = open_store(cfg)
    if vlm_calibration_skipped(cfg):
        log.info("planner: %s", vlm_calibration_status(cfg))
    inputs, trained_order = _inputs(cfg, store)
    chash = config_hash(cfg)
    if not force and store.is_done(STAGE, chash, inputs):
        return {"skipped": True, **store.manifest(STAGE).metrics}
    if not force and _routed_fit_current(cfg, store, inputs):
        log.info(
            "planner: keeping the routed run's planner (VLM-calibrated); score.mode=%s ignores its VLM record",
            cfg.score.mode,
        )
        return {"skipped": True, **store.manifest(STAGE).metrics}
    t0 = time.time()
    pc_cfg = cfg.planner
    n_items = store.read_table("prepare", "items", columns=["item_id"]).num_rows
    tables = {n: store.read_table("prepare", n) for n in ("loo", "direct_candidates", "ctr")}
    tasks = fit_tasks(cfg.score.tasks)
    queries = pa.concat_tables(
        [
            prepared_queries(
                tables, t, "valid", n_items, cfg.data.direct_negatives, pc_cfg.seed, pc_cfg.max_fit_queries
            )
            for t in tasks
        ]
    )
    ds = ray.data.from_arrow(arrow_blocks(queries, max(cfg.score.tool_actors, 1) * 4)).map_batches(
        _PlannerFeatures,
        fn_constructor_kwargs={"cfg": cfg},
        batch_format="pyarrow",
        batch_size=cfg.score.tool_batch_size,
        compute=ActorPoolStrategy(size=max(cfg.score.tool_actors, 1)),
        num_cpus=cfg.score.tool_cpus,
    )
    feats = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("query_id")
    state, report, fixed, guard = fit_planners(feats, tasks, pc_cfg, trained_order)
    for task, g in guard.items():
        log.info("planner %s: %s choice (%s)", task, g["use"], g["why"])
    vlm_right = _fit_vlm_right(ray, cfg, queries, state) if calibrates_vlm(cfg) and state["tasks"] else {}
    with store.stage_writer(STAGE, chash, inputs) as w:
        w.write_json("planner.json", state)
        summary = {
            "calibration": report,
            "vlm_right": vlm_right,
            "vlm_calibration": vlm_calibration_status(cfg),
            "fit_queries": feats.num_rows,
            "fixed_tools": fixed,
            "guard": guard,
            "seconds": round(time.time() - t0, 1),
        }
        w.write_json("summary.json", summary)
        w.manifest.metrics = summary
    return summary


def _fit_vlm_right(ray, cfg: RunConfig, queries: pa.Table, state: dict) -> dict:
    """The VLM answers the first ``planner.vlm_fit_queries`` validation queries of each task; its
    hit rate per EH bucket (CTR: its AUC against the tool's) goes into each task's planner state
    (``vlm_right``)."""
    from ray.data import ActorPoolStrategy

    from reasonrec.planner import set_vlm_right, vlm_fit_sample

    sample = vlm_fit_sample(queries, list(state["tasks"]), cfg.planner.vlm_fit_queries)
    log.info("planner: the VLM answers %d validation queries for the VLM-aware bypass", sample.num_rows)
    ds = ray.data.from_arrow(sample).map_batches(
        _VLMCalibration,
        fn_constructor_kwargs={"cfg": cfg, "planner_state": state},
        batch_format="pyarrow",
        batch_size=max(cfg.score.vlm_batch_size, 1) * 4,
        compute=ActorPoolStrategy(size=max(cfg.score.vlm_actors, 1)),
        num_cpus=cfg.score.vlm_cpus,
        num_gpus=cfg.score.vlm_gpus or None,
    )
    return set_vlm_right(state, pa.concat_tables(ray.get(ds.to_arrow_refs())), cfg.planner)


def format_summary(s: dict) -> str:
    if s.get("skipped"):
        return "fit_planner: skipped (outputs up to date)"
    lines = [f"fit_planner: {s['fit_queries']} validation queries in {s['seconds']:.0f}s"]
    for t, c in s["calibration"].items():
        lines.append(
            f"  {t:12s} held-out {c['holdout_rows']:5d}  ECE {c['ece']:.3f}  Brier {c['brier']:.3f}  "
            f"primary right {c['primary_right_rate']:.1%}"
        )
    for t, g in s.get("guard", {}).items():
        lines.append(f"  tool choice {t}: {g['use']}: {g['why']}")
    if "vlm_calibration" in s:
        lines.append(f"  {s['vlm_calibration']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args, cfg = parse_cli("Fit the per-task risk-aware planners (tool choice + calibrated confidence).", argv)
    print(format_summary(run(cfg, force=args.force)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
