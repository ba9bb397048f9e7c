"""evaluate: metrics tables for the tools (and later the whole system) on the test queries.

    python -m ray_jobs.evaluate --config configs/quickstart.yaml [key=value ...] [--force]

Protocols (stated next to every number):
* sequential: leave-one-out test item, ranked over the full catalog (history not excluded);
* direct: the test item among its candidate list (1 + ``data.direct_negatives`` sampled unseen items);
* ctr: the 8:1:1 per-user CTR test split with ``data.ctr_negatives`` sampled negatives per positive.

Every metric is reported overall and per segment: EH bucket (``eh:low|medium|high``) and the
paper's cold-start groups (ten equal-size user groups by training frequency, ``cs:1..10``, with
``cs:coldest`` = 1-3, ``cs:medium`` = 4-6, ``cs:normal`` = 1-10). Writes ``{run}/report/``:
``metrics.jsonl`` (one JSON object per number: task, model, protocol, metric, k, group, value, n)
and ``tools.md`` (readable tables).

The inputs read here are narrow integer columns of the test queries (a few bytes per query and
tool); the per-query work happened in the ``train_tools`` prediction actors.
"""
from __future__ import annotations

import json
import logging
import sys
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from reasonrec.config import RunConfig, parse_cli, section_hash
from reasonrec.io import ArtifactStore
from reasonrec.metrics import breakdown, breakdown_fn, cold_start_groups, ctr_metrics, hit_at_k, ndcg_at_k
from reasonrec.runtime import init_ray

STAGE = "report"
KS = (5, 10, 20)
log = logging.getLogger("reasonrec.evaluate")


def protocols(cfg: RunConfig) -> dict[str, str]:
    return {
        "sequential": "full-catalog ranking, leave-one-out test item",
        "direct": f"1 positive + {cfg.data.direct_negatives} sampled negatives, leave-one-out test item",
        "ctr": f"8:1:1 per-user split, {cfg.data.ctr_negatives} negatives per positive (test split)",
    }


def _read(store: ArtifactStore, stage: str, name: str, columns: list[str], split: str = "test"):
    ds = pads.dataset(store.path(stage, name), filesystem=store.arrow_fs, format="parquet")
    return ds.to_table(columns=columns, filter=pc.field("split") == split)


