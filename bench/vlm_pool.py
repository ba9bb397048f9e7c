"""What the VLM costs per query, where the time goes, and trie decoding vs the candidate pool
(``vlm.sequential_pool``) on the same sequential queries (issue 33 item 3).

    python -m bench.vlm_pool --config configs/quickstart.yaml [--pool 20] [--queries 40]
        [--batch 4] [--tasks sequential,direct,ctr] [--reuse on|off|both] [key=value ...]

In-process, on a finished run (``finetune`` and ``planner`` stages committed), ``score.mode=vlm_tools``
so every query is answered by the VLM with the tools' answers shown (the high tier): the router
routes ``--queries`` queries per task (``score.split``), then the run's :class:`VLMAnswerer`
answers them, ``--batch`` at a time:

* sequential by constrained beam search over the catalog trie, and the same queries by scoring the
  candidate pool (the union of the consulted tools' top ``--pool``), HR@5 / NDCG@5 of both against
  the held-out item, beside the primary tool's own HR@5 and the pool's recall (its ceiling);
* direct and CTR the run's usual way.

Per task: seconds per query, the share spent writing the thought, tokens pushed through the
language model per second (every forward counted by a hook: prefill, thought and beam steps)
and prompt tokens per second, against the forward bound measured in the same process: one batched
no-grad forward over the same prompts. Also, for the cheaper-path questions: the prompt prefix
the batch's rows share (what a per-batch prefix cache could skip) and the longest input of a beam
step (1 = the KV cache is reused across steps).

``--reuse both``: every task is answered with the answer step reusing the thought's KV cache
(``vlm.reuse_thought_cache``) and without, interleaved off / on / on / off in one process; the
cost table has a row per setting (means of its two runs), the answers of all runs are compared
(same items / yes-no / text; largest score difference), and the ratio off / on is printed.

Writes ``{run}/bench_vlm_pool.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from bench.report import markdown_table
from ray_jobs.score import score_queries
from reasonrec.config import load_config
from reasonrec.io import open_store
from reasonrec.metrics import hit_at_k, ndcg_at_k
from reasonrec.scoring import VLMAnswerer, build_router, build_vlm_answerer

K = 5


class ForwardMeter:
    """Counts what goes through the language model, via a forward hook (no change to the model):
    calls, input tokens (rows x positions), and the calls that feed one position per row (decode
    steps that reuse the KV cache) vs more (prefills)."""

    def __init__(self, language_model: torch.nn.Module):
        self.reset()
        self._handle = language_model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs, _out):
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        self.tokens += int(x.shape[0] * x.shape[1])
        if x.shape[1] == 1:
            self.decode_calls += 1
        else:
            self.prefill_calls += 1

    def reset(self) -> None:
        self.decode_calls = self.prefill_calls = self.tokens = 0


class ThoughtTimer:
    """Wraps ``predictor.thoughts`` to add up the seconds spent writing thoughts."""

    def __init__(self, predictor):
        self.seconds, self._inner = 0.0, predictor.thoughts
        predictor.thoughts = self

    def __call__(self, examples, **kwargs):
        t0 = time.perf_counter()
        out = self._inner(examples, **kwargs)
        self.seconds += time.perf_counter() - t0
        return out


def prompt_batches(answerer: VLMAnswerer, task: str, rows: list[dict], batch: int) -> list[list[dict]]:
    return [answerer.examples(task, rows[lo : lo + batch])[0] for lo in range(0, len(rows), batch)]


def prompt_stats(answerer: VLMAnswerer, batches: list[list[dict]]) -> dict:
    """Prompt tokens per query and the leading tokens all rows of a batch share."""
    coll, lengths, shared = answerer.predictor.collator, [], []
    for b in batches:
        ids = [coll.encode(ex, with_target=False).input_ids for ex in b]
        lengths += [len(s) for s in ids]
        n = 0
        while all(len(s) > n and s[n] == ids[0][n] for s in ids):
            n += 1
        shared += [n] * len(b)
    return {
        "prompt_tokens": int(sum(lengths)),
        "mean_prompt": float(np.mean(lengths)),
        "shared_prefix": float(np.mean(shared)),
    }


@torch.no_grad()
def forward_bound(answerer: VLMAnswerer, batches: list[list[dict]]) -> dict:
    """Prompt tokens/s of plain batched forwards (prefill with photos) over the same prompts."""
    p = answerer.predictor
    t0 = time.perf_counter()
    for b in batches:
        batch = p._prompts(b)
        mask = batch["attention_mask"]
        p.model(inputs_embeds=p._embed(batch), attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    seconds = time.perf_counter() - t0
    tokens = prompt_stats(answerer, batches)["prompt_tokens"]
    return {"seconds": seconds, "tokens_per_s": tokens / seconds}


def run_task(answerer: VLMAnswerer, routed: pa.Table, meter: ForwardMeter, timer: ThoughtTimer) -> tuple[list, dict]:
    meter.reset()
    timer.seconds = 0.0
    t0 = time.perf_counter()
    out = answerer(routed).to_pylist()
    seconds = time.perf_counter() - t0
    n = routed.num_rows
    return out, {
        "queries": n,
        "s_per_query": seconds / n,
        "thought_share": timer.seconds / seconds,
        "prefills_per_query": meter.prefill_calls / n,
        "decode_steps_per_query": meter.decode_calls / n,
        "lm_tokens_per_s": meter.tokens / seconds,
        "lm_tokens_per_query": meter.tokens / n,
    }


def set_reuse(answerer: VLMAnswerer, on: bool) -> None:
    p = answerer.predictor
    p.cfg = replace(p.cfg, reuse_thought_cache=on)


def answer_diff(a: list, b: list) -> dict:
    """How far two runs' answers to the same rows are apart: rows whose items / yes-no / text /
    thought differ, and the largest absolute difference of P(yes) or of the token confidence
    (sequential: the top item's probability; direct: its softmax share; CTR: max(p, 1 - p))."""
    differ, gap = 0, 0.0
    for x, y in zip(a, b):
        differ += (x["items"], x["text"], x["thought"]) != (y["items"], y["text"], y["thought"])
        for key in ("prob", "conf_token"):
            if isinstance(x.get(key), float) and isinstance(y.get(key), float):
                gap = max(gap, abs(x[key] - y[key]))
    return {"rows_differ": differ, "max_abs_prob_diff": gap}


def ranking_quality(rows: list[dict], targets: list[int], key: str) -> dict:
    ranks = np.array([list(r[key][:K]).index(t) if t in (r[key] or [])[:K] else K for r, t in zip(rows, targets)])
    return {f"hr@{K}": float(hit_at_k(ranks, K).mean()), f"ndcg@{K}": float(ndcg_at_k(ranks, K).mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--pool", type=int, default=20, help="vlm.sequential_pool of the pool answerer")
    ap.add_argument("--queries", type=int, default=40, help="queries per task")
    ap.add_argument("--batch", type=int, default=4, help="queries per VLM call")
    ap.add_argument("--tasks", default="sequential,direct,ctr", help="comma list of the tasks to measure")
    ap.add_argument(
        "--reuse", choices=("on", "off", "both"), default="on", help="vlm.reuse_thought_cache; both: off/on/on/off"
    )
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_config(a.config, list(a.overrides) + ["score.mode=vlm_tools", f"score.vlm_batch_size={a.batch}"])
    store = open_store(cfg)
    split = cfg.score.split
    torch.manual_seed(cfg.seed)
    queries = score_queries(cfg, store)
    router, trie = build_router(cfg, store, split), build_vlm_answerer(cfg, store, split, a.batch)
    pool = VLMAnswerer(trie.predictor, trie.prompts, trie.users, trie.catalog, trie.k, split, a.batch, False, a.pool)
    meter = ForwardMeter(trie.predictor.model.model.language_model)
    timer = ThoughtTimer(trie.predictor)
    env = {"cpu_threads": torch.get_num_threads(), "load_avg_1m_start": os.getloadavg()[0]}
    rows, quality, costs, reuse_check = [], {}, {}, {}
    for task in a.tasks.split(","):
        q = queries.filter(pc.equal(queries.column("task"), task)).slice(0, a.queries)
        if q.num_rows == 0:
            continue
        routed = router(q)
        batches = prompt_batches(trie, task, routed.to_pylist(), a.batch)
        bound, stats = forward_bound(trie, batches), prompt_stats(trie, batches)
        variants = (
            {task: trie} if task != "sequential" else {"sequential (trie)": trie, f"sequential (pool {a.pool})": pool}
        )
        for name, answerer in variants.items():
            if a.reuse == "both":
                runs: dict[bool, list] = {False: [], True: []}
                for on in (False, True, True, False):
                    set_reuse(answerer, on)
                    runs[on].append(run_task(answerer, routed, meter, timer))
                base = runs[False][0][0]
                diffs = [answer_diff(base, o) for o, _ in runs[False][1:] + runs[True]]
                off_s = [c["s_per_query"] for _, c in runs[False]]
                on_s = [c["s_per_query"] for _, c in runs[True]]
                reuse_check[name] = {
                    "rows_differ": max(d["rows_differ"] for d in diffs),
                    "max_abs_prob_diff": max(d["max_abs_prob_diff"] for d in diffs),
                    "s_per_query_off_runs": off_s,
                    "s_per_query_on_runs": on_s,
                    "ratio_off_on": float(np.mean(off_s) / np.mean(on_s)),
                }
                settings = {f"{name}, reuse off": runs[False], f"{name}, reuse on": runs[True]}
            else:
                set_reuse(answerer, a.reuse == "on")
                settings = {name: [run_task(answerer, routed, meter, timer)]}
            for label, done in settings.items():
                out = done[0][0]
                cost = {k: float(np.mean([c[k] for _, c in done])) for k in done[0][1]}
                cost.update(
                    queries=done[0][1]["queries"],
                    prompt_tokens_per_s=stats["prompt_tokens"] / (cost["s_per_query"] * done[0][1]["queries"]),
                    bound_tokens_per_s=bound["tokens_per_s"],
                    mean_prompt_tokens=stats["mean_prompt"],
                    shared_prefix_tokens=stats["shared_prefix"],
                )
                costs[label] = cost
                rows.append({"task": label, **{k: round(v, 4) if isinstance(v, float) else v for k, v in cost.items()}})
            if task == "sequential":
                targets = routed.column("target").to_pylist()
                quality[name] = ranking_quality(out, targets, "items")
                if name.endswith("(trie)"):
                    quality["primary tool"] = ranking_quality(out, targets, "tool_items")
                    recall = [t in pool.sequential_pool(r) for r, t in zip(routed.to_pylist(), targets)]
                    quality[f"pool recall (target in pool {a.pool})"] = {f"hr@{K}": float(np.mean(recall))}
                    sizes = [len(pool.sequential_pool(r)) for r in routed.to_pylist()]
                    quality["mean pool size"] = {f"hr@{K}": float(np.mean(sizes))}
    env["load_avg_1m_end"] = os.getloadavg()[0]
    print(f"\ncost per query ({cfg.vlm.model}, batch {a.batch}, {env}):\n")
    print(markdown_table(rows, list(rows[0])))
    qrows = [{"ranking": k, **{m: round(v, 4) for m, v in d.items()}} for k, d in quality.items()]
    n_seq = next((c["queries"] for k, c in costs.items() if k.startswith("sequential (trie)")), 0)
    if n_seq:
        print(f"\nsequential, same {n_seq} queries ({split}, full catalog, leave-one-out):\n")
        print(markdown_table([{f"ndcg@{K}": "", **q} for q in qrows], ["ranking", f"hr@{K}", f"ndcg@{K}"]))
    if reuse_check:
        print(
            "\nreuse of the thought's KV cache, runs off / on / on / off: rows whose answer differs from the"
            " first run's, the largest probability difference, s/query, ratio off / on:\n"
        )
        check = [
            {"task": k, **{m: str(v) if isinstance(v, list) else v for m, v in d.items()}}
            for k, d in reuse_check.items()
        ]
        print(markdown_table(check, list(check[0])))
    result = {
        "pool": a.pool,
        "batch": a.batch,
        "reuse": a.reuse,
        "env": env,
        "cost": costs,
        "quality": quality,
        "reuse_check": reuse_check,
    }
    with store.fs.open(store.path("bench_vlm_pool.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
