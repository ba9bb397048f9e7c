"""Curriculum LoRA fine-tune: the Ray-free loop (determinism, exact resume, rank slices, reload)
and the Ray Train job on a real local Ray (2 DDP workers, killed mid-run and resumed, skip)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

from ray_jobs import finetune, prepare
from reasonrec import config as config_module
from reasonrec.config import CONFIG_DIR, StorageConfig, load_config
from reasonrec.data.catalog import Catalog
from reasonrec.data.schemas import INSTRUCTIONS
from reasonrec.io import ArtifactStore, open_store
from reasonrec.prompts.cot import compose_target, parse_output
from reasonrec.prompts.templates import ItemRef, PromptInputs, RenderOptions, item_text, render_prompt
from reasonrec.vlm import train as train_module
from reasonrec.vlm.builder import load_adapter
from reasonrec.vlm.config import CurriculumConfig, VLMConfig
from reasonrec.vlm.curriculum import CurriculumSampler
from reasonrec.vlm.infer import VLMPredictor
from reasonrec.vlm.train import (
    AUTOCAST_CHOICES,
    FinetuneLoop,
    InstructionDataset,
    dataset_loss,
    finetune_data,
    load_finetuned,
    resolve_autocast,
    valid_subset,
)

TINY_VLM = dict(
    model="tiny",
    image_size=32,
    patch_size=8,
    vision_hidden_size=32,
    vision_layers=1,
    vision_heads=2,
    image_tokens_per_item=4,
    max_length=192,
    max_history_items=4,
    max_history_photos=2,
)
WORLD = [
    "data.sources.0.synthetic.n_users=120",
    "data.sources.0.synthetic.n_items=40",
    "ray.shuffle_partitions=2",
    "data.direct_negatives=10",
]
JOB = (
    WORLD
    + [f"vlm.{k}={v}" for k, v in TINY_VLM.items()]
    + [
        "curriculum.lr=0.005",
        "curriculum.warmup_end=0.25",
        "curriculum.cold_start_begin=0.8",
        "finetune.per_device_batch_size=2",
        "finetune.log_every=4",
    ]
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # 2 shared cores: one BLAS thread per process is faster and steadier for tiny matrices.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------- instruction data
def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (seed * 37 % 255, 90, seed * 11 % 255)).save(buf, format="PNG")
    return buf.getvalue()


def _rows(users, titles: dict, has_photo: dict, n_train: int, n_valid: int) -> list[dict]:
    """Sequential examples from (user_id, history, next item, eh, bucket) tuples: the first
    n_train users train, the next n_valid validate."""
    opts = RenderOptions(
        max_history_items=TINY_VLM["max_history_items"], max_history_photos=TINY_VLM["max_history_photos"]
    )
    rows = []
    for k, (uid, hist, nxt, eh, bucket) in enumerate(users[: n_train + n_valid]):
        refs = [ItemRef(int(i), titles[i], has_photo[i]) for i in hist]
        r = render_prompt("sequential", PromptInputs(uid, "likes tinted things", refs, eh, bucket), uid % 10, opts)
        rows.append(
            dict(
                example_id=k,
                user_id=uid,
                task="sequential",
                split="train" if k < n_train else "valid",
                phase=bucket,
                template_id=uid % 10,
                prompt=r.text,
                image_items=r.image_items,
                target=compose_target("sequential", titles[nxt], 0.5, bucket, eh, ["sasrec"]),
                tools_usable=["sasrec"],
                noisy_tools=False,
            )
        )
    return rows


def _synthetic_tables(n_train=24, n_valid=8, seed=0) -> tuple[pa.Table, pa.Table]:
    """Instruction rows and the items table (id, photo, title) of a 12-item world."""
    rng = np.random.default_rng(seed)
    words = "rose lip tint volume mascara nail polish red shimmer face cream argan oil matte gloss".split()
    titles = {i: " ".join(rng.choice(words, 3)) for i in range(12)}
    photo = {i: i % 5 != 0 for i in range(12)}
    items = pa.table(
        {
            "item_id": pa.array(range(12), pa.int64()),
            "image": pa.array([_png(i) if photo[i] else None for i in range(12)], pa.binary()),
            "title": [titles[i] for i in range(12)],
        }
    )
    users = []
    for u in range(n_train + n_valid):
        hist = rng.choice(12, 4, replace=False)
        eh = float(rng.random())
        users.append(
            (u, hist.tolist(), int((hist[-1] + 1) % 12), eh, "low" if eh < 0.3 else "medium" if eh <= 0.7 else "high")
        )
    return pa.Table.from_pylist(_rows(users, titles, photo, n_train, n_valid), schema=INSTRUCTIONS), items


def write_instructions(store: ArtifactStore, n_train: int = 32, n_valid: int = 8) -> None:
    """A valid ``instructions`` stage on top of a real ``prepare`` output (sequential task)."""
    prep = store.require("prepare")
    items = store.read_table("prepare", "items").to_pylist()
    titles = {r["item_id"]: item_text(r["title"], r["brand"], (r["categories"] or [None])[-1]) for r in items}
    photo = {r["item_id"]: r["image"] is not None for r in items}
    users = {r["user_id"]: r for r in store.read_table("prepare", "users").to_pylist()}
    loo = sorted(store.read_table("prepare", "loo").to_pylist(), key=lambda r: r["user_id"])
    seqs = [
        (
            r["user_id"],
            r["train_items"],
            r["valid_item"],
            users[r["user_id"]]["evidence_horizon"],
            users[r["user_id"]]["eh_bucket"],
        )
        for r in loo
        if r["valid_item"] is not None
    ]
    table = pa.Table.from_pylist(_rows(seqs, titles, photo, n_train, n_valid), schema=INSTRUCTIONS)
    with store.stage_writer("instructions", "test", {"prepare": prep.fingerprint}) as w:
        w.write_table("examples/part-0.parquet", table)


# ----------------------------------------------------------------- the loop, in-process
def _loop(data, steps=6, **kw):
    return FinetuneLoop(
        data,
        VLMConfig(**TINY_VLM),
        CurriculumConfig(lr=5e-3, warmup_end=0.3, cold_start_begin=0.8),
        max_steps=steps,
        per_device_batch_size=2,
        **kw,
    )


def _trainable(loop):
    return {n: p.detach().clone() for n, p in loop.bundle.model.named_parameters() if p.requires_grad}


def test_loop_is_deterministic_and_resumes_exactly(tmp_path):
    data = finetune_data(*_synthetic_tables())
    straight, losses = _loop(data), []
    straight.train_steps(on_step=lambda m: losses.append(m.loss))
    first, part = _loop(data), []
    first.train_steps(end_step=3, on_step=lambda m: part.append(m.loss))
    assert part == losses[:3]  # same seed -> same run
    first.save_state(tmp_path)
    resumed, rest = _loop(data), []
    resumed.load_state(tmp_path)
    assert resumed.step == 3
    resumed.train_steps(on_step=lambda m: rest.append(m.loss))
    assert rest == pytest.approx(losses[3:], rel=1e-6)  # continues as if never stopped
    a, b = _trainable(straight), _trainable(resumed)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    assert losses[-1] < losses[0]


def _catalog(items: pa.Table) -> Catalog:
    """The catalog of :func:`_synthetic_tables`' items (texts = their titles)."""
    n = items.num_rows
    return Catalog(
        pa.table(
            {
                "item_id": items.column("item_id"),
                "item_key": [f"i{i}" for i in range(n)],
                "title": items.column("title"),
                "brand": pa.nulls(n, pa.string()),
                "categories": pa.nulls(n, pa.list_(pa.string())),
                "price": pa.nulls(n, pa.float64()),
            }
        )
    )


