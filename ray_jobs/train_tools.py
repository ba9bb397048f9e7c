"""train_tools: train the tool repository on Ray Train, then write every tool's predictions.

    python -m ray_jobs.train_tools --config configs/quickstart.yaml [key=value ...] [--force]

All enabled tools train one after another inside ONE Ray Train ``TorchTrainer`` run
(``ScalingConfig(num_workers, use_gpu)`` from ``tools.*``), so the worker-group start-up is paid
once, not once per tool. Torch tools are data-parallel (DDP; TorchRec DMP for DLRM/DCNv2) when
``num_workers > 1``. Every finished tool, and mid-tool at most every ``tools.checkpoint_every_s``
seconds (at an epoch end), reports through ``ray.train.report`` with a checkpoint holding the
finished tools, the current tool and its epoch: a killed run started again with the same
config resumes from the latest checkpoint (Ray Train restores a run with the same name and
storage path), skipping finished tools and finished epochs.

Outputs under ``{run}/train_tools/``: ``tools/<name>/`` (config.json + weights.safetensors),
``predictions/`` (ranking tools: top-K, confidence, target ranks per user x split),
``ctr_predictions/`` (CTR tools on the CTR valid/test rows), ``metrics.json`` (validation).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_jobs.common import write_dataset
from reasonrec.config import RunConfig, parse_cli, section_hash
from reasonrec.io import ArtifactStore, open_store
from reasonrec.runtime import init_ray
from reasonrec.tools.predict import CTR_PREDICTIONS, PREDICTIONS

STAGE = "train_tools"
HOLDOUT = "holdout"  # tools/holdout/<name>: ranking tools trained without each user's last items
log = logging.getLogger("reasonrec.train_tools")


# ------------------------------------------------------------------------- Ray Train worker
def _train_loop(config: dict) -> None:
    """Runs on every Ray Train worker: train each tool in order, checkpointing through Ray Train."""
    import ray.train
    from ray.train import Checkpoint

    from reasonrec.config import StorageConfig
    from reasonrec.tools import tool_class
    from reasonrec.tools.data import hold_out_last, load_tool_data
    from reasonrec.tools.persist import load_tool, save_tool

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    store = ArtifactStore(config["output_root"], config["run_name"], StorageConfig(**config["storage"]))
    data = load_tool_data(store)
    held_out = hold_out_last(data, config["holdout_items"]) if config["holdout_items"] else None
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()

    state = tempfile.mkdtemp(prefix="tools-state-")
    progress = {"done": {}, "current": None, "epoch": -1, "resumes": []}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            shutil.copytree(d, state, dirs_exist_ok=True)
        with open(os.path.join(state, "progress.json")) as f:
            progress = json.load(f)
        log.info(
            "resuming: done=%s current=%s epoch=%s", list(progress["done"]), progress["current"], progress["epoch"]
        )
        progress["resumes"].append(
            {"done": list(progress["done"]), "current": progress["current"], "next_epoch": progress["epoch"] + 1}
        )

    def report(metrics: dict, tool=None) -> None:
        # Every worker must call report; rank 0 attaches the checkpoint.
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                shutil.copytree(state, d, dirs_exist_ok=True)
                if tool is not None:
                    try:
                        save_tool(tool, os.path.join(d, "current"))
                    except RuntimeError:
                        # Not saveable mid-fit (e.g. xgboost before its booster exists): a
                        # resume restarts this tool from scratch; finished tools are kept.
                        shutil.rmtree(os.path.join(d, "current"), ignore_errors=True)
                with open(os.path.join(d, "progress.json"), "w") as f:
                    json.dump(progress, f)
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)

    last_checkpoint = [time.time()]

    def checkpoint_due() -> bool:
        """Time for a mid-tool checkpoint? Rank 0 decides for all ranks (every rank must call
        ray.train.report at the same epochs, and clocks differ)."""
        due = time.time() - last_checkpoint[0] >= config["checkpoint_every_s"]
        if world > 1:
            import torch.distributed as dist

            box = [due]
            dist.broadcast_object_list(box, src=0)
            due = box[0]
        if due:
            last_checkpoint[0] = time.time()
        return due

    for name in config["names"]:
        if name in progress["done"]:
            continue
        t0 = time.time()
        start_epoch = 0
        # "holdout/<tool>": the same tool trained without each user's last holdout_items items.
        kind = name.removeprefix(HOLDOUT + "/")
        if progress["current"] == name and os.path.exists(os.path.join(state, "current", "config.json")):
            tool = load_tool(os.path.join(state, "current"))
            start_epoch = progress["epoch"] + 1
        else:
            tool = tool_class(kind)(config["params"].get(kind) or {})
        progress["current"] = name

        def reporter(epoch: int, metrics: dict, tool=tool, name=name) -> None:
            progress["epoch"] = epoch
            if not checkpoint_due():
                return
            report(
                {
                    "tool": name,
                    "epoch": epoch,
                    **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                },
                tool,
            )

        metrics = tool.fit(held_out if kind != name else data, reporter=reporter, start_epoch=start_epoch)
        metrics = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
        metrics["train_seconds"] = round(time.time() - t0, 2)
        if rank == 0:
            save_tool(tool, os.path.join(state, "done", name))
            shutil.rmtree(os.path.join(state, "current"), ignore_errors=True)
        progress["done"][name] = metrics
        progress["current"], progress["epoch"] = None, -1
        log.info("tool %s trained in %.1fs: %s", name, metrics["train_seconds"], metrics)
        report({"tool": name, "epoch": -1, "finished": 1.0})
        last_checkpoint[0] = time.time()


# ------------------------------------------------------------------- prediction actors
class _RankingPredictor:
    """Ray Data actor: loads every tool once, writes ranking predictions for batches of LOO rows."""

    def __init__(self, tools_dir: str, storage: dict, names: list[str], k: int, candidates_url: str, splits: list[str]):
        from reasonrec.config import StorageConfig
        from reasonrec.io import arrow_filesystem, filesystem
        from reasonrec.tools.persist import load_tool

        st = StorageConfig(**storage)
        self.tools = {}
        for n in names:
            self.tools[n] = load_tool(f"{tools_dir}/{n}", st, members=self.tools)
        self.k, self.splits = k, tuple(splits)
        fs, path = filesystem(candidates_url, st)
        import pyarrow.parquet as pq

        cands = pq.read_table(path, filesystem=arrow_filesystem(fs))
        self.candidates = {
            (int(u), s): np.asarray(c, np.int64)
            for u, s, c in zip(
                cands.column("user_id").to_pylist(),
                cands.column("split").to_pylist(),
                cands.column("candidates").to_pylist(),
            )
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        from reasonrec.tools.predict import ranking_predictions

        return ranking_predictions(self.tools, batch, self.k, self.candidates, self.splits)


class _CTRPredictor:
    def __init__(self, tools_dir: str, storage: dict, names: list[str], loo_url: str):
        import pyarrow.parquet as pq

        from reasonrec.config import StorageConfig
        from reasonrec.io import arrow_filesystem, filesystem
        from reasonrec.tools.persist import load_tool

        st = StorageConfig(**storage)
        self.tools = {}
        for n in names:
            self.tools[n] = load_tool(f"{tools_dir}/{n}", st, members=self.tools)
        fs, path = filesystem(loo_url, st)
        loo = pq.read_table(path, filesystem=arrow_filesystem(fs), columns=["user_id", "train_items", "valid_item"])
        self.hist = {
            int(u): (np.asarray(h, np.int64), v)
            for u, h, v in zip(
                loo.column("user_id").to_pylist(),
                loo.column("train_items").to_pylist(),
                loo.column("valid_item").to_pylist(),
            )
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        from reasonrec.tools.predict import ctr_predictions

        return ctr_predictions(self.tools, batch, self.hist)


# ------------------------------------------------------------------------------ driver
def _tool_order(names: list[str], ensemble: bool) -> list[str]:
    from reasonrec.tools import tool_class

    for n in names:
        tool_class(n)  # unknown names fail here, before any cluster work
    return list(names) + (["ensemble"] if ensemble and "ensemble" not in names and len(names) > 1 else [])


def holdout_names(trained: list[str], holdout_items: int) -> list[str]:
    """``holdout/<name>`` for every trained ranking tool when ``holdout_items`` > 0."""
    from reasonrec.tools import tool_class

    if not holdout_items:
        return []
    return [f"{HOLDOUT}/{n}" for n in trained if {"sequential", "direct"} & set(tool_class(n).tasks)]


def run(cfg: RunConfig, force: bool = False) -> dict:
    ray = init_ray(cfg.ray)
    from ray.data import ActorPoolStrategy
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    t_start = time.time()
    store = open_store(cfg)
    prep = store.require("prepare")
    names = _tool_order(list(cfg.tools.enabled), cfg.tools.ensemble)
    tc = cfg.tools
    # What the trained weights depend on names the Ray Train run (so a changed prediction or
    # checkpoint setting resumes the finished training instead of redoing it); the stage's hash
    # adds what the written predictions depend on.
    train_hash = section_hash(
        {
            "enabled": list(tc.enabled),
            "params": tc.params,
            "ensemble": tc.ensemble,
            "num_workers": tc.num_workers,
            "use_gpu": tc.use_gpu,
            "data": prep.config_hash,
            **({"holdout_items": tc.holdout_items} if tc.holdout_items else {}),
        }
    )
    # The prediction schemas are hashed too: a new prediction column re-writes the predictions.
    config_hash = section_hash(
        {
            "train": train_hash,
            "k": tc.prediction_k,
            "splits": list(tc.predict_splits),
            "columns": [f.name for f in PREDICTIONS] + [f.name for f in CTR_PREDICTIONS],
        }
    )
    inputs = {"prepare": prep.fingerprint}
    if not force and store.is_done(STAGE, config_hash, inputs):
        log.info("train_tools: manifest matches under %s; skipping (use --force to re-run)", store.url(STAGE))
        return {"skipped": True, **store.manifest(STAGE).metrics}

    trained = [n for n in names if n != "ensemble"]
    held_out = holdout_names(trained, tc.holdout_items)
    params = {n: dict(cfg.tools.params.get(n, {})) for n in names}
    if "ensemble" in names:
        params["ensemble"] = {"members": trained, **params.get("ensemble", {})}
    storage_dict = {"s3_endpoint_url": cfg.storage.s3_endpoint_url, "s3_anon": cfg.storage.s3_anon}
    train_cfg = {
        "output_root": cfg.output_root,
        "run_name": cfg.run_name,
        "storage": storage_dict,
        "names": trained + held_out,
        "params": params,
        "checkpoint_every_s": cfg.tools.checkpoint_every_s,
        "holdout_items": tc.holdout_items,
    }
    # Ray Train keeps its checkpoints next to the run (same name -> a restarted job resumes).
    storage_path = store.url("_ray_train") if store.scheme else store.path("_ray_train")
    train_name = f"train_tools-{train_hash}"
    if force and store.fs.exists(store.path("_ray_train", train_name)):
        store.fs.rm(store.path("_ray_train", train_name), recursive=True)  # --force: no resume
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=train_cfg,
        scaling_config=ScalingConfig(
            num_workers=cfg.tools.num_workers,
            use_gpu=cfg.tools.use_gpu,
            resources_per_worker={"CPU": cfg.tools.cpus_per_worker},
        ),
        run_config=TrainRunConfig(
            name=train_name,
            storage_path=storage_path,
            storage_filesystem=None if not store.scheme else store.arrow_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=cfg.tools.max_failures),
        ),
    )
    log.info(
        "training %d tools on Ray Train (%d worker(s), gpu=%s): %s",
        len(trained) + len(held_out),
        cfg.tools.num_workers,
        cfg.tools.use_gpu,
        ", ".join(trained + held_out),
    )
    result = trainer.fit()

    with store.stage_writer(STAGE, config_hash, inputs) as w:
        with result.checkpoint.as_directory() as d:
            with open(os.path.join(d, "progress.json")) as f:
                progress = json.load(f)
            for n in trained + held_out:
                src = os.path.join(d, "done", n)
                for fname in os.listdir(src):
                    with open(os.path.join(src, fname), "rb") as f:
                        w.write_bytes(f"tools/{n}/{fname}", f.read())
        tools_url = w.url("tools")
        if "ensemble" in names:
            from reasonrec.tools import tool_class
            from reasonrec.tools.persist import load_tool, save_tool

            members = {n: load_tool(f"{tools_url}/{n}", cfg.storage) for n in trained}
            save_tool(tool_class("ensemble")(params["ensemble"], members=members), f"{tools_url}/ensemble", cfg.storage)

        # Inputs are read and split into blocks before the actor pools start: an actor pool as
        # large as the cluster would otherwise hold every CPU while the read task waits for one
        # (seen on 2 CPUs with predict_actors=2), and one block would feed only one actor.
        blocks = max(4 * cfg.tools.predict_actors, 1)
        loo = (
            ray.data.read_parquet(store.url("prepare", "loo"), filesystem=store.arrow_fs)
            .repartition(blocks)
            .materialize()
        )
        preds = loo.map_batches(
            _RankingPredictor,
            batch_format="pyarrow",
            batch_size=cfg.tools.predict_batch_size,
            fn_constructor_kwargs=dict(
                tools_dir=tools_url,
                storage=storage_dict,
                names=names,
                k=cfg.tools.prediction_k,
                candidates_url=store.url("prepare", "direct_candidates"),
                splits=list(cfg.tools.predict_splits),
            ),
            compute=ActorPoolStrategy(size=cfg.tools.predict_actors),
        )
        write_dataset(preds, w, store, "predictions", PREDICTIONS)
        ctr = (
            ray.data.read_parquet(store.url("prepare", "ctr"), filesystem=store.arrow_fs)
            .map_batches(lambda t: t.filter(pc.not_equal(t.column("split"), "train")), batch_format="pyarrow")
            .repartition(blocks)
            .materialize()
        )
        ctr_preds = ctr.map_batches(
            _CTRPredictor,
            batch_format="pyarrow",
            batch_size=4 * cfg.tools.predict_batch_size,
            fn_constructor_kwargs=dict(
                tools_dir=tools_url, storage=storage_dict, names=names, loo_url=store.url("prepare", "loo")
            ),
            compute=ActorPoolStrategy(size=cfg.tools.predict_actors),
        )
        write_dataset(ctr_preds, w, store, "ctr_predictions", CTR_PREDICTIONS)
        summary = {
            "tools": names,
            "holdout_tools": [n.split("/", 1)[1] for n in held_out],
            "holdout_items": tc.holdout_items,
            "validation": progress["done"],
            "seconds": round(time.time() - t_start, 1),
            "num_workers": cfg.tools.num_workers,
            "resumes": progress.get("resumes", []),
        }
        w.write_json("metrics.json", summary)
        w.manifest.metrics = summary
    return summary


def format_summary(s: dict) -> str:
    if s.get("skipped"):
        return "train_tools: skipped (outputs up to date)"
    lines = ["train_tools summary (validation metrics, leave-one-out)", "-" * 56]
    for name, m in s["validation"].items():
        shown = ", ".join(
            f"{k}={v:.0f}" if k == "ranked_among" else f"{k}={v:.4f}"
            for k, v in sorted(m.items())
            if k != "train_seconds"
        )
        lines.append(f"{name:12s} {m.get('train_seconds', 0):7.1f}s  {shown}")
    lines.append(f"time taken: {s['seconds']:.1f}s")
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args, cfg = parse_cli("Train the tool repository on Ray Train and write tool predictions.", argv)
    print(format_summary(run(cfg, force=args.force)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
