"""score: the main job. Routes every query by risk tier and answers it (Ray Data actor pools).

    python -m ray_jobs.score --config configs/quickstart.yaml [key=value ...] [--force]

1. ``planner`` stage (skipped when up to date): the tools answer validation queries in an actor
   pool; the driver fits the per-task planners (tool choice + calibrated confidence, xgboost) on
   the small feature table and reports calibration on a held-out share.
2. Queries (the prepared ``score.split`` of each task in ``score.tasks``, or ``score.queries_path``)
   are cut into shards of ``score.shard_rows``, one Ray Data block each. A router actor pool
   (tools + planners, loaded once per actor) assigns tiers and answers low-risk queries; a VLM
   actor pool (the fine-tuned model, loaded once per actor, ``score.vlm_gpus`` each) answers
   medium and high risk only -- low-risk rows pass through it untouched, the VLM never sees them;
   each finished shard is written to a staging folder at once.
3. A re-run with the same config skips shards already written (kill it, run again: it resumes).
   At the end every query must be in exactly one output (predictions or rejected) -- checked --
   and the stage commits ``score/predictions/``, ``score/rejected/`` and ``summary.json``.

``score.mode`` runs the paper's baselines through the same code: ``tools`` (tools only), ``vlm``
(VLM alone), ``vlm_tools`` (VLM + tools always).
"""
from __future__ import annotations

import logging
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_jobs.common import arrow_blocks
from reasonrec.config import RunConfig, parse_cli, planner_warnings, section_hash
from reasonrec.data.schemas import QUERIES
from reasonrec.io import ArtifactStore, TMP_DIR, open_store

PLANNER_STAGE = "planner"
# Bump when the VLM-aware criterion changes, so fitted planners are refitted (2: CTR by AUC; 3: small buckets pooled).
VLM_RULE_VERSION = 3
log = logging.getLogger("reasonrec.score")
REJECTED = pa.schema([("query_id", pa.int64()), ("task", pa.string()), ("user_id", pa.int64()), ("error", pa.string())])


class QueryFileError(ValueError):
    """The query file is empty or malformed; the message names the offending row or column."""


# ------------------------------------------------------------------------------ actors
def _store(cfg: RunConfig) -> ArtifactStore:
    return open_store(cfg)


class _PlannerFeatures:
    """Validation queries -> planner features and per-tool usable labels."""

    def __init__(self, cfg: RunConfig):
        from reasonrec.context import load_context
        from reasonrec.planner import load_toolbox
        store = _store(cfg)
        self.cfg = cfg
        self.catalog, self.users, _ = load_context(store, cfg.vlm, cfg.data.eh_thresholds)
        self.toolbox = load_toolbox(store)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from reasonrec.planner import query_features
        rows = batch.to_pylist()
        out = []
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            groups.setdefault((r["task"], len(r["candidates"] or [])), []).append(r)
        for (task, _), sub in groups.items():
            st = [self.users.resolve(r["user_id"], None, "valid") for r in sub]
            users = np.array([s.user_id for s in st], np.int64)
            hists = [s.history for s in st]
            kw = {}
            if task == "direct":
                kw["candidates"] = np.array([r["candidates"] for r in sub], np.int64)
            if task == "ctr":
                kw["items"] = np.array([r["item_id"] for r in sub], np.int64)
            ans = self.toolbox.answer(task, users, hists, self.cfg.score.k, **kw)
            truth = np.array([r["label" if task == "ctr" else "target"] for r in sub])
            feats = query_features(ans, np.array([s.eh for s in st]), np.array([len(h) for h in hists]),
                                   self.catalog.popularity)
            ok = np.stack([ans.correct(n, truth, self.cfg.planner.correct_k) for n in ans.names], 1)
            for j, r in enumerate(sub):
                out.append({"query_id": r["query_id"], "task": task, "names": ans.names,
                            "features": feats[j].tolist(), "usable": ok[j].tolist()})
        return pa.Table.from_pylist(out)


