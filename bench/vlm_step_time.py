"""Measure VLM build time, LoRA train-step time and inference latency on this machine.

    python bench/vlm_step_time.py --model tiny --threads 2
    python bench/vlm_step_time.py --model small --threads 2 --batch 4 --history 10
    python bench/vlm_step_time.py --model small --autocast none,bfloat16 --steps 4

Prints one JSON line. ``--autocast`` lists training precisions (``finetune.autocast`` values);
their steps alternate (one step of each per round) so a load change on a shared machine hits
all of them alike, and the line carries each one's median step time and its ratio to the first.

Inputs are rendered with the real templates (sequential task, history
items with photos) so token counts match what the fine-tune job sees.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from reasonrec.prompts.cot import compose_target  # noqa: E402
from reasonrec.prompts.templates import ItemRef, PromptInputs, RenderOptions, render_prompt  # noqa: E402
from reasonrec.vlm.builder import build_vlm, trainable_parameters  # noqa: E402
from reasonrec.vlm.collate import VLMCollator  # noqa: E402
from reasonrec.vlm.config import VLMConfig  # noqa: E402
from reasonrec.vlm.infer import ItemTrie, VLMPredictor  # noqa: E402
from reasonrec.vlm.train import native_bf16, training_autocast  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--history", type=int, default=10)
    ap.add_argument("--photos", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="training steps per precision")
    ap.add_argument("--autocast", default="none", help="comma-separated finetune.autocast values")
    ap.add_argument("--catalog", type=int, default=2000)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--beauty-items", default=None, help="items.jsonl of Amazon Beauty: use its titles as the catalog")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    words = "rose lip tint volume mascara nail polish red shimmer face cream argan oil matte gloss serum".split()
    titles = [
        " ".join(rng.choice(words, size=rng.integers(3, 7))) + f" {chr(97 + i % 26)}{i // 26}"
        for i in range(args.catalog)
    ]
    if args.beauty_items:
        with open(args.beauty_items) as f:
            titles = [json.loads(line)["title_words"] for line in f]
        args.catalog = len(titles)

    # Import the lazily loaded model classes first: build_s is the build, not transformers' imports.
    from peft import get_peft_model  # noqa: F401
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration  # noqa: F401

    t = time.perf_counter()
    bundle = build_vlm(VLMConfig(model=args.model, cache_dir=args.cache_dir))
    build_s = time.perf_counter() - t
    bundle.model.to(args.device)
    col = VLMCollator(bundle)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    examples = []
    for u in range(args.batch):
        hist = [ItemRef(int(i), titles[i]) for i in rng.choice(args.catalog, args.history, replace=False)]
        r = render_prompt(
            "sequential",
            PromptInputs(u, "likes Nail Polish; brand OPI; mid-range prices", hist, 0.8, "high"),
            u % 10,
            RenderOptions(max_history_photos=args.photos),
        )
        examples.append(
            {
                "prompt": r.text,
                "images": [img] * len(r.image_items),
                "target": compose_target("sequential", titles[u], 0.4, "high", 0.8, ["sasrec"]),
            }
        )
    batch = col(examples)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    opt = torch.optim.AdamW([p for p in bundle.model.parameters() if p.requires_grad], lr=1e-4)
    bundle.model.train()
    modes = args.autocast.split(",")
    times = {m: [] for m in modes}
    for _ in range(args.steps):
        for mode in modes:
            t = time.perf_counter()
            with training_autocast(args.device, mode):
                out = bundle.model(**batch)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            times[mode].append(time.perf_counter() - t)
    median = {m: float(np.median(ts[1:] or ts)) for m, ts in times.items()}
    bundle.model.eval()
    pred = VLMPredictor(bundle)
    t = time.perf_counter()
    trie = ItemTrie(bundle.tokenizer, titles)
    trie_s = time.perf_counter() - t
    t = time.perf_counter()
    res = pred.rank_catalog([{k: v for k, v in examples[0].items() if k != "target"}], trie, k=10)
    rank_s = time.perf_counter() - t
    trainable, total = trainable_parameters(bundle)
    print(
        json.dumps(
            {
                "model": args.model,
                "threads": args.threads,
                "build_s": round(build_s, 2),
                "batch": args.batch,
                "seq_len": int(batch["input_ids"].shape[1]),
                "images": int(batch["pixel_values"].shape[0]),
                "step_s_first": {m: round(ts[0], 3) for m, ts in times.items()},
                "step_s_median": {m: round(v, 3) for m, v in median.items()},
                "speedup_vs_first": {m: round(median[modes[0]] / v, 3) for m, v in median.items()},
                "loss": round(float(out.loss.detach()), 3),
                "trainable": trainable,
                "total": total,
                "trie_build_s": round(trie_s, 2),
                "catalog": args.catalog,
                "trie_depth": trie.depth,
                "rank_catalog_s_per_user": round(rank_s, 2),
                "top": res[0].items[:3],
                "device": args.device,
                "native_bf16": native_bf16(args.device),
            }
        )
    )


if __name__ == "__main__":
    main()