def _segments(users, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """EH bucket and cold-start group per query (groups are computed over the evaluated users)."""
    uid = users.column("user_id").to_numpy()
    pos = np.full(int(uid.max()) + 1, -1, np.int64)
    pos[uid] = np.arange(len(uid))
    idx = pos[user_ids]
    buckets = users.column("eh_bucket").to_numpy(zero_copy_only=False)[idx]
    n_train = users.column("n_train").to_numpy()
    evaluated = np.unique(user_ids)
    groups_of_evaluated = cold_start_groups(n_train[pos[evaluated]])
    group_by_user = dict(zip(evaluated.tolist(), groups_of_evaluated.tolist()))
    groups = np.array([group_by_user[u] for u in user_ids.tolist()], dtype=np.int64)
    return buckets, groups


def _records(task: str, model: str, protocol: str, table: dict[str, dict[str, float]]) -> list[dict]:
    out = []
    for group, row in table.items():
        n = int(row.get("n", 0))
        for key, value in row.items():
            if key == "n":
                continue
            metric, _, k = key.partition("@")
            out.append({"task": task, "model": model, "protocol": protocol, "metric": metric,
                        "k": int(k) if k else None, "group": group, "value": float(value), "n": n})
    return out


def evaluate_tools(store: ArtifactStore, cfg: RunConfig) -> list[dict]:
    users = store.read_table("prepare", "users", columns=["user_id", "n_train", "eh_bucket"])
    proto = protocols(cfg)
    records: list[dict] = []
    preds = _read(store, "train_tools", "predictions", ["user_id", "tool", "rank", "cand_rank", "n_candidates", "split"])
    for tool in sorted(set(preds.column("tool").to_pylist())):
        t = preds.filter(pc.equal(preds.column("tool"), tool))
        uids = t.column("user_id").to_numpy()
        buckets, groups = _segments(users, uids)
        ranks = t.column("rank").to_numpy()
        per_query = {f"{m}@{k}": f(ranks, k) for k in KS for m, f in (("hr", hit_at_k), ("ndcg", ndcg_at_k))}
        records += _records("sequential", tool, proto["sequential"], breakdown(per_query, buckets, groups))
        has = t.column("n_candidates").to_numpy() > 0
        if has.any():
            cr = t.column("cand_rank").to_numpy()[has]
            per_query = {f"{m}@{k}": f(cr, k) for k in (5, 10) for m, f in (("hr", hit_at_k), ("ndcg", ndcg_at_k))}
            records += _records("direct", tool, proto["direct"], breakdown(per_query, buckets[has], groups[has]))
    ctr = _read(store, "train_tools", "ctr_predictions", ["user_id", "tool", "label", "prob", "split"])
    for tool in sorted(set(ctr.column("tool").to_pylist())):
        t = ctr.filter(pc.equal(ctr.column("tool"), tool))
        labels, probs = t.column("label").to_numpy().astype(np.float64), t.column("prob").to_numpy()
        buckets, groups = _segments(users, t.column("user_id").to_numpy())

        def fn(mask, labels=labels, probs=probs):
            if len(np.unique(labels[mask])) < 2:
                return {"auc": float("nan"), "logloss": float("nan")}
            return ctr_metrics(labels[mask], probs[mask])

        records += _records("ctr", tool, proto["ctr"], breakdown_fn(fn, len(labels), buckets, groups))
    return records


def markdown_tables(records: list[dict], protocol: dict[str, str]) -> str:
    """Readable tables: per task, models x (metric@k) overall, then per EH bucket and cold-start group."""
    out = []
    for task, cols in (("sequential", [("hr", 5), ("ndcg", 5), ("hr", 10), ("ndcg", 10), ("hr", 20), ("ndcg", 20)]),
                       ("direct", [("hr", 5), ("ndcg", 5), ("hr", 10), ("ndcg", 10)]),
                       ("ctr", [("auc", None), ("logloss", None)])):
        rows = [r for r in records if r["task"] == task]
        if not rows:
            continue
        val = {(r["model"], r["metric"], r["k"], r["group"]): r for r in rows}
        models = sorted({r["model"] for r in rows})
        head = [f"{m.upper()}@{k}" if k else m.upper() for m, k in cols]
        out.append(f"### {task} ({protocol[task]})\n")
        out.append("| model | n | " + " | ".join(head) + " |")
        out.append("|---|---|" + "---|" * len(cols))
        for model in models:
            n = val.get((model, cols[0][0], cols[0][1], "all"), {}).get("n", 0)
            cells = [f"{val[(model, m, k, 'all')]['value']:.4f}" if (model, m, k, "all") in val else "" for m, k in cols]
            out.append(f"| {model} | {n} | " + " | ".join(cells) + " |")
        m0, k0 = cols[0]
        groups = ["eh:low", "eh:medium", "eh:high", "cs:coldest", "cs:medium", "cs:normal"]
        label = f"{m0.upper()}@{k0}" if k0 else m0.upper()
        out.append(f"\n{label} by segment (EH bucket; cold-start groups: coldest = 1-3, medium = 4-6, normal = 1-10)\n")
        out.append("| model | " + " | ".join(groups) + " |")
        out.append("|---|" + "---|" * len(groups))
        for model in models:
            cells = []
            for g in groups:
                r = val.get((model, m0, k0, g))
                cells.append(f"{r['value']:.4f} (n={r['n']})" if r and r["value"] == r["value"] else "")
            out.append(f"| {model} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def run(cfg: RunConfig, force: bool = False) -> dict:
    init_ray(cfg.ray)
    t0 = time.time()
    store = ArtifactStore(cfg.output_root, cfg.run_name, cfg.storage)
    tools = store.require("train_tools")
    prep = store.require("prepare")
    inputs = {"prepare": prep.fingerprint, "train_tools": tools.fingerprint}
    config_hash = section_hash({"data": prep.config_hash, "ks": list(KS)})
    if not force and store.is_done(STAGE, config_hash, inputs):
        log.info("evaluate: manifest matches under %s; skipping (use --force)", store.url(STAGE))
        return {"skipped": True, **store.manifest(STAGE).metrics}
    records = evaluate_tools(store, cfg)
    tables = markdown_tables(records, protocols(cfg))
    with store.stage_writer(STAGE, config_hash, inputs) as w:
        w.write_bytes("metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
        w.write_bytes("tools.md", (f"# Tool evaluation: run `{cfg.run_name}`\n\n" + tables).encode())
        w.manifest.rows["metrics"] = len(records)
        summary = {"n_records": len(records), "seconds": round(time.time() - t0, 1),
                   "report": store.url(STAGE, "tools.md")}
        w.manifest.metrics = summary
    summary["tables"] = tables
    return summary


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args, cfg = parse_cli("Evaluate tools (and the system) on the test queries.", argv)
    s = run(cfg, force=args.force)
    if s.get("skipped"):
        print("evaluate: skipped (outputs up to date); report at", s.get("report"))
    else:
        print(s["tables"])
        print(f"report: {s['report']} ({s['n_records']} numbers in metrics.jsonl)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
