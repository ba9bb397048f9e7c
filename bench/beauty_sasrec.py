"""Amazon Beauty (5-core, P5 indexing) full-ranking benchmark for the sequential tools.

Protocol (RecBole-style): leave-one-out per user (last item = test, second last = valid, the
rest = train); the model is early-stopped on validation NDCG@10 over the training histories, then
scores the whole catalog for each user from train + valid history; the test item is ranked among
ALL items (history not excluded -- RecBole's default). ``--also-exclude`` additionally reports the
ranking with the user's history removed (except the truth itself).

    python bench/beauty_sasrec.py --data <beauty bundle>   # SASRec with the tool defaults
    python bench/beauty_sasrec.py --tool lightsans --set max_epochs=100
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
import torch

from reasonrec.metrics import rank_full_catalog, ranking_metrics
from reasonrec.tools import ToolData, tool_class

# The Beauty P5 bundle: --data, else $REASONREC_BEAUTY, else the Beauty preset's default path.
DATA_DIR = os.environ.get("REASONREC_BEAUTY", "data/amazon_beauty")


def load_beauty(path: str = f"{DATA_DIR}/sequential_data.txt") -> tuple[ToolData, list[np.ndarray]]:
    """ToolData (train histories, valid/test items; 0-based item ids) and the full sequences."""
    full = []
    with open(path) as f:
        for line in f:
            ids = line.split()
            if ids:
                full.append(np.asarray(ids[1:], dtype=np.int64) - 1)
    n_items = int(max(s.max() for s in full)) + 1
    n_users = len(full)
    train = [s[:-2] if len(s) >= 3 else s[:0] for s in full]
    valid = np.array([s[-2] if len(s) >= 3 else -1 for s in full], dtype=np.int64)
    test = np.array([s[-1] if len(s) >= 3 else -1 for s in full], dtype=np.int64)
    return ToolData(n_users=n_users, n_items=n_items, train_seqs=train, valid_item=valid, test_item=test), full


def evaluate_test(tool, data: ToolData, exclude_history: bool, batch: int = 1024) -> dict[str, float]:
    users = np.flatnonzero(data.test_item >= 0)
    ranks = []
    for start in range(0, len(users), batch):
        ub = users[start : start + batch]
        hist = [np.append(data.train_seqs[u], data.valid_item[u]) for u in ub]
        scores = tool.score_items(ub, hist)
        ranks.append(rank_full_catalog(scores, data.test_item[ub], exclude=hist if exclude_history else None))
    return ranking_metrics(np.concatenate(ranks), (5, 10, 20))


def parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DATA_DIR, help="the Beauty P5 bundle's folder")
    ap.add_argument("--tool", default="sasrec")
    ap.add_argument("--set", nargs="*", default=[], help="tool params as key=value (JSON values)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--also-exclude", action="store_true", help="also report with history excluded")
    ap.add_argument("--save", default=None, help="save the trained tool to this folder")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    params = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in args.set)}

    t0 = time.time()
    data, _ = load_beauty(f"{args.data}/sequential_data.txt")
    print(
        f"Beauty: {data.n_users} users, {data.n_items} items, "
        f"{sum(len(s) for s in data.train_seqs)} train interactions ({time.time() - t0:.1f}s to load)"
    )
    tool = tool_class(args.tool)(params)
    t1 = time.time()
    best = tool.fit(data)
    train_s = time.time() - t1
    res = tool.result
    print(
        f"trained {res.epochs_run} epochs in {train_s:.0f}s ({res.stopped}); best epoch {res.best_epoch}; "
        f"valid {json.dumps({k: round(v, 4) for k, v in best.items() if '@' in k})}"
    )
    out = {
        "tool": args.tool,
        "params": tool.hp if hasattr(tool, "hp") else params,
        "train_seconds": round(train_s, 1),
        "epochs": res.epochs_run,
        "best_epoch": res.best_epoch,
        "valid": best,
    }
    t2 = time.time()
    out["test_all_items"] = evaluate_test(tool, data, exclude_history=False)
    if args.also_exclude:
        out["test_exclude_history"] = evaluate_test(tool, data, exclude_history=True)
    out["eval_seconds"] = round(time.time() - t2, 1)
    out["total_seconds"] = round(time.time() - t0, 1)
    for key in ("test_all_items", "test_exclude_history"):
        if key in out:
            print(key, " ".join(f"{k} {v:.4f}" for k, v in out[key].items()))
    print(json.dumps(out, default=str))
    if args.save:
        from reasonrec.tools.persist import save_tool

        save_tool(tool, args.save)


if __name__ == "__main__":
    main()
