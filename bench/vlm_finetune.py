"""Fine-tune throughput (tokens/s) of the Ray Train job, 1 vs 2 workers, tiny and small VLM.

    python -m bench.vlm_finetune --models tiny small --layouts 1x1 2x1 1x2 --workdir /tmp/bench-finetune

Everything runs in one process on one local Ray cluster (2 CPUs unless ``--cpus``), one
configuration after the other: ``ray_jobs.finetune.run`` with ``--force`` on the same synthetic
instruction set (sequential prompts rendered with the real templates: 10-item histories, the
model preset's photo budget, 64x64 photos). A layout ``WxC`` is W Ray Train workers with
``finetune.cpus_per_worker = C`` (Ray sets each worker's torch threads to C): 1x1 and 1x2 are
one worker with one or two threads, 2x1 two DDP workers with one thread each. The per-worker
batch is fixed (``--batch``), so 2 workers process a global batch twice as large.

tokens/s counts every non-padding input token (prompt, image and target tokens) over all
workers; "steady" leaves out the first ``log_every`` window (lazy initialisation). Wall time
is the whole ``run()``: worker start-up, model build, validation passes, checkpoints, commit.
Results go to ``bench/results/vlm_finetune.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from PIL import Image  # noqa: E402

from reasonrec.config import CONFIG_DIR, load_config  # noqa: E402
from reasonrec.data.schemas import INSTRUCTIONS, ITEMS, conform  # noqa: E402
from reasonrec.io import ArtifactStore, open_store  # noqa: E402
from reasonrec.prompts.cot import compose_target  # noqa: E402
from reasonrec.prompts.templates import ItemRef, PromptInputs, RenderOptions, render_prompt  # noqa: E402

PRESET = {"tiny": "quickstart.yaml", "small": "beauty.yaml"}  # each model's own VLM settings
WORDS = "rose lip tint volume mascara nail polish red shimmer face cream argan oil matte gloss serum".split()


def _png(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_inputs(
    store: ArtifactStore,
    opts: RenderOptions,
    n_items: int = 200,
    n_train: int = 256,
    n_valid: int = 8,
    history: int = 10,
    seed: int = 0,
) -> None:
    """An items table with photos (the part of ``prepare`` the fine-tune reads) and an
    ``instructions`` stage of sequential examples over it."""
    rng = np.random.default_rng(seed)
    titles = [" ".join(rng.choice(WORDS, size=rng.integers(3, 7))) for _ in range(n_items)]
    items = pa.table(
        {
            "item_id": pa.array(range(n_items), pa.int64()),
            "title": titles,
            "image": pa.array([_png(rng) for _ in range(n_items)], pa.binary()),
        }
    )
    with store.stage_writer("prepare", "bench", {}) as w:
        w.write_table("items/part-0.parquet", conform(items, ITEMS))
    rows = []
    for k in range(n_train + n_valid):
        hist = rng.choice(n_items, history + 1, replace=False)
        eh = float(rng.random())
        bucket = "low" if eh < 0.3 else "medium" if eh <= 0.7 else "high"
        r = render_prompt(
            "sequential",
            PromptInputs(
                k,
                "likes nail polish; brand OPI; mid-range prices",
                [ItemRef(int(i), titles[i]) for i in hist[:-1]],
                eh,
                bucket,
            ),
            k % 10,
            opts,
        )
        rows.append(
            dict(
                example_id=k,
                user_id=k,
                task="sequential",
                split="train" if k < n_train else "valid",
                phase=bucket,
                template_id=k % 10,
                prompt=r.text,
                image_items=r.image_items,
                target=compose_target("sequential", titles[hist[-1]], 0.4, bucket, eh, ["sasrec"]),
                tools_usable=["sasrec"],
                noisy_tools=False,
            )
        )
    with store.stage_writer("instructions", "bench", {"prepare": store.require("prepare").fingerprint}) as w:
        w.write_table("examples/part-0.parquet", pa.Table.from_pylist(rows, schema=INSTRUCTIONS))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny", "small"])
    ap.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2"], help="WORKERSxCPUS_PER_WORKER")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--batch", type=int, default=2, help="per-worker batch")
    ap.add_argument("--steps", nargs="+", default=["tiny=30", "small=4"], help="optimizer steps per model")
    ap.add_argument("--workdir", default="/tmp/bench-finetune")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "vlm_finetune.json"))
    args = ap.parse_args()
    steps = {k: int(v) for k, v in (s.split("=") for s in args.steps)}
    work = Path(args.workdir)
    cache = work / "_cache"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    from ray_jobs import finetune
    from reasonrec.config import RayConfig
    from reasonrec.runtime import init_ray
    from reasonrec.vlm.builder import build_vlm

    init_ray(RayConfig(num_cpus=args.cpus))
    results = []
    for model in args.models:
        base = [
            f"output_root={work}",
            f"vlm.cache_dir={cache}",
            f"finetune.per_device_batch_size={args.batch}",
            f"finetune.max_steps={steps[model]}",
            f"finetune.checkpoint_every={steps[model]}",
            f"finetune.log_every={2 if steps[model] < 20 else 5}",
            "finetune.time_budget_s=0",
        ]
        cfg = load_config(CONFIG_DIR / PRESET[model], base + [f"run_name=inputs-{model}"])
        if model == "small":
            build_vlm(cfg.vlm, lora=False)  # convert the GGUF once into the cache, outside the timings
        inputs = open_store(cfg)
        if inputs.manifest("instructions") is None:
            v = cfg.vlm
            write_inputs(
                inputs, RenderOptions(max_history_items=v.max_history_items, max_history_photos=v.max_history_photos)
            )
        for layout in args.layouts:
            n, cpus = (int(x) for x in layout.split("x"))
            run_name = f"{model}-{layout}"
            shutil.rmtree(work / run_name, ignore_errors=True)
            shutil.copytree(work / f"inputs-{model}", work / run_name)
            cfg = load_config(
                CONFIG_DIR / PRESET[model],
                base + [f"run_name={run_name}", f"finetune.num_workers={n}", f"finetune.cpus_per_worker={cpus}"],
            )
            load = os.getloadavg()[0]
            t0 = time.time()
            s = finetune.run(cfg, force=True)
            wall = time.time() - t0
            steady = s["log"][1:] or s["log"]
            rec = {
                "model": model,
                "layout": layout,
                "workers": n,
                "cpus_per_worker": cpus,
                "torch_threads": s["torch_threads"],
                "per_worker_batch": args.batch,
                "global_batch": s["global_batch"],
                "steps": s["steps"],
                "tokens": s["tokens"],
                "train_seconds": s["train_seconds"],
                "tokens_per_s": s["tokens_per_s"],
                "steady_tokens_per_s": sum(e["tokens"] for e in steady) / sum(e["seconds"] for e in steady),
                "step_seconds": s["train_seconds"] / max(s["steps"], 1),
                "wall_seconds": wall,
                "loadavg_1m_at_start": load,
                "loadavg_1m_at_end": os.getloadavg()[0],
                "loss_first": s["log"][0]["loss"],
                "loss_last": s["log"][-1]["loss"],
            }
            results.append(rec)
            print(json.dumps(rec), flush=True)
            # Written after every configuration: a run cut short keeps what it measured.
            out.write_text(json.dumps({"cpus": args.cpus, "nproc": os.cpu_count(), "results": results}, indent=1))
    for model in args.models:
        got = {r["layout"]: r for r in results if r["model"] == model}
        for one in ("1x1", "1x2"):
            if one in got and "2x1" in got:
                print(
                    f"{model}: 2x1 / {one} steady tokens/s = "
                    f"{got['2x1']['steady_tokens_per_s'] / got[one]['steady_tokens_per_s']:.2f}x, wall = "
                    f"{got['2x1']['wall_seconds'] / got[one]['wall_seconds']:.2f}x"
                )


if __name__ == "__main__":
    main()