def test_ranking_validation_ranks_the_catalog_as_scoring_does_and_leaves_training_as_it_was():
    train, items = _synthetic_tables()
    data = finetune_data(train, items, _catalog(items))
    straight, losses = _loop(data), []
    straight.train_steps(on_step=lambda m: losses.append(m.loss))
    loop, seen = _loop(data), []
    loop.train_steps(end_step=3, on_step=lambda m: seen.append(m.loss))
    every = loop.validation_ranking(max_examples=0, k=12)  # k = the catalog's size: every answer ranks
    assert loop.bundle.model.training  # back in training mode
    assert every["n"] == data.valid.num_rows == 8 and every["hr"] == 1.0
    # NDCG from the answer's rank in the scoring path's own list (rank_catalog over the catalog trie).
    predictor = VLMPredictor(loop.bundle, loop.collator)
    valid = InstructionDataset(data.valid, data.images)
    examples = [valid[i] for i in range(8)]
    ranks = []
    for ex, out in zip(examples, predictor.rank_catalog(examples, data.catalog.trie(predictor.tok), k=12)):
        answer = parse_output(ex["target"], "sequential").answer
        ranks.append(next(r for r, i in enumerate(out.items) if data.catalog.text[i] == answer))
    assert every["ndcg"] == pytest.approx(np.mean(1 / np.log2(np.array(ranks) + 2)))
    top1 = loop.validation_ranking(max_examples=0, k=1)
    assert top1["hr"] == pytest.approx(np.mean(np.array(ranks) == 0)) == top1["ndcg"]
    phases = data.valid.column("phase").to_pylist()
    bucket = max(set(phases), key=phases.count)
    assert loop.validation_ranking(0, k=3, buckets=[bucket])["n"] == phases.count(bucket)
    assert loop.validation_ranking(3, k=3)["n"] == 3  # a seeded sample
    with pytest.raises(ValueError, match="no sequential validation examples"):
        loop.validation_ranking(0, k=3, buckets=["nobody"])
    with pytest.raises(ValueError, match="needs the catalog"):
        _loop(finetune_data(train, items), steps=1).validation_ranking(0)
    loop.train_steps(on_step=lambda m: seen.append(m.loss))
    assert seen == pytest.approx(losses, rel=1e-6)  # validating changed nothing in training