class _Attempts:
    """Empty marker files under ``{staging}/_attempts/{run token}``: one per actor start and one
    per (shard, attempt) an actor begins. Ray restarts crashed actors and retries their batch
    without telling the driver; the markers let the job count both (restarts = starts beyond the
    pool size, retries = attempts beyond one per shard), on any store, from any node."""

    def __init__(self, url: str, storage: dict, kind: str):
        from reasonrec.config import StorageConfig
        from reasonrec.io import filesystem
        import uuid
        self.fs, self.root = filesystem(url, StorageConfig(**storage))
        self.kind, self.uuid = kind, uuid.uuid4().hex
        self.fs.makedirs(self.root, exist_ok=True)
        self.mark("actor")

    def mark(self, what: str) -> None:
        self.fs.pipe_file(f"{self.root}/{self.kind}-{what}-{self.uuid}-{time.time_ns()}", b"")

    def shard_started(self, batch: pa.Table) -> None:
        for s in pc.unique(batch.column("shard")).to_pylist():
            self.mark(f"shard{s:05d}")


def count_attempts(fs, root: str, pool_sizes: dict[str, int]) -> dict:
    """{"actor_restarts": {kind: n}, "batch_retries": {kind: n}} from the markers under ``root``."""
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)] if fs.exists(root) else []
    out: dict = {"actor_restarts": {}, "batch_retries": {}}
    for kind, size in pool_sizes.items():
        starts = sum(n.startswith(f"{kind}-actor-") for n in names)
        shards: dict[str, int] = {}
        for n in names:
            if n.startswith(f"{kind}-shard"):
                key = n.split("-")[1]
                shards[key] = shards.get(key, 0) + 1
        out["actor_restarts"][kind] = max(starts - size, 0)
        out["batch_retries"][kind] = sum(c - 1 for c in shards.values())
    return out


class _VLMCalibration:
    """Validation queries -> was the fine-tuned VLM, with the planner's chosen tools in its prompt
    (the strongest VLM path), right? Feeds the VLM-aware bypass (``planner.vlm_aware``)."""

    def __init__(self, cfg: RunConfig, planner_state: dict):
        from reasonrec.context import load_context
        from reasonrec.planner import TaskPlanner, load_toolbox
        from reasonrec.scoring import Router, build_vlm_answerer
        store = _store(cfg)
        catalog, users, _ = load_context(store, cfg.vlm, cfg.data.eh_thresholds)
        planners = {t: TaskPlanner.from_state(st, cfg.planner) for t, st in planner_state["tasks"].items()}
        self.router = Router(load_toolbox(store), planners, users, catalog, cfg.planner, cfg.score.k, "vlm_tools", "valid")
        self.answerer = build_vlm_answerer(cfg, store, "valid")
        self.correct_k = cfg.planner.correct_k

    def __call__(self, batch: pa.Table) -> pa.Table:
        routed = self.router(batch)
        scored = self.answerer(routed).to_pylist()
        # Ranking: was the truth in the VLM's top correct_k? CTR: the VLM's and the primary tool's
        # probabilities with the label (compared by AUC per bucket, TaskPlanner.set_vlm_auc).
        right = [q["task"] != "ctr" and q["target"] in (a["items"] or [])[: self.correct_k]
                 for q, a in zip(batch.to_pylist(), scored)]
        return pa.table({"task": batch.column("task"), "bucket": routed.column("eh_bucket"), "right": right,
                         "label": batch.column("label"), "vlm_prob": [a["prob"] for a in scored],
                         "tool_prob": routed.column("tool_prob")})


class _RouterActor:
    def __init__(self, cfg: RunConfig, split: str, attempts: str):
        from reasonrec.scoring import build_router
        self.attempts = _Attempts(attempts, _storage(cfg), "router")
        self.router = build_router(cfg, _store(cfg), split)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.attempts.shard_started(batch)
        shard = batch.column("shard")
        out = self.router(batch.drop_columns(["shard"]))
        return out.append_column("shard", shard)


class _VLMActor:
    def __init__(self, cfg: RunConfig, split: str, attempts: str):
        from reasonrec.scoring import build_vlm_answerer
        self.attempts = _Attempts(attempts, _storage(cfg), "vlm")
        self.answerer = build_vlm_answerer(cfg, _store(cfg), split)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.attempts.shard_started(batch)
        shard = batch.column("shard")
        return self.answerer(batch.drop_columns(["shard"])).append_column("shard", shard)


