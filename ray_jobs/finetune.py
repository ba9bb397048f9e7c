"""finetune: curriculum LoRA fine-tune of the VLM on Ray Train.

    python -m ray_jobs.finetune --config configs/quickstart.yaml [key=value ...] [--force]

One ``TorchTrainer`` run (``ScalingConfig`` from ``finetune.*``; DDP over gloo on CPU, NCCL on
GPU) runs :class:`reasonrec.vlm.train.FinetuneLoop` on every worker: each rank trains on its
equal slice of every global batch drawn by the evidence-horizon curriculum sampler. Every
``checkpoint_every`` steps rank 0 reports a checkpoint (adapter + optimizer + scheduler state +
step + the run record) through ``ray.train.report``. A killed job started again with the same
config resumes from the latest checkpoint (Ray Train restores a run with the same name under
``{run}/_ray_train/``); ``--force`` discards that state. Training stops early, with a
checkpoint, once ``finetune.time_budget_s`` (training seconds over all resumes) is spent; started
again with a larger budget, the job continues that run from its last checkpoint (the budget is
not part of the Ray Train run's name). Every ``log_every`` steps a line with the phase, loss, LR
and tokens/s is logged.

With ``finetune.valid_rank_examples`` > 0 every checkpoint is validated by ranking (HR@k, NDCG@k
of the whole catalog for sequential validation examples, and the validation loss at that step);
``finetune.export=best_valid_hr`` then exports the checkpoint with the highest validation HR, which
Ray Train keeps (``checkpoint_score_attribute``) besides the latest one it resumes from.

Outputs under ``{run}/finetune/``: ``adapter/`` (LoRA + trained projector/vision tower as
safetensors, loadable with ``reasonrec.vlm.train.load_finetuned``; the exported step's) and
``metrics.json`` (steps, loss per phase, validation loss before and after, the ranking validation
curve, the exported step, tokens/s, wall time, resumes).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict

from reasonrec.config import RunConfig, parse_cli, section_hash
from reasonrec.data.images import photo_inputs
from reasonrec.io import ArtifactStore, open_store
from reasonrec.runtime import init_ray
from reasonrec.vlm.train import ADAPTER_DIR, INSTRUCTIONS_STAGE, STAGE, training_config

log = logging.getLogger("reasonrec.finetune")
PROGRESS = "progress.json"
VALID_HR = "valid_hr"  # the checkpoints' score when finetune.export=best_valid_hr


# ------------------------------------------------------------------------- Ray Train worker
def _train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch
    from ray.train import Checkpoint

    from reasonrec.config import StorageConfig
    from reasonrec.vlm.builder import vlm_config_from_dict
    from reasonrec.vlm.config import CurriculumConfig
    from reasonrec.vlm.train import FinetuneLoop, close_window, load_finetune_data, new_progress, record_step

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ft = config["finetune"]
    store = ArtifactStore(config["output_root"], config["run_name"], StorageConfig(**config["storage"]))
    data = load_finetune_data(store, with_catalog=ft["valid_rank_examples"] > 0)  # the catalog only to rank
    loop = FinetuneLoop(
        data,
        vlm_config_from_dict(config["vlm"]),
        CurriculumConfig(**config["curriculum"]),
        max_steps=ft["max_steps"],
        per_device_batch_size=ft["per_device_batch_size"],
        grad_accum=ft["grad_accum"],
        grad_clip=ft["grad_clip"],
        rank=rank,
        world_size=world,
        device=ray.train.torch.get_device(),
        autocast=ft["autocast"],
    )
    progress = new_progress()
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            loop.load_state(d)
            with open(os.path.join(d, PROGRESS)) as f:
                progress = json.load(f)
        if loop.step < loop.max_steps:
            progress["resumes"].append({"from_step": loop.step, "train_seconds": round(progress["train_seconds"], 2)})
            log.info("resuming from step %d of %d", loop.step, loop.max_steps)
        else:  # a finished run started again with another budget: nothing to train, no resume
            log.info("restored a finished run (%d of %d steps): nothing to train", loop.step, loop.max_steps)
    if world > 1:
        # Unused parameters: a micro-batch without photos leaves the vision side without grads.
        loop.wrap(lambda m: ray.train.torch.prepare_model(m, parallel_strategy_kwargs={"find_unused_parameters": True}))

    ranked = ft["valid_rank_examples"] > 0
    progress.setdefault("valid_curve", [])

    def validate(step: int) -> dict:
        """Ranking validation + validation loss at ``step``, once per step (a restored finished run
        reports its last entry again)."""
        curve = progress["valid_curve"]
        if curve and curve[-1]["step"] == step:
            return curve[-1]
        t0 = time.perf_counter()
        entry = {
            "step": step,
            **loop.validation_ranking(ft["valid_rank_examples"], ft["valid_rank_k"], ft["valid_rank_buckets"]),
            "loss": loop.validation_loss(ft["max_valid_examples"]),
        }
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        curve.append(entry)
        if rank == 0:
            log.info(
                "validation at step %d: HR@%d %.4f NDCG@%d %.4f (%d examples), loss %.4f, %.0f s",
                step,
                ft["valid_rank_k"],
                entry["hr"],
                ft["valid_rank_k"],
                entry["ndcg"],
                entry["n"],
                entry["loss"],
                entry["seconds"],
            )
        return entry

    def report(metrics: dict) -> None:
        # Every worker calls report; rank 0 attaches the checkpoint.
        if ranked:
            metrics[VALID_HR] = validate(metrics["step"])["hr"]
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                loop.save_state(d)
                with open(os.path.join(d, PROGRESS), "w") as f:
                    json.dump(progress, f)
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)

    progress["torch_threads"] = torch.get_num_threads()  # what tokens/s was measured with
    progress["autocast"] = loop.autocast  # as run ("auto" resolved on this worker)
    if loop.step == 0 and progress["valid_loss_before"] is None:
        progress["valid_loss_before"] = loop.validation_loss(ft["max_valid_examples"])
    last = None

    def on_step(m) -> None:
        nonlocal last
        last = m
        if progress.get("first_batch") is None and world > 1:
            progress["first_batch"] = {"step": m.step, "by_rank": _gather(m.example_ids)}
        window = record_step(progress, m, ft["log_every"])
        if window and rank == 0:
            log.info(
                "step %d/%d phase=%s loss=%.4f lr=%.3g tokens/s=%.0f",
                window["step"],
                loop.max_steps,
                window["phase"],
                window["loss"],
                window["lr"],
                window["tokens_per_s"],
            )
        if (m.step + 1) % ft["checkpoint_every"] == 0 and m.step + 1 < loop.max_steps:
            report({"step": m.step + 1, "loss": m.loss, "phase": m.phase})

    loop.train_steps(on_step=on_step, time_budget_s=ft["time_budget_s"], elapsed_s=progress["train_seconds"])
    close_window(progress, last)
    if progress["valid_loss"] is None or last is not None:  # a continued run trained further
        progress["valid_loss"] = (
            validate(loop.step)["loss"] if ranked else loop.validation_loss(ft["max_valid_examples"])
        )
    report({"step": loop.step, "finished": 1.0})


def _gather(obj) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------ driver
# Options added after fine-tunes existed, at their "off" values: left out of the hashes so that a
# run made before them is still up to date (and resumable) when they stay off.
_OFF = {"valid_rank_examples": 0, "valid_rank_k": 5, "valid_rank_buckets": [], "export": "last"}


def _config_hash(cfg: RunConfig, inputs: dict, with_budget: bool = True) -> str:
    """The stage's hash (``with_budget``: another time budget re-runs the stage) or, without the
    time budget, the Ray Train run's: a run stopped by its budget then continues from its last
    checkpoint when the job is started again with a larger one, instead of starting over."""
    runtime = ("log_every", "max_failures", "cpus_per_worker") + (() if with_budget else ("time_budget_s",))
    train = {k: v for k, v in asdict(cfg.finetune).items() if k not in runtime and not (k in _OFF and v == _OFF[k])}
    return section_hash(
        {
            "vlm": training_config(cfg.vlm),
            "curriculum": section_hash(cfg.curriculum),
            "finetune": train,
            "inputs": inputs,
        }
    )


def run(cfg: RunConfig, force: bool = False) -> dict:
    init_ray(cfg.ray)
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    t_start = time.time()
    store = open_store(cfg)
    # Photos come from prepare/items, the examples from instructions: both are inputs.
    inputs = {
        INSTRUCTIONS_STAGE: store.require(INSTRUCTIONS_STAGE).fingerprint,
        "prepare": store.require("prepare").fingerprint,
        **photo_inputs(store),
    }
    config_hash = _config_hash(cfg, inputs)
    if not force and store.is_done(STAGE, config_hash, inputs):
        log.info("finetune: manifest matches under %s; skipping (use --force to re-run)", store.url(STAGE))
        return {"skipped": True, **store.manifest(STAGE).metrics}

    ft = cfg.finetune
    train_cfg = {
        "output_root": cfg.output_root,
        "run_name": cfg.run_name,
        "storage": {"s3_endpoint_url": cfg.storage.s3_endpoint_url, "s3_anon": cfg.storage.s3_anon},
        "vlm": asdict(cfg.vlm),
        "curriculum": asdict(cfg.curriculum),
        "finetune": asdict(ft),
    }
    best = {"checkpoint_score_attribute": VALID_HR, "checkpoint_score_order": "max"} if ft.export != "last" else {}
    storage_path = store.url("_ray_train") if store.scheme else store.path("_ray_train")
    train_name = f"finetune-{_config_hash(cfg, inputs, with_budget=False)}"
    if force and store.fs.exists(store.path("_ray_train", train_name)):
        store.fs.rm(store.path("_ray_train", train_name), recursive=True)  # --force: no resume
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=train_cfg,
        scaling_config=ScalingConfig(
            num_workers=ft.num_workers, use_gpu=ft.use_gpu, resources_per_worker={"CPU": ft.cpus_per_worker}
        ),
        run_config=TrainRunConfig(
            name=train_name,
            storage_path=storage_path,
            storage_filesystem=None if not store.scheme else store.arrow_fs,
            # Ray Train always keeps the latest checkpoint (for resuming) besides the num_to_keep best.
            checkpoint_config=CheckpointConfig(num_to_keep=1, **best),
            failure_config=FailureConfig(max_failures=ft.max_failures),
        ),
    )
    log.info(
        "fine-tuning %s (LoRA r=%d) for %d steps on Ray Train (%d worker(s), gpu=%s, global batch %d)",
        cfg.vlm.model,
        cfg.vlm.lora.r,
        ft.max_steps,
        ft.num_workers,
        ft.use_gpu,
        ft.per_device_batch_size * ft.grad_accum * ft.num_workers,
    )
    result = trainer.fit()

    exported, exported_step = result.checkpoint, None
    if best:
        exported, metrics = best_checkpoint(result.best_checkpoints)
        exported_step = metrics["step"]
        log.info(
            "exporting the adapter of step %d (validation HR@%d %.4f)",
            exported_step,
            ft.valid_rank_k,
            metrics[VALID_HR],
        )
    with store.stage_writer(STAGE, config_hash, inputs) as w:
        with result.checkpoint.as_directory() as d:  # the latest holds the whole run record
            with open(os.path.join(d, PROGRESS)) as f:
                progress = json.load(f)
        with exported.as_directory() as d:
            adapter = os.path.join(d, ADAPTER_DIR)
            for fname in sorted(os.listdir(adapter)):
                with open(os.path.join(adapter, fname), "rb") as f:
                    w.write_bytes(f"{ADAPTER_DIR}/{fname}", f.read())
        from reasonrec.vlm.train import summarize

        summary = {
            **summarize(progress),
            "max_steps": ft.max_steps,
            "num_workers": ft.num_workers,
            "global_batch": ft.per_device_batch_size * ft.grad_accum * ft.num_workers,
            "model": cfg.vlm.model,
            "wall_seconds": round(time.time() - t_start, 1),
            "torch_threads": progress.get("torch_threads"),
            "autocast": progress.get("autocast"),
            "first_batch": progress.get("first_batch"),
            "export": ft.export,
            "exported_step": progress["step"] if exported_step is None else exported_step,
        }
        w.write_json("metrics.json", summary)
        w.manifest.metrics = {k: v for k, v in summary.items() if k not in ("log", "first_batch", "valid_curve")}
    return summary


def best_checkpoint(reported: list) -> tuple:
    """The (checkpoint, metrics) with the highest validation HR among Ray Train's kept ones; ties
    go to the later step (it trained more for the same score)."""
    scored = [(c, m) for c, m in reported or () if m.get(VALID_HR) is not None]
    if not scored:
        raise RuntimeError("finetune.export=best_valid_hr: Ray Train kept no checkpoint with a validation HR")
    return max(scored, key=lambda cm: (cm[1][VALID_HR], cm[1]["step"]))


def format_summary(s: dict) -> str:
    if s.get("skipped"):
        return "finetune: skipped (outputs up to date)"
    lines = [
        f"finetune summary ({s['model']}, {s['num_workers']} worker(s), global batch {s['global_batch']})",
        "-" * 56,
    ]
    for e in s["log"]:
        lines.append(
            f"step {e['step']:6d}  {e['phase'] or '':12s} loss {e['loss']:.4f}  lr {e['lr']:.3g}  "
            f"{e['tokens_per_s']:.0f} tokens/s"
        )
    phases = ", ".join(f"{k}={v:.4f}" for k, v in s["loss_by_phase"].items())
    lines.append(f"loss by phase: {phases}")
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines.append(f"validation loss: {fmt(s['valid_loss_before'])} before -> {fmt(s['valid_loss'])} after")
    for e in s.get("valid_curve", []):
        lines.append(
            f"validation at step {e['step']:6d}: HR {e['hr']:.4f}  NDCG {e['ndcg']:.4f}  ({e['n']} ranked)  "
            f"loss {e['loss']:.4f}"
        )
    if s.get("export", "last") != "last":
        lines.append(f"exported: the adapter of step {s['exported_step']} ({s['export']})")
    lines.append(
        f"steps {s['steps']}/{s['max_steps']}, {s['tokens_per_s']:.0f} tokens/s, train {s['train_seconds']:.1f}s, "
        f"wall {s['wall_seconds']:.1f}s, resumes {len(s['resumes'])}"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args, cfg = parse_cli("Curriculum LoRA fine-tune of the VLM on Ray Train.", argv)
    print(format_summary(run(cfg, force=args.force)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
