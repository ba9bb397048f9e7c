"""Amazon Beauty (5-core, P5 indexing) benchmark for the direct and CTR tools.

Direct (paper Table 1 protocol): leave-one-out per user (last item test, second last valid, rest
train); the test item is ranked among itself + 99 items the user never interacted with (sampled
uniformly, seeded); HR@5 / NDCG@5 (ties pessimistic). Early stopping on the same protocol over the
valid item (the tool's own candidate lists, a different seed).

CTR (paper Table 2 protocol): each user's distinct items split 8:1:1 at random (seeded); each
positive gets 4 never-interacted negatives in its split; AUC / LogLoss on test, early stopping on
valid AUC. The CTR tools' histories are the user's CTR-train positives only (in time order), so no
valid/test positive is ever a feature.

Side features: brand = first attribute when it is not a category name (and not "Unknown");
category = the most specific category (last attribute), from items.jsonl.

    python bench/beauty_direct_ctr.py --data <beauty bundle> --tools bpr_mf
    python bench/beauty_direct_ctr.py --tools dlrm,dcnv2 --set dlrm.max_epochs=10
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
import torch

from reasonrec.metrics import auc, log_loss, rank_in_candidates, ranking_metrics
from reasonrec.tools import ToolData, tool_class

# The Beauty P5 bundle: --data, else $REASONREC_BEAUTY, else the Beauty preset's default path.
ROOT = os.environ.get("REASONREC_BEAUTY", "data/amazon_beauty")
CTR_TOOLS = ("dlrm", "dcnv2", "xdeepfm", "xgb_ctr")


def load_sequences(path: str = f"{ROOT}/sequential_data.txt") -> list[np.ndarray]:
    seqs = []
    with open(path) as f:
        for line in f:
            ids = line.split()
            if ids:
                assert int(ids[0]) == len(seqs) + 1, "users must be listed in id order"
                seqs.append(np.asarray(ids[1:], dtype=np.int64) - 1)  # 1-based -> 0-based
    return seqs


def load_side(n_items: int, path: str = f"{ROOT}/items.jsonl") -> tuple[np.ndarray, np.ndarray]:
    attrs: list[list[str]] = [[] for _ in range(n_items)]
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            attrs[int(row["item_id"]) - 1] = list(row["attributes"])
    cat_names = {a for at in attrs for a in at[1:]}  # category names appear after the brand
    cat_vocab: dict[str, int] = {}
    brand_vocab: dict[str, int] = {}
    cat = np.full(n_items, -1, np.int64)
    brand = np.full(n_items, -1, np.int64)
    for i, at in enumerate(attrs):
        if at and at[0] not in cat_names and at[0] != "Unknown":
            brand[i] = brand_vocab.setdefault(at[0], len(brand_vocab))
        cats = [a for a in at if a in cat_names]
        if cats:
            cat[i] = cat_vocab.setdefault(cats[-1], len(cat_vocab))
    return cat, brand


def never_seen_negatives(rng: np.random.Generator, n_items: int, seen: np.ndarray, k: int) -> np.ndarray:
    out = np.empty(0, np.int64)
    while len(out) < k:
        d = rng.integers(0, n_items, 2 * k)
        out = np.unique(np.concatenate([out, d[~np.isin(d, seen)]]))
    return rng.permutation(out)[:k]


def direct_setup(seqs, cat, brand, seed: int):
    n_items = int(max(s.max() for s in seqs)) + 1
    data = ToolData(
        n_users=len(seqs),
        n_items=n_items,
        train_seqs=[s[:-2] for s in seqs],
        valid_item=np.array([s[-2] for s in seqs]),
        test_item=np.array([s[-1] for s in seqs]),
        item_category=cat,
        item_brand=brand,
    )
    rng = np.random.default_rng([seed, 1])
    cands = np.stack(
        [rng.permutation(np.concatenate([[s[-1]], never_seen_negatives(rng, n_items, s, 99)])) for s in seqs]
    )
    return data, cands


def ctr_setup(seqs, cat, brand, seed: int, n_neg: int = 4):
    n_items = int(max(s.max() for s in seqs)) + 1
    rows = {k: ([], [], []) for k in ("train", "valid", "test")}
    train_hist = []
    for u, s in enumerate(seqs):
        rng = np.random.default_rng([seed, 2, u])
        pos = np.unique(s)
        order = rng.permutation(len(pos))
        n_v = max(1, int(round(0.1 * len(pos))))
        part = {"valid": pos[order[:n_v]], "test": pos[order[n_v : 2 * n_v]], "train": pos[order[2 * n_v :]]}
        negs = never_seen_negatives(rng, n_items, s, len(pos) * n_neg)
        at = 0
        for split in ("train", "valid", "test"):
            p = part[split]
            ng = negs[at : at + len(p) * n_neg]
            at += len(p) * n_neg
            rows[split][0].append(np.full(len(p) + len(ng), u, np.int64))
            rows[split][1].append(np.concatenate([p, ng]))
            rows[split][2].append(np.concatenate([np.ones(len(p), np.float32), np.zeros(len(ng), np.float32)]))
        train_hist.append(s[np.isin(s, part["train"])])  # time order kept
    ctr = {k: (np.concatenate(v[0]), np.concatenate(v[1]), np.concatenate(v[2])) for k, v in rows.items()}
    data = ToolData(
        n_users=len(seqs),
        n_items=n_items,
        train_seqs=train_hist,
        valid_item=np.full(len(seqs), -1),
        test_item=np.full(len(seqs), -1),
        item_category=cat,
        item_brand=brand,
        ctr=ctr,
    )
    return data


def parse_sets(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for kv in items:
        key, val = kv.split("=", 1)
        tool, param = key.split(".", 1)
        try:
            value = json.loads(val)
        except json.JSONDecodeError:
            value = val  # a bare string
        out.setdefault(tool, {})[param] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=ROOT, help="the Beauty P5 bundle's folder")
    ap.add_argument("--tools", default="bpr_mf,dlrm,dcnv2")
    ap.add_argument("--set", nargs="*", default=[], help="tool.param=value (JSON values)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    sets = parse_sets(args.set)

    t0 = time.time()
    seqs = load_sequences(f"{args.data}/sequential_data.txt")
    n_items = int(max(s.max() for s in seqs)) + 1
    n_inter = sum(len(s) for s in seqs)
    assert (len(seqs), n_items, n_inter) == (22363, 12101, 198502), (len(seqs), n_items, n_inter)
    cat, brand = load_side(n_items, f"{args.data}/items.jsonl")
    tools = [t for t in args.tools.split(",") if t]
    direct_data = cands = ctr_data = None
    print(
        json.dumps(
            {
                "load_s": round(time.time() - t0, 1),
                "users": len(seqs),
                "items": n_items,
                "interactions": n_inter,
                "categories": int(cat.max()) + 1,
                "brands": int(brand.max()) + 1,
            }
        ),
        flush=True,
    )
    results = []
    for name in tools:
        params = {"seed": args.seed, **sets.get(name, {})}
        tool = tool_class(name)(params)
        t1 = time.time()
        if name in CTR_TOOLS:
            if ctr_data is None:
                ctr_data = ctr_setup(seqs, cat, brand, args.seed)
                u, i, y = ctr_data.ctr["test"]  # context: item popularity alone
                print(
                    json.dumps(
                        {"baseline": "popularity", "task": "ctr", "test": {"auc": auc(y, ctr_data.item_popularity[i])}}
                    ),
                    flush=True,
                )
            valid = tool.fit(ctr_data)
            fit_s = time.time() - t1
            u, i, y = ctr_data.ctr["test"]
            p = tool.predict_ctr(u, i, [ctr_data.train_seqs[x] for x in u])
            test = {"auc": auc(y, p), "logloss": log_loss(y, p), "rows": int(len(y)), "positives": int(y.sum())}
        else:
            if direct_data is None:
                direct_data, cands = direct_setup(seqs, cat, brand, args.seed)
                pop_ranks = rank_in_candidates(direct_data.item_popularity[cands], cands, direct_data.test_item)
                print(
                    json.dumps(
                        {"baseline": "popularity", "task": "direct", "test": ranking_metrics(pop_ranks, (5, 10))}
                    ),
                    flush=True,
                )
            valid = tool.fit(direct_data)
            fit_s = time.time() - t1
            users = np.arange(direct_data.n_users)
            scores = np.concatenate(
                [
                    tool.score_candidates(
                        users[s : s + 2048],
                        [direct_data.train_seqs[x] for x in users[s : s + 2048]],
                        cands[s : s + 2048],
                    )
                    for s in range(0, len(users), 2048)
                ]
            )
            ranks = rank_in_candidates(scores, cands, direct_data.test_item)
            test = ranking_metrics(ranks, (5, 10))
        rec = {
            "tool": name,
            "params": params,
            "test": test,
            "valid": {k: v for k, v in valid.items() if k in ("auc", "logloss", "hr@5", "ndcg@5", "epoch")},
            "train_info": getattr(tool, "train_info", {}),
            "fit_s": round(fit_s, 1),
            "total_s": round(time.time() - t1, 1),
        }
        results.append(rec)
        print(json.dumps(rec), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