def _write_shard(batch: pa.Table, staging: str, storage: dict, expected: dict) -> pa.Table:
    """Write one whole shard (predictions + rejected) atomically: temp name, then rename."""
    from reasonrec.config import StorageConfig
    from reasonrec.io import arrow_filesystem, filesystem
    from reasonrec.data.schemas import PREDICTIONS
    shards = pc.unique(batch.column("shard")).to_pylist()
    fs, root = filesystem(staging, StorageConfig(**storage))
    afs = arrow_filesystem(fs)
    out = []
    for s in shards:
        part = batch.filter(pc.equal(batch.column("shard"), s)).drop_columns(["shard"])
        if part.num_rows != expected[str(s)]:
            # Ray Data split a shard across batches: writing it would lose rows on resume.
            raise RuntimeError(f"shard {s}: got {part.num_rows} of {expected[str(s)]} rows in one batch")
        bad = pc.is_valid(part.column("error"))
        good = part.filter(pc.invert(bad)).select([f.name for f in PREDICTIONS]).cast(PREDICTIONS)
        rej = part.filter(bad).select([f.name for f in REJECTED])
        for name, table in (("predictions", good), ("rejected", rej)):
            final = f"{root}/{name}/shard-{s:05d}.parquet"
            tmp = final + ".tmp"
            fs.makedirs(f"{root}/{name}", exist_ok=True)
            pq.write_table(table, tmp, filesystem=afs)
            fs.mv(tmp, final)
        out.append({"shard": s, "rows": part.num_rows, "rejected": rej.num_rows,
                    "vlm_calls": int(pc.sum(good.column("vlm_called")).as_py() or 0),
                    "low": int(pc.sum(pc.equal(good.column("route"), "low")).as_py() or 0)})
    return pa.Table.from_pylist(out)