def test_best_checkpoint_takes_the_highest_hr_and_the_later_step_on_ties():
    reported = [
        ("a", {"step": 8, "valid_hr": 0.25}),
        ("b", {"step": 16, "valid_hr": 0.5}),
        ("c", {"step": 24, "valid_hr": 0.5}),
        ("d", {"step": 32, "valid_hr": 0.375}),
    ]
    assert finetune.best_checkpoint(reported) == reported[2]
    assert finetune.best_checkpoint(reported[:2] + reported[3:]) == reported[1]
    with pytest.raises(RuntimeError, match="no checkpoint with a validation HR"):
        finetune.best_checkpoint([("a", {"step": 8})])


def test_ranking_validation_options_change_the_stage_only_when_on():
    base = finetune._config_hash(_cfg("/tmp/unused"), {})
    assert finetune._config_hash(_cfg("/tmp/unused", "finetune.export=last", "finetune.valid_rank_k=5"), {}) == base
    on = _cfg("/tmp/unused", "finetune.valid_rank_examples=8")
    best = _cfg("/tmp/unused", "finetune.valid_rank_examples=8", "finetune.export=best_valid_hr")
    assert len({base, finetune._config_hash(on, {}), finetune._config_hash(best, {})}) == 3
    assert finetune._config_hash(best, {}, with_budget=False) != finetune._config_hash(on, {}, with_budget=False)


def _projection_dtypes(loop, run) -> list:
    """Call ``run()``; the dtype of one attention projection's output in each forward it made."""
    seen = []
    q_proj = next(m for n, m in loop.bundle.model.named_modules() if n.endswith("q_proj.base_layer"))
    hook = q_proj.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    try:
        run()
    finally:
        hook.remove()
    return seen


