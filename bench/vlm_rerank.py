"""Does the fine-tuned VLM know more than the tool it is shown? (issue 4 item 9, sequential)

    python -m bench.vlm_rerank --config configs/synthetic_small.yaml [--tool sasrec] [--pool 20]
        [--splits valid,test] [key=value ...]

For every sequential query of the run (``score.queries_path`` picks the users, e.g. the file
``bench.cold_queries`` writes) this builds the prompt the VLM answers under ``score.mode=vlm_tools``
(the planner's tools' answers shown), writes the VLM's greedy thought, and then, as direct
recommendation scores its candidates, the VLM's answer log-likelihood of each of ``--tool``'s top
``--pool`` items (from the ``train_tools`` stage's predictions). Ranked by that likelihood, the tool's
top n (n = 5, 10, pool) is then scored against the tool's own order: where the VLM knows something
the tool does not, some n beats the tool; where it does not, none does. ``valid`` scores the same
users' second-to-last items (history up to them), so a pool size can be chosen without the test
set; HR@5 / NDCG@5, full-catalog leave-one-out, history kept, and per n the users only one side
hits with McNemar's exact p against the tool.

On a single synthetic source two reference rows show how much the world lets any model get: the
true next-item distribution given the user's true taste (``oracle_next_item_scores``), and
first-order transition counts over every user's sequence before the scored item.

Writes the table and the per-query likelihoods to ``{run}/bench_vlm_rerank.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench.report import markdown_table
from bench.vlm_vs_tools import PAIRED_K, paired
from ray_jobs.score import score_queries
from reasonrec.config import load_config
from reasonrec.data.sources.synthetic import item_key, oracle_next_item_scores, user_key
from reasonrec.io import open_store
from reasonrec.metrics import hit_at_k, ndcg_at_k
from reasonrec.scoring import build_router, build_vlm_answerer

SPLIT_TARGET = {"valid": "valid_item", "test": "test_item"}


def rank_hit(order, target, k: int = PAIRED_K) -> tuple[bool, float]:
    """HR@k hit and NDCG@k gain of one ranked list."""
    top = list(order[:k])
    rank = top.index(target) if target in top else k  # k: outside the top k
    return bool(hit_at_k(rank, k)), float(ndcg_at_k(rank, k))


def reranked(rec: dict, n: int) -> list[int]:
    """The tool's top ``n`` ordered by the VLM's likelihood (ties keep the tool's order)."""
    return [rec["tool_items"][i] for i in np.argsort(-np.asarray(rec["vlm_logprob"][:n]), kind="stable")]


def split_queries(queries: pa.Table, loo: dict, split: str) -> pa.Table:
    """The sequential queries of users with a ``split`` item, that item as the target."""
    q = queries.filter(pc.equal(queries.column("task"), "sequential"))
    keep = [loo.get(u, {}).get(SPLIT_TARGET[split]) is not None for u in q.column("user_id").to_pylist()]
    q = q.filter(pa.array(keep))
    target = pa.array([loo[u][SPLIT_TARGET[split]] for u in q.column("user_id").to_pylist()], pa.int64())
    return q.set_column(q.schema.get_field_index("target"), "target", target)


def vlm_likelihoods(
    cfg, store, queries: pa.Table, split: str, tool_items: dict, pool: int, log_every: int = 20
) -> list[dict]:
    """Per query: the tool's top ``pool`` and the VLM's answer log-likelihood of each, after its thought."""
    router, answerer = build_router(cfg, store, split), build_vlm_answerer(cfg, store, split)
    routed = router(queries).to_pylist()
    p, out, t0 = answerer.predictor, [], time.time()
    for lo in range(0, len(routed), answerer.batch_size):
        rows = routed[lo : lo + answerer.batch_size]
        examples, _ = answerer.examples("sequential", rows)
        thoughts = p.thoughts(examples)
        cands = [tool_items[r["user_id"]][:pool] for r in rows]
        res = p.score_candidates(
            examples,
            [[answerer.catalog.text[c] for c in cs] for cs in cands],
            cands,
            thoughts=thoughts,
            candidate_prior=[answerer.prior[cs] for cs in cands],
        )
        for r, cs, o, th in zip(rows, cands, res, thoughts):
            lp = dict(zip(o.items, o.scores))
            out.append(
                {
                    "split": split,
                    "user_id": r["user_id"],
                    "target": r["target"],
                    "tool_items": cs,
                    "vlm_logprob": [lp[c] for c in cs],
                    "thought": th,
                }
            )
        if len(out) % log_every < len(rows) or len(out) == len(routed):
            print(f"{split}: {len(out)}/{len(routed)} queries, {time.time() - t0:.0f} s", flush=True)
    return out


def synthetic_references(cfg, store, loo: dict, records: list[dict], split: str) -> dict[str, dict[int, list[int]]]:
    """Top-K lists per user of the two reference models (empty unless the run reads one synthetic source)."""
    srcs = cfg.data.sources
    if len(srcs) != 1 or srcs[0].kind != "synthetic":
        return {}
    syn = srcs[0].synthetic
    items = store.read_table("prepare", "items", columns=["item_id", "item_key"]).to_pylist()
    users = store.read_table("prepare", "users", columns=["user_id", "user_key"]).to_pylist()
    prepared = {r["item_key"]: r["item_id"] for r in items}
    to_prep = np.array([prepared.get(item_key(syn, i), -1) for i in range(syn.n_items)])
    to_raw = {v: i for i, v in enumerate(to_prep.tolist())}
    raw_user = {user_key(syn, u): u for u in range(syn.n_users)}
    user_raw = {r["user_id"]: raw_user[r["user_key"]] for r in users}
    # Counting transitions is a few lines; a library model would hide what the row measures.
    n = int(to_prep.max()) + 1
    trans, pop = np.zeros((n, n)), np.zeros(n)
    for r in loo.values():
        seq = list(r["train_items"]) + ([r["valid_item"]] if split == "test" and r["valid_item"] is not None else [])
        pop += np.bincount(seq, minlength=n)
        np.add.at(trans, (seq[:-1], seq[1:]), 1)
    out = {"oracle (true taste)": {}, "first-order transition counts": {}}
    for rec in records:
        r = loo[rec["user_id"]]
        hist = list(r["train_items"]) + ([r["valid_item"]] if split == "test" else [])
        p = oracle_next_item_scores(syn, [to_raw[i] for i in hist], user_raw[rec["user_id"]])
        out["oracle (true taste)"][rec["user_id"]] = to_prep[np.argsort(-p, kind="stable")[:PAIRED_K]].tolist()
        out["first-order transition counts"][rec["user_id"]] = np.argsort(
            -(trans[hist[-1]] + 1e-3 * pop), kind="stable"
        )[:PAIRED_K].tolist()
    return out


def table(records: list[dict], tool: str, pool: int, references: dict) -> list[dict]:
    """One row per ranking (the tool's order, the VLM's reranks, the references): hits, HR@K and
    NDCG@K, and against the tool's own order the users only it / only the tool hits, McNemar's p."""
    lists = {f"{tool} (its own order)": {r["user_id"]: r["tool_items"] for r in records}}
    for n in sorted({PAIRED_K, 10, pool} & set(range(PAIRED_K, pool + 1))):
        lists[f"VLM reranks {tool}'s top {n}"] = {r["user_id"]: reranked(r, n) for r in records}
    lists.update(references)
    target = {r["user_id"]: r["target"] for r in records}
    hits = {name: {u: rank_hit(order, target[u]) for u, order in by_user.items()} for name, by_user in lists.items()}
    tool_hits = {tool: {u: h for u, (h, _) in hits[f"{tool} (its own order)"].items()}}
    rows = []
    for name, by_user in hits.items():
        vs = paired({u: h for u, (h, _) in by_user.items()}, tool_hits)[0]
        rows.append(
            {
                "model": name,
                "queries": len(by_user),
                "hits": sum(h for h, _ in by_user.values()),
                f"hr@{PAIRED_K}": round(float(np.mean([h for h, _ in by_user.values()])), 4),
                f"ndcg@{PAIRED_K}": round(float(np.mean([g for _, g in by_user.values()])), 4),
                "only_it": vs["only_vlm"],
                f"only_{tool}": vs["only_tool"],
                "p_mcnemar": round(vs["p_mcnemar"], 4),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/synthetic_small.yaml")
    ap.add_argument("--tool", default="sasrec", help="whose top list the VLM reranks")
    ap.add_argument("--pool", type=int, default=20, help="how many of the tool's items the VLM scores")
    ap.add_argument("--splits", default="valid,test")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    cfg = load_config(a.config, list(a.overrides) + ["score.mode=vlm_tools"])
    store = open_store(cfg)
    loo = {r["user_id"]: r for r in store.read_table("prepare", "loo").to_pylist()}
    preds = store.read_table("train_tools", "predictions")
    preds = preds.filter(pc.equal(preds.column("tool"), a.tool))
    if preds.num_rows == 0:
        raise SystemExit(f"--tool {a.tool}: no predictions in the run's train_tools stage")
    queries = score_queries(cfg, store)
    result = {"tool": a.tool, "pool": a.pool, "splits": {}}
    for split in a.splits.split(","):
        mine = preds.filter(pc.equal(preds.column("split"), split)).to_pylist()
        tool_items = {r["user_id"]: r["items"] for r in mine}
        if mine and len(mine[0]["items"]) < a.pool:
            raise SystemExit(f"--pool {a.pool}: the tool's predictions keep {len(mine[0]['items'])} items")
        records = vlm_likelihoods(cfg, store, split_queries(queries, loo, split), split, tool_items, a.pool)
        rows = table(records, a.tool, a.pool, synthetic_references(cfg, store, loo, records, split))
        print(f"\n{split} ({len(records)} sequential queries, full-catalog ranking, leave-one-out):\n")
        print(markdown_table(rows, list(rows[0])))
        result["splits"][split] = {"rows": rows, "records": records}
    with store.fs.open(store.path("bench_vlm_rerank.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