# ------------------------------------------------------------------------------ queries
def load_query_file(url: str, store: ArtifactStore) -> pa.Table:
    """Read and check a query file: required columns present, no null ids, no duplicates."""
    from reasonrec.io import arrow_filesystem, filesystem
    fs, path = filesystem(url, store.storage)
    if not fs.exists(path):
        raise QueryFileError(f"query file not found: {url}")
    try:
        t = pq.read_table(path, filesystem=arrow_filesystem(fs))
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise QueryFileError(f"query file {url} is not readable Parquet: {exc}") from None
    if t.num_rows == 0:
        raise QueryFileError(f"query file {url} has no rows")
    missing = [c for c in ("query_id", "task", "user_id") if c not in t.column_names]
    if missing:
        raise QueryFileError(f"query file {url}: missing required column(s) {missing}")
    for c in ("query_id", "task", "user_id"):
        nulls = np.flatnonzero(t.column(c).is_null().to_numpy(zero_copy_only=False))
        if len(nulls):
            raise QueryFileError(f"query file {url}: row {int(nulls[0])} has a null '{c}'")
    for f in QUERIES:
        if f.name in t.column_names:
            try:
                t = t.set_column(t.column_names.index(f.name), f.name, t.column(f.name).cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise QueryFileError(f"query file {url}: column '{f.name}' must be {f.type}: {exc}") from None
    ids = t.column("query_id").to_numpy()
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = int(uniq[counts > 1][0])
        raise QueryFileError(f"query file {url}: query_id {dup} is not unique (rows "
                             f"{np.flatnonzero(ids == dup)[:3].tolist()})")
    from reasonrec.data.schemas import conform
    return conform(t, QUERIES)


def score_queries(cfg: RunConfig, store: ArtifactStore) -> pa.Table:
    if cfg.score.queries_path:
        return load_query_file(cfg.score.queries_path, store)
    from reasonrec.instructions import prepared_queries
    n_items = store.read_table("prepare", "items", columns=["item_id"]).num_rows
    tables = {n: store.read_table("prepare", n) for n in ("loo", "direct_candidates", "ctr", "explanation")}
    return pa.concat_tables([prepared_queries(tables, t, cfg.score.split, n_items, cfg.data.direct_negatives,
                                              cfg.seed, cfg.score.max_queries_per_task) for t in cfg.score.tasks])


# ------------------------------------------------------------------------------ planner
def fit_planner(cfg: RunConfig, force: bool = False) -> dict:
    ray = _init(cfg)
    from ray.data import ActorPoolStrategy

    from reasonrec.instructions import prepared_queries
    from reasonrec.planner import TaskPlanner
    from reasonrec.vlm.infer import expected_calibration_error

    store = _store(cfg)
    inputs = {"prepare": store.require("prepare").fingerprint, "train_tools": store.require("train_tools").fingerprint}
    pc_cfg = cfg.planner
    # Only what the fit uses: tier thresholds and buckets apply at scoring time, changing them
    # must not refit.
    fit_keys = {k: getattr(pc_cfg, k) for k in ("tool_choice", "max_tools", "correct_k", "confidence_rounds",
                                                 "max_fit_queries", "calibration_holdout", "seed", "vlm_aware",
                                                 "vlm_fit_queries", "guard_z")}
    if pc_cfg.vlm_aware:
        inputs["finetune"] = store.require("finetune").fingerprint
        fit_keys["vlm_rule"] = VLM_RULE_VERSION
    # The VLM learned from hints in the instructions' tool ranking: the fixed choice shows that
    # ranking (one order for training and scoring, not two fits of "usable rate" that can differ).
    trained_order: dict[str, list[str]] = {}
    if cfg.instructions.hint_order == "usable_rate":
        built = store.manifest("instructions")
        if built is not None:
            inputs["instructions"] = built.fingerprint
            trained_order = store.read_json("instructions", "summary.json").get("tool_ranking", {})
        else:
            log.warning("instructions.hint_order=usable_rate but no instructions stage: the fixed tool choice "
                        "ranks the tools by its own validation usable rate")
    chash = section_hash({"planner": fit_keys, "k": cfg.score.k, "neg": cfg.data.direct_negatives,
                          "tasks": [t for t in cfg.score.tasks if t != "explanation"]})
    if not force and store.is_done(PLANNER_STAGE, chash, inputs):
        return {"skipped": True, **store.manifest(PLANNER_STAGE).metrics}
    t0 = time.time()
    n_items = store.read_table("prepare", "items", columns=["item_id"]).num_rows
    tables = {n: store.read_table("prepare", n) for n in ("loo", "direct_candidates", "ctr")}
    tasks = [t for t in cfg.score.tasks if t != "explanation"]
    queries = pa.concat_tables([prepared_queries(tables, t, "valid", n_items, cfg.data.direct_negatives,
                                                 pc_cfg.seed, pc_cfg.max_fit_queries) for t in tasks])
    ds = ray.data.from_arrow(arrow_blocks(queries, cfg.score.tool_actors * 4)).map_batches(
        _PlannerFeatures, fn_constructor_kwargs={"cfg": cfg}, batch_format="pyarrow",
        batch_size=cfg.score.tool_batch_size, compute=ActorPoolStrategy(size=max(cfg.score.tool_actors, 1)),
        num_cpus=cfg.score.tool_cpus)
    feats = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("query_id")
    state, report, fixed, guard = {"tasks": {}}, {}, {}, {}
    for task in tasks:
        t = feats.filter(pc.equal(feats.column("task"), task))
        if t.num_rows == 0:
            continue
        names = t.column("names")[0].as_py()
        x = np.array(t.column("features").to_pylist(), np.float32)
        u = np.array(t.column("usable").to_pylist(), bool)
        hold = np.random.default_rng(pc_cfg.seed).random(len(x)) < pc_cfg.calibration_holdout
        fit_rows = ~hold if (~hold).sum() >= 10 else np.ones(len(x), bool)
        planner = TaskPlanner.fit(task, names, x[fit_rows], {n: u[fit_rows, i] for i, n in enumerate(names)}, pc_cfg,
                                  fixed_order=trained_order.get(task))
        if hold.any():
            choice = planner.choose(x[hold], truth_usable={n: u[hold, i] for i, n in enumerate(names)},
                                    keys=t.column("query_id").to_numpy()[hold])
            conf = planner.confidence(x[hold], choice)
            right = u[hold][np.arange(hold.sum()), choice[:, 0]]
            report[task] = {"holdout_rows": int(hold.sum()), "ece": expected_calibration_error(conf, right),
                            "brier": float(np.mean((conf - right) ** 2)), "mean_confidence": float(conf.mean()),
                            "primary_right_rate": float(right.mean())}
        state["tasks"][task] = planner.state()
        fixed[task] = [names[i] for i in planner.fixed_ranking()[:pc_cfg.max_tools]]
        if planner.guard is not None:
            guard[task] = planner.guard
            log.info("planner %s: %s choice (%s)", task, planner.guard["use"], planner.guard["why"])
    vlm_right = _fit_vlm_right(ray, cfg, queries, state) if pc_cfg.vlm_aware and state["tasks"] else {}
    with store.stage_writer(PLANNER_STAGE, chash, inputs) as w:
        w.write_json("planner.json", state)
        summary = {"calibration": report, "vlm_right": vlm_right, "fit_queries": feats.num_rows, "fixed_tools": fixed,
                   "guard": guard, "seconds": round(time.time() - t0, 1)}
        w.write_json("summary.json", summary)
        w.manifest.metrics = summary
    return summary


def _fit_vlm_right(ray, cfg: RunConfig, queries: pa.Table, state: dict) -> dict:
    """The VLM answers the first ``planner.vlm_fit_queries`` validation queries of each task; its
    hit rate per EH bucket (CTR: its AUC against the tool's) goes into each task's planner state
    (``vlm_right``)."""
    from ray.data import ActorPoolStrategy

    from reasonrec.planner import TaskPlanner
    n = cfg.planner.vlm_fit_queries
    sample = pa.concat_tables([queries.filter(pc.equal(queries.column("task"), t)).slice(0, n) for t in state["tasks"]])
    log.info("planner: the VLM answers %d validation queries for the VLM-aware bypass", sample.num_rows)
    ds = ray.data.from_arrow(sample).map_batches(
        _VLMCalibration, fn_constructor_kwargs={"cfg": cfg, "planner_state": state}, batch_format="pyarrow",
        batch_size=max(cfg.score.vlm_batch_size, 1) * 4, compute=ActorPoolStrategy(size=max(cfg.score.vlm_actors, 1)),
        num_cpus=cfg.score.vlm_cpus, num_gpus=cfg.score.vlm_gpus or None)
    got = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    report = {}
    for task in state["tasks"]:
        t = got.filter(pc.equal(got.column("task"), task))
        planner = TaskPlanner.from_state(state["tasks"][task], cfg.planner)
        buckets = t.column("bucket").to_pylist()
        report[task] = (planner.set_vlm_auc(buckets, t.column("label").to_pylist(), t.column("vlm_prob").to_pylist(),
                                            t.column("tool_prob").to_pylist()) if task == "ctr"
                        else planner.set_vlm_right(buckets, t.column("right").to_pylist()))
        state["tasks"][task] = planner.state()
    return report


# ------------------------------------------------------------------------------ driver
def _init(cfg: RunConfig):
    from reasonrec.runtime import init_ray
    return init_ray(cfg.ray)


def config_hash(cfg: RunConfig) -> str:
    s = cfg.score
    return section_hash({"score": [s.tasks, s.split, s.queries_path, s.max_queries_per_task, s.k, s.mode,
                                   s.shard_rows, s.stage_name], "planner": section_hash(cfg.planner), "seed": cfg.seed,
                         "prompt": [section_hash(cfg.instructions), cfg.vlm.max_history_items,
                                    cfg.vlm.max_history_photos, cfg.vlm.num_beams, cfg.vlm.thought_tool_sets]})


def _inputs(cfg: RunConfig, store: ArtifactStore) -> dict:
    inputs = {st: store.require(st).fingerprint for st in ("prepare", "train_tools", PLANNER_STAGE)}
    if cfg.score.mode != "tools" or "explanation" in cfg.score.tasks:
        inputs["finetune"] = store.require("finetune").fingerprint
    if cfg.score.queries_path:
        from reasonrec.io import file_fingerprint
        inputs["queries"] = file_fingerprint(cfg.score.queries_path, cfg.storage)
    return inputs


def staging_name(cfg: RunConfig, store: ArtifactStore) -> str:
    """Folder under ``{run}/_tmp`` holding finished shards; keyed by config and inputs, so a
    re-run of the same job finds them and a changed job starts afresh."""
    return f"{cfg.score.stage_name}-{section_hash({'c': config_hash(cfg), 'i': _inputs(cfg, store)})}"


def run(cfg: RunConfig, force: bool = False, refit_planner: bool | None = None) -> dict:
    """``force`` re-runs the scoring and, unless ``refit_planner`` says otherwise, the planner fit."""
    t0 = time.time()
    for warning in planner_warnings(cfg):
        log.warning("score: %s", warning)
    store = _store(cfg)
    planner_summary = fit_planner(cfg, force=force if refit_planner is None else refit_planner)
    stage = cfg.score.stage_name
    inputs = _inputs(cfg, store)
    needs_vlm = "finetune" in inputs
    chash = config_hash(cfg)
    if not force and store.is_done(stage, chash, inputs):
        log.info("score: manifest matches under %s; skipping (use --force to re-run)", store.url(stage))
        return {"skipped": True, **store.manifest(stage).metrics}
    ray = _init(cfg)
    from ray.data import ActorPoolStrategy

    queries = score_queries(cfg, store)
    n = queries.num_rows
    rows = max(cfg.score.shard_rows, 1)
    n_shards = -(-n // rows)
    stage_dir = staging_name(cfg, store)
    staging = store.url(TMP_DIR, stage_dir)
    if force and store.fs.exists(store.path(TMP_DIR, stage_dir)):
        store.fs.rm(store.path(TMP_DIR, stage_dir), recursive=True)
    done = set()
    pred_dir = store.path(TMP_DIR, stage_dir, "predictions")
    if store.fs.exists(pred_dir):
        done = {int(p.rsplit("-", 1)[1].split(".")[0]) for p in store.fs.ls(pred_dir, detail=False)
                if p.endswith(".parquet")}
    todo = [s for s in range(n_shards) if s not in done]
    log.info("score: %d queries in %d shards (%d already written, %d to go), mode=%s", n, n_shards,
             len(done), len(todo), cfg.score.mode)
    # Actor options passed through map_batches: a crashed actor restarts, its batch is retried.
    retries = {"max_restarts": cfg.score.max_task_retries, "max_task_retries": cfg.score.max_task_retries}
    import uuid
    attempts = f"{staging}/_attempts/{uuid.uuid4().hex[:12]}"   # this run's markers only
    pools = {"router": max(cfg.score.tool_actors, 1), **({"vlm": max(cfg.score.vlm_actors, 1)} if needs_vlm else {})}
    if todo:
        # Shards are contiguous row ranges: a zero-copy slice each (not a filter pass per shard).
        blocks = [queries.slice(s * rows, rows) for s in todo]
        blocks = [b.append_column("shard", pa.array(np.full(b.num_rows, s), pa.int64())) for s, b in zip(todo, blocks)]
        expected = {str(s): b.num_rows for s, b in zip(todo, blocks)}
        ds = ray.data.from_arrow(blocks).map_batches(
            _RouterActor, fn_constructor_kwargs={"cfg": cfg, "split": cfg.score.split, "attempts": attempts},
            batch_format="pyarrow",
            batch_size=None, compute=ActorPoolStrategy(size=max(cfg.score.tool_actors, 1)),
            num_cpus=cfg.score.tool_cpus, **retries)
        if needs_vlm:
            ds = ds.map_batches(
                _VLMActor, fn_constructor_kwargs={"cfg": cfg, "split": cfg.score.split, "attempts": attempts},
                batch_format="pyarrow",
                batch_size=None, compute=ActorPoolStrategy(size=max(cfg.score.vlm_actors, 1)),
                num_cpus=cfg.score.vlm_cpus, num_gpus=cfg.score.vlm_gpus or None, **retries)
        else:
            from reasonrec.scoring import passthrough
            ds = ds.map_batches(passthrough, batch_format="pyarrow", batch_size=None)
        ds = ds.map_batches(_write_shard, fn_kwargs={"staging": staging, "storage": _storage(cfg),
                                                     "expected": expected},
                            batch_format="pyarrow", batch_size=None, max_retries=cfg.score.max_task_retries,
                            # Writing a shard is I/O: with actor pools that reserve every CPU
                            # (fractional score.*_cpus) a 1-CPU write task would wait for the
                            # whole pool to finish, and no shard would be saved for resuming.
                            num_cpus=0.1)
        finished = 0
        for row in ds.iter_rows():
            finished += 1
            log.info("score: shard %d written (%d queries, %d low-risk, %d VLM calls, %d rejected) [%d/%d]",
                     row["shard"], row["rows"], row["low"], row["vlm_calls"], row["rejected"], finished, len(todo))

    # Every query exactly once across the shards, or the job fails before committing.
    preds = pq.read_table(store.path(TMP_DIR, stage_dir, "predictions"), filesystem=store.arrow_fs)
    rejected = pq.read_table(store.path(TMP_DIR, stage_dir, "rejected"), filesystem=store.arrow_fs, schema=REJECTED)
    got = np.concatenate([preds.column("query_id").to_numpy(), rejected.column("query_id").to_numpy()])
    if len(got) != n or len(np.unique(got)) != n or set(got.tolist()) != set(queries.column("query_id").to_pylist()):
        raise RuntimeError(f"score: {n} queries in, {preds.num_rows} predictions + {rejected.num_rows} rejected out "
                           f"({len(np.unique(got))} distinct): refusing to commit")
    summary = _summarize(preds, rejected, n, n_shards, len(done), time.time() - t0, cfg, planner_summary)
    summary.update(count_attempts(store.fs, store.path(TMP_DIR, stage_dir, "_attempts", attempts.rsplit("/", 1)[1]),
                                  pools if todo else {}))
    with store.stage_writer(stage, chash, inputs) as w:
        w.write_table("predictions/part-0.parquet", preds)
        w.write_table("rejected/part-0.parquet", rejected)
        w.write_table("queries/part-0.parquet", queries)
        w.write_json("summary.json", summary)
        w.manifest.rows = {"queries": n, "predictions": preds.num_rows, "rejected": rejected.num_rows}
        w.manifest.metrics = summary
    store.fs.rm(store.path(TMP_DIR, stage_dir), recursive=True)
    return summary


def _storage(cfg: RunConfig) -> dict:
    return {"s3_endpoint_url": cfg.storage.s3_endpoint_url, "s3_anon": cfg.storage.s3_anon}


def _summarize(preds: pa.Table, rejected: pa.Table, n: int, n_shards: int, resumed: int, seconds: float,
               cfg: RunConfig, planner_summary: dict) -> dict:
    routes = preds.column("route").to_pylist()
    tasks = preds.column("task").to_pylist()
    by_task: dict[str, dict[str, int]] = {}
    for t, r in zip(tasks, routes):
        by_task.setdefault(t, {"low": 0, "medium": 0, "high": 0})[r] += 1
    vlm_calls = int(pc.sum(preds.column("vlm_called")).as_py() or 0)
    return {"queries": n, "predictions": preds.num_rows, "rejected": rejected.num_rows, "shards": n_shards,
            "shards_resumed": resumed, "mode": cfg.score.mode, "routes": by_task, "vlm_calls": vlm_calls,
            "bypass_rate": (sum(r == "low" for r in routes) / len(routes)) if routes else 0.0,
            "cold_users": int(pc.sum(preds.column("cold_user")).as_py() or 0),
            "seconds": round(seconds, 1), "queries_per_s": round(n / max(seconds, 1e-9), 2),
            "planner_calibration": planner_summary.get("calibration", {}),
            "planner_guard": planner_summary.get("guard", {})}


def format_summary(s: dict) -> str:
    if s.get("skipped"):
        return "score: skipped (outputs up to date)"
    lines = [f"score ({s['mode']}): {s['queries']} queries -> {s['predictions']} predictions + {s['rejected']} "
             f"rejected in {s['seconds']:.0f}s ({s['queries_per_s']} q/s); VLM calls {s['vlm_calls']}; "
             f"bypass rate {s['bypass_rate']:.1%}; shards {s['shards']} ({s['shards_resumed']} resumed)"]
    restarts, retried = s.get("actor_restarts", {}), s.get("batch_retries", {})
    if any(restarts.values()) or any(retried.values()):
        lines.append(f"  crashed actors restarted by Ray: {restarts}; batches retried: {retried}")
    for t, r in s["routes"].items():
        lines.append(f"  {t:12s} low {r['low']:5d}  medium {r['medium']:5d}  high {r['high']:5d}")
    for t, g in s.get("planner_guard", {}).items():
        lines.append(f"  tool choice {t}: {g['use']}" + ("" if g["use"] == "learned" else f" ({g['fixed_tool']})")
                     + f": {g['why']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args, cfg = parse_cli("Score queries: route by risk tier, answer with tools or the VLM.", argv)
    try:
        print(format_summary(run(cfg, force=args.force)))
    except QueryFileError as exc:
        print(f"score: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