def test_bf16_autocast_computes_in_bf16_and_keeps_full_precision_weights():
    data = finetune_data(*_synthetic_tables())
    loop, losses = _loop(data, autocast="bfloat16"), []
    seen = _projection_dtypes(loop, lambda: loop.train_steps(on_step=lambda m: losses.append(m.loss)))
    assert seen and set(seen) == {torch.bfloat16}  # the training forward ran under autocast
    assert all(p.dtype == torch.float32 for p in loop.params)  # master weights (and AdamW state) stay fp32
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    seen = _projection_dtypes(loop, loop.validation_loss)
    assert seen and set(seen) == {torch.float32}  # validation without autocast: comparable
    with pytest.raises(ValueError, match="finetune.autocast='float16'"):
        _loop(data, autocast="float16")
    assert set(config_module._CHOICES["finetune.autocast"]) == set(AUTOCAST_CHOICES)  # the config check knows them all


def test_autocast_auto_follows_the_hardware_and_forced_bf16_without_it_warns(monkeypatch, caplog):
    # The bf16 kernel probe is the hardware boundary: each answer is pretended in turn.
    monkeypatch.setattr(train_module, "native_bf16", lambda device: True)
    assert resolve_autocast("cpu", "auto") == "bfloat16"
    monkeypatch.setattr(train_module, "native_bf16", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="reasonrec.vlm.train"):
        assert resolve_autocast("cpu", "auto") == "none"
        assert resolve_autocast("cpu", "none") == "none"
        assert not caplog.records
        assert resolve_autocast("cpu", "bfloat16") == "bfloat16"  # asked for explicitly: kept, but said
    assert len(caplog.records) == 1 and "emulated" in caplog.text
    loop = _loop(finetune_data(*_synthetic_tables()), steps=1, autocast="auto")
    seen = _projection_dtypes(loop, loop.train_steps)
    assert loop.autocast == "none" and seen and set(seen) == {torch.float32}  # auto without bf16 trains in fp32


def test_grad_accum_ranks_and_time_budget():
    data = finetune_data(*_synthetic_tables())
    seen = {}
    for rank in (0, 1):
        loop = _loop(data, steps=4, grad_accum=2, rank=rank, world_size=2)
        loop.train_steps(end_step=1, on_step=lambda m, r=rank: seen.setdefault(r, m.example_ids))
        assert len(seen[rank]) == 4  # per_device 2 x grad_accum 2
    want = loop.sampler.global_batch_at(0)
    assert seen[0] + seen[1] == data.train.column("example_id").to_numpy()[want].tolist()
    stopped = _loop(data, steps=6)
    assert stopped.train_steps(time_budget_s=1e-9) == 1  # budget spent after the first step
    assert stopped.train_steps(time_budget_s=5.0, elapsed_s=5.0) == 1  # spent before: no step
    assert stopped.train_steps(time_budget_s=1e9, elapsed_s=5.0) == 6  # a larger budget goes on


def test_time_budget_counts_training_seconds_not_the_callbacks(monkeypatch):
    class Clock:  # the training loop's only clock; the test moves it
        now = 0.0

        def perf_counter(self):
            return self.now

    clock = Clock()
    monkeypatch.setattr(train_module, "time", clock)
    seconds = []

    def slow_checkpoint(m):  # an hour of checkpointing / validation after every step
        seconds.append(m.seconds)
        clock.now += 3600.0

    loop = _loop(finetune_data(*_synthetic_tables()), steps=4)
    assert loop.train_steps(on_step=slow_checkpoint, time_budget_s=60.0) == 4
    assert seconds == [0.0] * 4  # the callbacks' hours are not the steps' seconds either


