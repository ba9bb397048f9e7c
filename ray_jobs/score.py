"""score: the main job. Routes every query by risk tier and answers it (Ray Data actor pools).

    python -m ray_jobs.score --config configs/quickstart.yaml [key=value ...] [--force]

1. ``planner`` stage (:mod:`ray_jobs.fit_planner`, skipped when up to date): the per-task
   planners (tool choice + calibrated confidence) are fitted on validation queries.
2. Queries (the prepared ``score.split`` of each task in ``score.tasks``, or ``score.queries_path``)
   are cut into shards of ``score.shard_rows`` by Ray tasks, once per staging folder
   (:mod:`ray_jobs.shards`: ``{staging}/queries/``; a query file is read and checked on the
   cluster a run of row groups at a time); the driver keeps only each shard's row count. A router
   actor pool (tools + planners, loaded once per actor) reads its shards, assigns tiers and
   answers low-risk queries; a VLM actor pool (the fine-tuned model, loaded once per actor,
   ``score.vlm_gpus`` each) answers medium and high risk only -- low-risk rows pass through it
   untouched, the VLM never sees them; each finished shard is written to the staging folder at once.
3. A re-run with the same config skips shards already written (kill it, run again: it resumes).
   At the end every query must be in exactly one output (predictions or rejected) -- checked on
   the ``query_id`` columns alone -- and the stage commits ``score/predictions/``,
   ``score/rejected/`` and ``score/queries/`` (one Parquet file per shard, copied from staging:
   the driver never holds the predictions, so its memory stays flat as the query count grows)
   and ``summary.json``.
   While shards finish, a progress line (queries done / total, q/s, ETA, VLM calls) is logged at
   least every ``score.progress_every_s``.

With a VLM budget (``score.vlm_budget`` >= 0) and a job that needs the VLM, it runs in two passes:
the router pool routes every shard and writes it to ``{staging}/routed/``; a Ray task ranks the
queries routed to the VLM by expected gain (:func:`reasonrec.scoring.select_for_vlm_budget`) and
writes the chosen ones once to ``{staging}/vlm_budget.parquet`` (a resumed run reuses it, so no
call is spent twice); then the VLM pool answers only those (each shard's reader takes its own from
that file), the others keep their tool's answer (``vlm_skipped``). Unlimited (-1, the default):
one pass, as above.

``score.mode`` runs the paper's baselines through the same code: ``tools`` (tools only), ``vlm``
(VLM alone), ``vlm_tools`` (VLM + tools always). ``tools`` without explanation in ``score.tasks``
needs no fine-tuned VLM: a run with only ``prepare`` and ``train_tools`` scores.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_jobs import fit_planner
from ray_jobs.shards import (
    check_shards,
    commit_shards,
    query_shards,
    read_query_shards,
    selected_per_shard,
    staging_fs,
    storage_dict,
    write_shard_file,
)
from reasonrec.config import RunConfig, parse_cli, planner_warnings, section_hash
from reasonrec.data.images import photo_inputs
from reasonrec.data.queries import QueryFileError, load_query_file, score_split_queries
from reasonrec.data.schemas import QUERIES
from reasonrec.io import STAGE_JOBS, TMP_DIR, ArtifactStore, MissingStage, open_store
from reasonrec.planner import STAGE as PLANNER_STAGE
from reasonrec.scoring import summarize

log = logging.getLogger("reasonrec.score")
REJECTED = pa.schema([("query_id", pa.int64()), ("task", pa.string()), ("user_id", pa.int64()), ("error", pa.string())])


# ------------------------------------------------------------------------------ actors
def _store(cfg: RunConfig) -> ArtifactStore:
    return open_store(cfg)


class _Attempts:
    """Empty marker files under ``{staging}/_attempts/{run token}``: one per actor start and one
    per (shard, attempt) an actor begins. Ray restarts crashed actors and retries their batch
    without telling the driver; the markers let the job count both (restarts = starts beyond the
    pool size, retries = attempts beyond one per shard), on any store, from any node."""

    def __init__(self, url: str, storage: dict, kind: str):
        import uuid

        from reasonrec.config import StorageConfig
        from reasonrec.io import filesystem

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


class _RouterActor:
    """Routes shards: each batch holds shard ids (column ``shard``) and the actor reads those
    query shards from ``{staging}/queries`` itself (:func:`ray_jobs.shards.read_query_shards`;
    a separate read step would be starved as a write step is, below). With ``write`` = (a writer:
    :func:`_write_routed` or :func:`_write_tools_shard`, its keyword arguments) it also writes
    each shard itself and returns the writer's summary row (used where no VLM step follows the
    routing): a separate write step would be an operator that Ray Data's resource budget starves
    while this pool holds the CPUs (on 2 CPUs nothing was written until every shard was routed,
    so a killed run resumed from nothing), and the routed rows would cross the object store for
    nothing."""

    def __init__(
        self, cfg: RunConfig, split: str, attempts: str, write: tuple[Callable, dict] | None = None, staging: str = ""
    ):
        from reasonrec.scoring import build_router

        self.attempts = _Attempts(attempts, storage_dict(cfg), "router")
        self.router = build_router(cfg, _store(cfg), split)
        self.write = write
        self.staging, self.storage = staging, storage_dict(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.attempts.shard_started(batch)
        batch = read_query_shards(batch, self.staging, self.storage)
        shard = batch.column("shard")
        out = self.router(batch.drop_columns(["shard"])).append_column("shard", shard)
        if self.write is None:
            return out
        writer, kwargs = self.write
        return writer(out, **kwargs)


class _VLMActor:
    def __init__(self, cfg: RunConfig, split: str, attempts: str):
        from reasonrec.scoring import build_vlm_answerer

        self.attempts = _Attempts(attempts, storage_dict(cfg), "vlm")
        self.answerer = build_vlm_answerer(cfg, _store(cfg), split)

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.attempts.shard_started(batch)
        shard = batch.column("shard")
        return self.answerer(batch.drop_columns(["shard"])).append_column("shard", shard)


def _shards_of(batch: pa.Table, staging: str, storage: dict, expected: dict):
    """(fs, arrow fs, root, [(shard, its rows without the shard column)]) of a batch, each shard
    checked whole."""
    fs, afs, root = staging_fs(staging, storage)
    parts = []
    for s in pc.unique(batch.column("shard")).to_pylist():
        part = batch.filter(pc.equal(batch.column("shard"), s)).drop_columns(["shard"])
        if part.num_rows != expected[str(s)]:
            # Ray Data split a shard across batches: writing it would lose rows on resume.
            raise RuntimeError(f"shard {s}: got {part.num_rows} of {expected[str(s)]} rows in one batch")
        parts.append((s, part))
    return fs, afs, root, parts


def _write_routed(batch: pa.Table, staging: str, storage: dict, expected: dict) -> pa.Table:
    """Budget pass 1: write one whole routed shard (``ROUTED`` rows) to ``{staging}/routed``."""
    fs, afs, root, parts = _shards_of(batch, staging, storage, expected)
    out = []
    for s, part in parts:
        write_shard_file(fs, afs, f"{root}/routed", s, part)
        low = int(pc.sum(pc.equal(part.column("route"), "low")).as_py() or 0)
        out.append({"shard": s, "rows": part.num_rows, "low": low})
    return pa.Table.from_pylist(out)


def _read_routed(batch: pa.Table, staging: str, storage: dict) -> pa.Table:
    """Budget pass 2: a batch of shard ids -> those shards' routed rows with the VLM budget
    applied (:func:`reasonrec.scoring.apply_vlm_budget`, the selected ids read here from
    ``{staging}/vlm_budget.parquet``), plus the shard column."""
    from reasonrec.scoring import apply_vlm_budget

    _, afs, root = staging_fs(staging, storage)
    chosen = pq.read_table(f"{root}/vlm_budget.parquet", columns=["query_id"], filesystem=afs).column(0)
    out = []
    for s in batch.column("shard").to_pylist():
        routed = pq.read_table(f"{root}/routed/shard-{s:05d}.parquet", filesystem=afs)
        mine = pc.filter(routed.column("query_id"), pc.is_in(routed.column("query_id"), value_set=chosen))
        routed = apply_vlm_budget(routed, frozenset(mine.to_pylist()))
        out.append(routed.append_column("shard", pa.array(np.full(routed.num_rows, s), pa.int64())))
    return pa.concat_tables(out)


_COUNTERS: dict = {}


def _count_written(good: pa.Table, rejected: int) -> None:
    """The batch job's Prometheus counters, recorded where a shard is written (a worker process;
    Ray exports ``ray.util.metrics`` from every node like Serve's, see docs/operations.md):
    ``reasonrec_batch_queries_total{task,tier}``, ``reasonrec_batch_vlm_calls_total{task}``,
    ``reasonrec_batch_rejected_total``. A retried shard counts again (counters count work done)."""
    if not _COUNTERS:
        from ray.util.metrics import Counter

        _COUNTERS["queries"] = Counter(
            "reasonrec_batch_queries",
            description="queries the batch job answered, by task and tier",
            tag_keys=("task", "tier"),
        )
        _COUNTERS["vlm"] = Counter(
            "reasonrec_batch_vlm_calls", description="VLM calls of the batch job, by task", tag_keys=("task",)
        )
        _COUNTERS["rejected"] = Counter("reasonrec_batch_rejected", description="queries the batch job rejected")
    counts = good.group_by(["task", "route"]).aggregate([("vlm_called", "sum"), ("vlm_called", "count")])
    for r in counts.to_pylist():
        _COUNTERS["queries"].inc(r["vlm_called_count"], tags={"task": r["task"], "tier": r["route"]})
        if r["vlm_called_sum"]:
            _COUNTERS["vlm"].inc(r["vlm_called_sum"], tags={"task": r["task"]})
    if rejected:
        _COUNTERS["rejected"].inc(rejected)


def _write_shard(batch: pa.Table, staging: str, storage: dict, expected: dict) -> pa.Table:
    """Write one whole shard (predictions + rejected) atomically: temp name, then rename. Its
    summary row names the node that wrote it (the summary's ``nodes``)."""
    import ray

    from reasonrec.data.schemas import PREDICTIONS

    fs, afs, root, parts = _shards_of(batch, staging, storage, expected)
    out = []
    for s, part in parts:
        bad = pc.is_valid(part.column("error"))
        good = part.filter(pc.invert(bad)).select([f.name for f in PREDICTIONS]).cast(PREDICTIONS)
        rej = part.filter(bad).select([f.name for f in REJECTED])
        # Rejected first: a shard whose predictions exist (what a resumed run looks for) is whole.
        for name, table in (("rejected", rej), ("predictions", good)):
            write_shard_file(fs, afs, f"{root}/{name}", s, table)
        _count_written(good, rej.num_rows)
        out.append(
            {
                "shard": s,
                "rows": part.num_rows,
                "rejected": rej.num_rows,
                "vlm_calls": int(pc.sum(good.column("vlm_called")).as_py() or 0),
                "low": int(pc.sum(pc.equal(good.column("route"), "low")).as_py() or 0),
                "node": ray.get_runtime_context().get_node_id(),
            }
        )
    return pa.Table.from_pylist(out)


def _write_tools_shard(batch: pa.Table, skip_vlm: bool, **write_kw) -> pa.Table:
    """Tools only: routed rows -> scored rows (:func:`reasonrec.scoring.passthrough`) -> a written shard."""
    from reasonrec.scoring import passthrough

    return _write_shard(passthrough(batch, skip_vlm=skip_vlm), **write_kw)


# ------------------------------------------------------------------------------ queries
def score_queries(cfg: RunConfig, store: ArtifactStore) -> pa.Table:
    """The job's whole query table, in this process (benchmarks and tests; the job itself cuts it
    into shards on the cluster, :func:`ray_jobs.shards.query_shards`)."""
    if cfg.score.queries_path:
        return load_query_file(cfg.score.queries_path, store)
    s = cfg.score
    return score_split_queries(store, s.tasks, s.split, cfg.data.direct_negatives, cfg.seed, s.max_queries_per_task)


# ------------------------------------------------------------------------------ driver
# score.tool_actors = 0 (auto): one router actor per this many shards to route, as many as the
# cluster's CPUs allow. Each actor loads every tool (10-25 s on 2 cores), which pays off over many
# shards only (BENCHMARKS.md: the 157 shards of Beauty's test set 1.7x faster with two actors on 2
# cores; the 51 of a 20k-user world no faster).
AUTO_SHARDS_PER_ROUTER = 100


def router_actors(requested: int, n_shards: int, cpus: float, tool_cpus: float, reserved_cpus: float = 0.0) -> int:
    """The router pool's size: ``requested`` (``score.tool_actors``) when set, else (0) one actor
    per :data:`AUTO_SHARDS_PER_ROUTER` shards, at most the cluster's ``cpus`` less
    ``reserved_cpus`` (a VLM pool running beside the routers) divided by ``tool_cpus``; at least 1."""
    if requested > 0:
        return requested
    fit = int((cpus - reserved_cpus) // tool_cpus) if tool_cpus > 0 else n_shards
    return max(1, min(fit, -(-n_shards // AUTO_SHARDS_PER_ROUTER)))


def _init(cfg: RunConfig):
    from reasonrec.runtime import init_ray

    return init_ray(cfg.ray)


def config_hash(cfg: RunConfig) -> str:
    s = cfg.score
    return section_hash(
        {
            "score": [
                s.tasks,
                s.split,
                s.queries_path,
                s.max_queries_per_task,
                s.k,
                s.mode,
                s.shard_rows,
                s.stage_name,
                # only when set: unlimited runs keep the hash they had before the budget existed
                *([s.vlm_budget] if s.vlm_budget >= 0 else []),
            ],
            "planner": section_hash(cfg.planner),
            "seed": cfg.seed,
            "prompt": [
                section_hash(cfg.instructions),
                cfg.vlm.max_history_items,
                cfg.vlm.max_history_photos,
                cfg.vlm.num_beams,
                cfg.vlm.thought_tool_sets,
                # only when set: runs without the pool keep the hash they had before it existed
                *([cfg.vlm.sequential_pool] if cfg.vlm.sequential_pool else []),
            ],
        }
    )


def needs_vlm(cfg: RunConfig) -> bool:
    """Whether the job answers any query with the fine-tuned VLM: every mode but ``tools``, and
    explanations (the VLM's alone) in any mode; never with a VLM budget of 0 (every query the
    planner routes to the VLM is answered by its tool, flagged ``vlm_skipped``)."""
    if cfg.score.vlm_budget == 0:
        return False
    return cfg.score.mode != "tools" or "explanation" in cfg.score.tasks


def require_vlm(cfg: RunConfig, store: ArtifactStore) -> None:
    """Fail before any work, naming the jobs to run, when the job needs the fine-tuned VLM and
    the run has no ``finetune`` stage."""
    if not needs_vlm(cfg) or store.manifest("finetune") is not None:
        return
    why = (
        f"score.mode={cfg.score.mode} answers queries with the fine-tuned VLM"
        if cfg.score.mode != "tools"
        else "explanation queries (in score.tasks) are answered by the fine-tuned VLM alone"
    )
    missing = [s for s in ("instructions", "finetune") if store.manifest(s) is None]
    jobs = " and then ".join(
        f"`python -m ray_jobs.{STAGE_JOBS.get(s, s)} --config <this config> [the same key=value ...]`" for s in missing
    )
    raise MissingStage(
        f"{why}, but stage 'finetune' has no committed output under {store.url()}: run {jobs} first, "
        f"or score with the tools alone (score.mode=tools, no explanation in score.tasks)"
    )


def _inputs(cfg: RunConfig, store: ArtifactStore) -> dict:
    inputs = {st: store.require(st).fingerprint for st in ("prepare", "train_tools", PLANNER_STAGE)}
    if needs_vlm(cfg):
        inputs["finetune"] = store.require("finetune").fingerprint
        inputs.update(photo_inputs(store))  # the VLM sees the photos
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
    require_vlm(cfg, store)
    planner_summary = fit_planner.run(cfg, force=force if refit_planner is None else refit_planner)
    stage = cfg.score.stage_name
    inputs = _inputs(cfg, store)
    with_vlm = "finetune" in inputs
    chash = config_hash(cfg)
    if not force and store.is_done(stage, chash, inputs):
        log.info("score: manifest matches under %s; skipping (use --force to re-run)", store.url(stage))
        return {"skipped": True, **store.manifest(stage).metrics}
    ray = _init(cfg)
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    stage_dir = staging_name(cfg, store)
    staging = store.url(TMP_DIR, stage_dir)
    if force and store.fs.exists(store.path(TMP_DIR, stage_dir)):
        store.fs.rm(store.path(TMP_DIR, stage_dir), recursive=True)
    # The driver keeps the shards' row counts only: the queries are cut, checked and read on the cluster.
    queries = query_shards(cfg, store, stage_dir)
    n, n_shards = queries.n, len(queries)
    pred_dir = store.path(TMP_DIR, stage_dir, "predictions")
    done = _written(store, pred_dir) & set(range(n_shards))
    todo = [s for s in range(n_shards) if s not in done]
    budget = cfg.score.vlm_budget
    budgeted = with_vlm and budget >= 0  # two passes: route all, choose the VLM's queries, answer
    log.info(
        "score: %d queries in %d shards (%d already written, %d to go), mode=%s%s",
        n,
        n_shards,
        len(done),
        len(todo),
        cfg.score.mode,
        f", VLM budget {budget}" if budgeted else "",
    )
    # Actor options passed through map_batches: a crashed actor restarts, its batch is retried.
    retries = {"max_restarts": cfg.score.max_task_retries, "max_task_retries": cfg.score.max_task_retries}
    import uuid

    attempts = f"{staging}/_attempts/{uuid.uuid4().hex[:12]}"  # this run's markers only
    pools: dict[str, int] = {}  # the actor pools this run started (for count_attempts)

    def rows_of(s: int) -> int:
        return queries.rows[s]

    def shard_ids_ds(shards: list[int]):
        # One block per shard holding its id alone: whoever takes the block reads the shard's file.
        return ray.data.from_arrow([pa.table({"shard": pa.array([s], pa.int64())}) for s in shards])

    def route(shards: list[int], write: tuple[Callable, dict] | None = None, reserved_cpus: float = 0.0):
        cpus = ray.cluster_resources().get("CPU", 1.0)
        size = router_actors(cfg.score.tool_actors, len(shards), cpus, cfg.score.tool_cpus, reserved_cpus)
        log.info("score: %d router actor(s) for %d shards", size, len(shards))
        pools["router"] = size
        return shard_ids_ds(shards).map_batches(
            _RouterActor,
            fn_constructor_kwargs={
                "cfg": cfg,
                "split": cfg.score.split,
                "attempts": attempts,
                "write": write,
                "staging": staging,
            },
            batch_format="pyarrow",
            batch_size=None,
            compute=ActorPoolStrategy(size=size),
            num_cpus=cfg.score.tool_cpus,
            **retries,
        )

    write_kw = {"staging": staging, "storage": storage_dict(cfg)}
    # The I/O steps (reading a routed shard, writing a finished one) ask for 0.1 CPU each, so Ray
    # Data would run up to 10 per free CPU, each in a worker process of its own that Ray starts
    # (about a second of CPU each) and stops again when idle; one more than the VLM actors keeps
    # every actor fed and written behind.
    io_tasks = TaskPoolStrategy(size=max(cfg.score.vlm_actors, 1) + 1)

    def write(ds, fn, expected: dict):
        return ds.map_batches(
            fn,
            fn_kwargs={**write_kw, "expected": expected},
            batch_format="pyarrow",
            batch_size=None,
            max_retries=cfg.score.max_task_retries,
            # Writing a shard is I/O: with actor pools that reserve every CPU
            # (fractional score.*_cpus) a 1-CPU write task would wait for the
            # whole pool to finish, and no shard would be saved for resuming.
            num_cpus=0.1,
            compute=io_tasks,
        )

    selected: list[int] = []  # budgeted: per shard, its queries the VLM answers (vlm_budget.parquet)
    nodes: dict[str, int] = {}  # node id -> shards this run wrote there
    if budgeted:
        routed_dir = store.path(TMP_DIR, stage_dir, "routed")
        unrouted = [s for s in range(n_shards) if s not in _written(store, routed_dir)]
        if unrouted:
            ds = route(unrouted, (_write_routed, {**write_kw, "expected": {str(s): rows_of(s) for s in unrouted}}))
            progress = Progress(sum(rows_of(s) for s in unrouted), cfg.score.progress_every_s, routing=True)
            try:
                for i, row in enumerate(ds.iter_rows(), 1):
                    log.info(
                        "score: shard %d routed (%d queries, %d low-risk) [%d/%d]",
                        row["shard"],
                        row["rows"],
                        row["low"],
                        i,
                        len(unrouted),
                    )
                    progress.add(row["rows"], 0)
            finally:
                progress.stop()
        _vlm_budget_selection(store, stage_dir, n_shards, budget)
        selected = selected_per_shard(cfg, store, stage_dir, n_shards)
    if todo:
        expected = {str(s): rows_of(s) for s in todo}
        if budgeted:
            # Each task reads its routed shard and the selection file itself (see _read_routed).
            ds = shard_ids_ds(todo).map_batches(
                _read_routed,
                fn_kwargs={"staging": staging, "storage": storage_dict(cfg)},
                batch_format="pyarrow",
                batch_size=None,
                max_retries=cfg.score.max_task_retries,
                num_cpus=0.1,
                compute=io_tasks,
            )
            use_vlm = any(selected[s] for s in todo)
        elif with_vlm:  # the VLM pool runs beside the routers: its CPUs are not theirs
            ds, use_vlm = route(todo, reserved_cpus=max(cfg.score.vlm_actors, 1) * cfg.score.vlm_cpus), True
        else:  # tools only: the router actors write their own shards (see _RouterActor)
            skip = cfg.score.vlm_budget == 0
            ds, use_vlm = route(todo, (_write_tools_shard, {**write_kw, "expected": expected, "skip_vlm": skip})), False
        if use_vlm:
            pools["vlm"] = max(cfg.score.vlm_actors, 1)
            ds = ds.map_batches(
                _VLMActor,
                fn_constructor_kwargs={"cfg": cfg, "split": cfg.score.split, "attempts": attempts},
                batch_format="pyarrow",
                batch_size=None,
                compute=ActorPoolStrategy(size=max(cfg.score.vlm_actors, 1)),
                num_cpus=cfg.score.vlm_cpus,
                num_gpus=cfg.score.vlm_gpus or None,
                **retries,
            )
            ds = write(ds, _write_shard, expected)
        elif budgeted:  # none of these shards' queries won a VLM call
            from reasonrec.scoring import passthrough

            ds = ds.map_batches(
                passthrough,
                fn_kwargs={"skip_vlm": cfg.score.vlm_budget == 0},
                batch_format="pyarrow",
                batch_size=None,
            )
            ds = write(ds, _write_shard, expected)
        finished = 0
        # Budget left = the budget less the calls already spent in written shards (the selected ones).
        spent = sum(selected[s] for s in done) if budgeted else 0
        progress = Progress(
            sum(expected.values()), cfg.score.progress_every_s, budget=budget - spent if budgeted else None
        )
        try:
            for row in ds.iter_rows():
                finished += 1
                nodes[row["node"]] = nodes.get(row["node"], 0) + 1
                log.info(
                    "score: shard %d written on node %s (%d queries, %d low-risk, %d VLM calls, %d rejected) [%d/%d]",
                    row["shard"],
                    row["node"][:8],
                    row["rows"],
                    row["low"],
                    row["vlm_calls"],
                    row["rejected"],
                    finished,
                    len(todo),
                )
                progress.add(row["rows"], row["vlm_calls"])
        finally:
            progress.stop()

    # Every query exactly once across the shards, or the job fails before committing: checked
    # shard by shard in Ray tasks on the query_id columns alone; the driver gets counts.
    from reasonrec.data.schemas import PREDICTIONS

    t_check = time.time()
    checked = check_shards(cfg, store, stage_dir, queries)
    log.info("score: every query exactly once (%d shards checked in %.1fs)", n_shards, time.time() - t_check)
    if checked["bad"] is not None:
        b = checked["bad"]
        raise RuntimeError(
            f"score: {n} queries in, {checked['predictions']} predictions + {checked['rejected']} rejected out; "
            f"shard {b['shard']}: {b['out']} rows out ({b['distinct']} distinct) for its {b['queries']} queries: "
            "refusing to commit"
        )
    summary = summarize(
        checked["counts"],
        checked["rejected"],
        n,
        n_shards,
        len(done),
        time.time() - t0,
        cfg.score.mode,
        planner_summary,
        budget,
    )
    summary.update(
        count_attempts(store.fs, store.path(TMP_DIR, stage_dir, "_attempts", attempts.rsplit("/", 1)[1]), pools)
    )
    summary["nodes"] = nodes
    with store.stage_writer(stage, chash, inputs) as w:
        # Multi-file tables, one file per shard, copied as written (readers read the folder).
        every = list(range(n_shards))
        commit_shards(store, w, "predictions", pred_dir, every, PREDICTIONS)
        commit_shards(store, w, "rejected", store.path(TMP_DIR, stage_dir, "rejected"), every, REJECTED)
        commit_shards(store, w, "queries", queries.folder, every, QUERIES)
        w.write_json("summary.json", summary)
        w.manifest.metrics = summary
    store.fs.rm(store.path(TMP_DIR, stage_dir), recursive=True)
    log.info("score: committed %s in %.1fs", store.url(stage), time.time() - t_check)
    return summary


def _written(store: ArtifactStore, folder: str) -> set[int]:
    """The shards written (``shard-XXXXX.parquet``, not a temp file) under ``folder``."""
    if not store.fs.exists(folder):
        return set()
    return {int(p.rsplit("-", 1)[1].split(".")[0]) for p in store.fs.ls(folder, detail=False) if p.endswith(".parquet")}


def _vlm_budget_selection(store: ArtifactStore, stage_dir: str, n_shards: int, budget: int) -> pa.Table:
    """The queries the VLM answers under ``budget`` (``BUDGET_SELECTION`` rows, at most ``budget``):
    chosen once from every routed shard's VLM-routed queries by expected gain, by a Ray task
    (:func:`_select_for_budget`: it reads the routed shards, the driver does not), and written to
    ``{staging}/vlm_budget.parquet``; a resumed run reads that file back instead (so it spends no
    call twice: the shards written before it left the same queries to the VLM)."""
    import ray

    path = store.path(TMP_DIR, stage_dir, "vlm_budget.parquet")
    if store.fs.exists(path):
        selection = pq.read_table(path, filesystem=store.arrow_fs)
        log.info("score: VLM budget %d: reusing the selection of %d queries in %s", budget, selection.num_rows, path)
        return selection
    wanted = ray.get(
        ray.remote(_select_for_budget).remote(
            store.url(TMP_DIR, stage_dir), store.storage, store.url(), n_shards, budget
        )
    )
    selection = pq.read_table(path, filesystem=store.arrow_fs)
    log.info(
        "score: VLM budget %d: %d of %d queries routed to the VLM get it (smallest gain %s); the rest keep "
        "their tool's answer",
        budget,
        selection.num_rows,
        wanted,
        f"{selection.column('gain')[-1].as_py():.3f}" if selection.num_rows else "-",
    )
    return selection


def _select_for_budget(staging: str, storage, run_url: str, n_shards: int, budget: int) -> int:
    """Ray task: :func:`reasonrec.scoring.select_for_vlm_budget` over the routed shards (their
    ``BUDGET_COLUMNS`` only), written atomically to ``{staging}/vlm_budget.parquet``; returns how
    many queries were routed to the VLM."""
    from pyarrow import dataset as pads

    from reasonrec.io import arrow_filesystem, filesystem
    from reasonrec.scoring import BUDGET_COLUMNS, VLM_TIERS, select_for_vlm_budget

    fs, root = filesystem(staging, storage)
    afs = arrow_filesystem(fs)
    files = [f"{root}/routed/shard-{s:05d}.parquet" for s in range(n_shards)]
    routed = pads.dataset(files, filesystem=afs, format="parquet").to_table(columns=BUDGET_COLUMNS)
    run_fs, run_root = filesystem(run_url, storage)
    with run_fs.open(f"{run_root}/{PLANNER_STAGE}/planner.json", "r") as f:
        tasks = json.load(f)["tasks"]
    selection = select_for_vlm_budget(routed, {t: st.get("vlm_right") or {} for t, st in tasks.items()}, budget)
    path = f"{root}/vlm_budget.parquet"
    pq.write_table(selection, path + ".tmp", filesystem=afs)
    fs.mv(path + ".tmp", path)
    return int(pc.sum(pc.is_in(routed.column("route"), pa.array(list(VLM_TIERS)))).as_py() or 0)


def progress_line(
    done: int, total: int, elapsed_s: float, vlm_calls: int | None, budget_left: int | None = None
) -> str:
    """``done`` of ``total`` queries after ``elapsed_s`` seconds -> one log line with q/s and ETA,
    the VLM calls so far (None: the routing pass of a budgeted run) and the VLM budget left
    (None: no budget)."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    eta = _duration((total - done) / rate) if rate > 0 else "?"
    share = done / total if total else 1.0
    return (
        f"score: {'routed ' if vlm_calls is None else ''}{done}/{total} queries ({share:.0%}) in "
        f"{_duration(elapsed_s)}, {rate:.2f} q/s, ETA {eta}"
        + ("" if vlm_calls is None else f"; VLM calls {vlm_calls}")
        + ("" if budget_left is None else f", VLM budget left {budget_left}")
    )


def _duration(seconds: float) -> str:
    s = max(int(round(seconds)), 0)
    h, m = s // 3600, s // 60 % 60
    return f"{h}h{m:02d}m{s % 60:02d}s" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


class Progress:
    """Logs :func:`progress_line` at least every ``every_s`` seconds (0: never) while shards
    finish: :meth:`add` (a shard done) logs when that much time passed since the last line, and a
    daemon thread logs when no shard finished for that long (a shard may take longer). Call
    :meth:`stop` when done. ``budget``: the VLM budget left at the start (None: no budget);
    ``routing``: the routing pass of a budgeted run (no VLM calls to count)."""

    def __init__(self, total: int, every_s: float, budget: int | None = None, routing: bool = False):
        self.total, self.every_s, self.budget, self.routing = total, every_s, budget, routing
        self.done = self.vlm_calls = 0
        self.t0 = self.last = time.monotonic()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = None
        if every_s > 0:
            self._thread = threading.Thread(target=self._tick, name="score-progress", daemon=True)
            self._thread.start()

    def add(self, rows: int, vlm_calls: int) -> None:
        with self._lock:
            self.done += rows
            self.vlm_calls += vlm_calls
        if self.every_s > 0:
            self._maybe_log()

    def _maybe_log(self) -> float:
        """Log if ``every_s`` passed since the last line; return the seconds until the next is due."""
        with self._lock:
            now = time.monotonic()
            wait = self.last + self.every_s - now
            if wait > 0:
                return wait
            self.last = now
            line = progress_line(
                self.done,
                self.total,
                now - self.t0,
                None if self.routing else self.vlm_calls,
                None if self.budget is None else self.budget - self.vlm_calls,
            )
        log.info("%s", line)
        return self.every_s

    def _tick(self) -> None:
        wait = self.every_s
        while not self._stopped.wait(wait):
            wait = self._maybe_log()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def format_summary(s: dict) -> str:
    if s.get("skipped"):
        return "score: skipped (outputs up to date)"
    lines = [
        f"score ({s['mode']}): {s['queries']} queries -> {s['predictions']} predictions + {s['rejected']} "
        f"rejected in {s['seconds']:.0f}s ({s['queries_per_s']} q/s); VLM calls {s['vlm_calls']}"
        + (
            f" (budget {s['vlm_budget']}; {s.get('vlm_skipped', 0)} VLM-routed queries kept their tool's answer)"
            if s.get("vlm_budget", -1) >= 0
            else ""
        )
        + f"; bypass rate {s['bypass_rate']:.1%}; shards {s['shards']} ({s['shards_resumed']} resumed)"
        + (f" written on {len(s['nodes'])} nodes" if len(s.get("nodes", {})) > 1 else "")
    ]
    restarts, retried = s.get("actor_restarts", {}), s.get("batch_retries", {})
    if any(restarts.values()) or any(retried.values()):
        lines.append(f"  crashed actors restarted by Ray: {restarts}; batches retried: {retried}")
    for t, r in s["routes"].items():
        lines.append(f"  {t:12s} low {r['low']:5d}  medium {r['medium']:5d}  high {r['high']:5d}")
    for t, g in s.get("planner_guard", {}).items():
        lines.append(
            f"  tool choice {t}: {g['use']}"
            + (f" ({g['fixed_tool']})" if g["use"] == "fixed" else "")
            + f": {g['why']}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args, cfg = parse_cli("Score queries: route by risk tier, answer with tools or the VLM.", argv)
    try:
        print(format_summary(run(cfg, force=args.force)))
    except QueryFileError as exc:
        print(f"score: {exc}", file=sys.stderr)
        return 2
    except MissingStage as exc:
        print(f"score: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