def test_saved_adapter_reloads_with_identical_logits(tmp_path, s3_bucket):
    train, items = _synthetic_tables()
    data = finetune_data(train, items)
    loop = _loop(data, steps=3)
    loop.train_steps()
    loop.save_state(tmp_path)
    reloaded = load_adapter(tmp_path / "adapter", VLMConfig(**TINY_VLM))
    batch = loop.collator([InstructionDataset(data.valid, data.images)[i] for i in range(2)])
    loop.bundle.model.eval()
    with torch.no_grad():
        want = loop.bundle.model(**batch).logits
        got = reloaded.model(**batch).logits
    assert torch.allclose(want, got, atol=1e-5)
    assert not torch.allclose(want, _loop(data).bundle.model.eval()(**batch).logits, atol=1e-3)  # training moved it
    # The same adapter committed as an S3 stage (moto on loopback) loads through load_finetuned.
    endpoint, bucket = s3_bucket
    store = ArtifactStore(bucket, "run", StorageConfig(s3_endpoint_url=endpoint))
    with store.stage_writer("finetune", "test", {}) as w:
        for f in os.listdir(tmp_path / "adapter"):
            w.write_bytes(f"adapter/{f}", (tmp_path / "adapter" / f).read_bytes())
    with torch.no_grad():
        assert torch.allclose(want, load_finetuned(store, VLMConfig(**TINY_VLM)).model(**batch).logits, atol=1e-5)


def test_missing_photo_items_are_an_error():
    train, items = _synthetic_tables()
    with pytest.raises(ValueError, match="missing from the items"):
        finetune_data(train, items.slice(0, 5))


# ------------------------------------------------------------------------ the Ray job
STEPS, EVERY = 32, 8


def _cfg(root, *extra):
    return load_config(CONFIG_DIR / "quickstart.yaml", JOB + [f"output_root={root}", *extra])


def _kill_after_a_mid_run_checkpoint(store: ArtifactStore, args: list[str], env: dict) -> int:
    """Run the job in a subprocess until Ray Train has *registered* a mid-run checkpoint (named in
    its snapshot: only those are restored), then SIGKILL it. Returns that checkpoint's step."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # A bound for a hung job, not a speed check: the loop returns at the first registered
    # checkpoint (150 s was once too short with the 2 CPUs shared with another job).
    seen, deadline = None, time.time() + 600
    try:
        while seen is None and time.time() < deadline and proc.poll() is None:
            for snap in store.fs.glob(store.path("_ray_train", "*", "checkpoint_manager_snapshot.json")):
                try:
                    with store.fs.open(snap) as f:
                        metrics = (json.load(f).get("latest_checkpoint_result") or {}).get("metrics", {})
                except ValueError:  # caught mid-write
                    continue
                if 0 < metrics.get("step", 0) < STEPS:
                    seen = metrics["step"]
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert seen is not None, "no mid-run checkpoint appeared"
    return seen


@pytest.fixture(scope="module")
def finetuned(ray_local, tmp_path_factory):
    """prepare (real, tiny world) + a test instructions stage, then the job with 2 Ray Train
    workers, ranking validation at every checkpoint and the best one exported: started in a
    subprocess, killed after a mid-run checkpoint, run again to the end."""
    root = tmp_path_factory.mktemp("runs")
    overrides = [
        "finetune.num_workers=2",
        f"finetune.max_steps={STEPS}",
        f"finetune.checkpoint_every={EVERY}",
        "finetune.valid_rank_examples=8",
        "finetune.export=best_valid_hr",
    ]
    cfg = _cfg(root, *overrides)
    prepare.run(cfg)
    store = open_store(cfg)
    write_instructions(store)
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    seen = _kill_after_a_mid_run_checkpoint(
        store,
        [
            sys.executable,
            "-m",
            "ray_jobs.finetune",
            "--config",
            str(CONFIG_DIR / "quickstart.yaml"),
            *JOB,
            f"output_root={root}",
            *overrides,
        ],
        env,
    )
    assert store.manifest("finetune") is None  # the killed run committed nothing
    return cfg, finetune.run(cfg), store, seen


def test_killed_job_resumes_from_its_checkpoint_and_finishes(finetuned):
    _, s, store, seen = finetuned
    (resume,) = s["resumes"]
    assert seen <= resume["from_step"] < STEPS and resume["from_step"] % EVERY == 0
    assert s["steps"] == STEPS and s["log"][-1]["step"] == STEPS
    files = set(os.listdir(store.path("finetune", "adapter")))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert store.read_json("finetune", "metrics.json")["resumes"] == s["resumes"]
    assert "resumes 1" in finetune.format_summary(s)


def test_two_workers_train_disjoint_slices_and_the_loss_drops(finetuned):
    cfg, s, store, _ = finetuned
    assert s["num_workers"] == 2 and s["global_batch"] == 4
    ranks = s["first_batch"]["by_rank"]
    assert s["first_batch"]["step"] == 0 and len(ranks) == 2 and len(ranks[0]) == len(ranks[1]) == 2
    examples = store.read_table("instructions", "examples")
    train = examples.filter(pc.equal(examples.column("split"), "train")).sort_by("example_id")
    sampler = CurriculumSampler(train.column("phase").to_pylist(), STEPS, 2, cfg.curriculum, world_size=2)
    assert ranks[0] + ranks[1] == train.column("example_id").to_numpy()[sampler.global_batch_at(0)].tolist()
    assert s["log"][-1]["loss"] < s["log"][0]["loss"]  # overfits the tiny set
    assert s["valid_loss"] < s["valid_loss_before"]
    assert set(s["loss_by_phase"]) == {"warmup", "progressive", "cold_start"}
    assert s["tokens_per_s"] > 0


def test_every_checkpoint_is_validated_by_ranking_and_the_best_is_exported(finetuned):
    _, s, store, _ = finetuned
    curve = s["valid_curve"]
    assert [e["step"] for e in curve] == list(range(EVERY, STEPS + 1, EVERY))  # across the kill and resume
    assert all(e["n"] == 8 and 0 <= e["ndcg"] <= e["hr"] <= 1 for e in curve)  # both workers' shares summed
    assert s["exported_step"] == max(curve, key=lambda e: (e["hr"], e["step"]))["step"]
    assert s["valid_loss"] == curve[-1]["loss"]
    assert store.read_json("finetune", "metrics.json")["exported_step"] == s["exported_step"]
    assert f"exported: the adapter of step {s['exported_step']}" in finetune.format_summary(s)


def test_reloaded_adapter_reproduces_the_exported_checkpoints_validation_loss(finetuned):
    cfg, s, store, _ = finetuned
    bundle = load_finetuned(store, cfg.vlm)
    data = finetune_data(store.read_table("instructions", "examples"), store.read_table("prepare", "items"))
    valid = InstructionDataset(data.valid, data.images)
    loss = dataset_loss(
        bundle, valid, valid_subset(len(valid), cfg.finetune.max_valid_examples, cfg.curriculum.seed), 2
    )
    exported = next(e for e in s["valid_curve"] if e["step"] == s["exported_step"])
    assert loss == pytest.approx(exported["loss"], rel=1e-4)  # computed by the Ray workers at that step


def test_rerun_skips(finetuned):
    cfg, s, _, _ = finetuned
    again = finetune.run(cfg)
    assert again["skipped"] is True and again["valid_loss"] == s["valid_loss"]


def test_a_run_stopped_by_its_time_budget_continues_with_a_larger_one(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    steps = ["finetune.max_steps=6", "finetune.checkpoint_every=100"]
    cfg = _cfg(root, *steps, "finetune.time_budget_s=0.001")
    prepare.run(cfg)
    store = open_store(cfg)
    write_instructions(store)
    stopped = finetune.run(cfg)
    assert stopped["steps"] == 1 and stopped["resumes"] == []
    more = finetune.run(_cfg(root, *steps, "finetune.time_budget_s=0"))  # another budget: re-run
    assert more["steps"] == 6 and [r["from_step"] for r in more["resumes"]] == [1]
    assert more["log"][-1]["step"] == 6 and more["train_seconds"] > stopped["train_seconds"]
    assert more["valid_loss_before"] == stopped["valid_loss_before"]
    assert more["valid_loss"] != stopped["valid_loss"]  # measured again after the new steps
    done = finetune.run(_cfg(root, *steps, "finetune.time_budget_s=3600"))  # finished: nothing to train
    assert done["steps"] == 6 and done["resumes"] == more["resumes"] and done["valid_loss"] == more["valid_loss"]
