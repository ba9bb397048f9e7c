"""The fine-tuned VLM against every tool on the same test users, per segment (issue: "the VLM
beats popularity and at least matches the best tool on cold users").

    python -m bench.vlm_vs_tools --config configs/quickstart.yaml --stage bench_vlm [key=value ...]

Reads a scored stage of the run (``--stage``; VLM answers, e.g. ``bench.score_modes``'s
``bench_vlm`` or ``bench_vlm_tools``) and the ``train_tools`` stage's test predictions, and prints
HR@5 / NDCG@5 for sequential (full-catalog, history kept) and HR@5 for direct (1 + N sampled
candidates) overall, per EH bucket and for the cold-start aggregates. The comparison is only
like-for-like when the stage scored every test query of the task (``score.max_queries_per_task=0``):
the script checks that both sides hold as many queries per task and warns otherwise. Cold-start groups
are computed over the evaluated users (the same rule as ``ray_jobs.evaluate``). Then, per tool,
sequential HR@5 paired per user, on all users and on the coldest ones: the users only the VLM
hits, only the tool hits, and McNemar's exact p-value (is the gap more than the draw of test users?).
``--against RUN:STAGE`` (repeatable) pairs another run's scored stage the same way, e.g. the same
recipe under another seed (the runs must share the prepare stage, hence the test users).
Last, where the stage kept the first tool's answers (``tool_items``: the tool shown first in the
prompt), how the VLM's answers relate to them by item text, the unit the VLM answers in.
"""

from __future__ import annotations

import argparse
import json
from typing import Mapping

import numpy as np
import pyarrow.compute as pc

from bench.report import markdown_table, system_metric
from reasonrec import evaluation
from reasonrec.config import load_config
from reasonrec.data.catalog import load_catalog
from reasonrec.io import ArtifactStore, open_store
from reasonrec.metrics import COLD_START_AGGREGATES

PAIRED_K = 5
GROUPS = ("all", "eh:low", "eh:medium", "eh:high", "cs:coldest", "cs:medium")
METRICS = (("sequential", "hr", 5), ("sequential", "ndcg", 5), ("direct", "hr", 5))


def comparison(tool_records: list[dict], vlm_records: list[dict], seq_protocol: str) -> list[dict]:
    """One row per (model, task, metric): the VLM first, then the tools by their overall value."""
    rows = []
    for task, metric, k in METRICS:

        def cells(recs, model=None, task=task, metric=metric, k=k):
            pick = [
                r
                for r in recs
                if (model is None or r["model"] == model) and (task != "sequential" or r["protocol"] == seq_protocol)
            ]
            return {g: system_metric(pick, task, metric, k, g) for g in GROUPS}

        block = [{"model": "VLM", "task": task, "metric": f"{metric}@{k}", **cells(vlm_records)}]
        tools = sorted({r["model"] for r in tool_records if r["task"] == task})
        block += sorted(
            ({"model": t, "task": task, "metric": f"{metric}@{k}", **cells(tool_records, t)} for t in tools),
            key=lambda r: -r["all"],
        )
        rows += block
    return rows


def paired(vlm_hits: Mapping[int, bool], tool_hits: Mapping[str, Mapping[int, bool]]) -> list[dict]:
    """Per tool, on the users both sides answered: each side's hits, the users only one side hits,
    and the exact McNemar p-value (a binomial test on those discordant users). Says whether a gap
    in HR@K is more than the luck of which ~160 users were drawn. Tools with the most hits first."""
    from scipy.stats import binomtest

    rows = []
    for tool, hits in tool_hits.items():
        users = [u for u in vlm_hits if u in hits]
        only_vlm = sum(bool(vlm_hits[u]) and not hits[u] for u in users)
        only_tool = sum(bool(hits[u]) and not vlm_hits[u] for u in users)
        n = only_vlm + only_tool
        rows.append(
            {
                "tool": tool,
                "users": len(users),
                "vlm_hits": sum(bool(vlm_hits[u]) for u in users),
                "tool_hits": sum(bool(hits[u]) for u in users),
                "only_vlm": only_vlm,
                "only_tool": only_tool,
                "p_mcnemar": float(binomtest(min(only_vlm, only_tool), n, 0.5).pvalue) if n else 1.0,
            }
        )
    return sorted(rows, key=lambda r: (-r["tool_hits"], r["tool"]))


def paired_by_group(vlm_hits: Mapping[int, bool], tool_hits: Mapping[str, Mapping[int, bool]], users) -> list[dict]:
    """:func:`paired` on all users, then on the coldest (cold-start groups over the users the VLM
    answered, the rule of ``ray_jobs.evaluate``); each row tagged with its ``group``."""
    uids = np.array(sorted(vlm_hits), np.int64)
    _, groups = evaluation.segments(users, uids)
    coldest = uids[np.isin(groups, COLD_START_AGGREGATES["coldest"])].tolist()
    rows = []
    for group, keep in (("all", uids.tolist()), ("cs:coldest", coldest)):
        rows += [{"group": group, **r} for r in paired({u: vlm_hits[u] for u in keep}, tool_hits)]
    return rows


def stage_hits(preds, queries, k: int = PAIRED_K) -> dict[int, bool]:
    """Per user HR@K hit of a scored stage's sequential answers."""
    preds = preds.filter(pc.equal(preds.column("task"), "sequential"))
    ranks = evaluation.per_query_correct(preds, queries)["rank"]
    return dict(zip(preds.column("user_id").to_pylist(), (ranks < k).tolist()))


def text_agreement(preds, queries, item_text, k: int = PAIRED_K) -> dict:
    """The VLM's sequential top K against the first tool's (``tool_items``), by item text: the texts
    the two share (mean per query); the queries where the VLM named the truth's text but ranked
    another item with that text in its place (a catalog that repeats titles costs it these); and,
    of the queries only the tool hits, those whose truth's text is not in the VLM's top 2K at all
    (it did not come close, rather than ranking it just below K)."""
    preds = preds.filter(pc.equal(preds.column("task"), "sequential"))
    target = evaluation.per_query_correct(preds, queries)["target"]
    out = {
        "queries": 0,
        "mean_shared_texts": float("nan"),
        "text_hit_item_miss": 0,
        "only_tool": 0,
        "only_tool_text_not_in_top_2k": 0,
    }
    shared = []
    for vlm, tool, t in zip(preds.column("items").to_pylist(), preds.column("tool_items").to_pylist(), target):
        if not tool or t is None or t != t:
            continue
        t, vlm = int(t), vlm or []
        texts = {item_text[i] for i in vlm[:k]}
        shared.append(len(texts & {item_text[i] for i in tool[:k]}))
        hit = t in vlm[:k]
        out["text_hit_item_miss"] += not hit and item_text[t] in texts
        if t in tool[:k] and not hit:
            out["only_tool"] += 1
            out["only_tool_text_not_in_top_2k"] += item_text[t] not in {item_text[i] for i in vlm[: 2 * k]}
    if shared:
        out.update(queries=len(shared), mean_shared_texts=float(np.mean(shared)))
    return out


def _sequential_hits(store, preds, queries, k: int = PAIRED_K) -> tuple[dict, dict]:
    """Per user HR@K hits (sequential, history kept) of a stage's answers and of every tool."""
    vlm = stage_hits(preds, queries, k)
    tools: dict[str, dict[int, bool]] = {}
    t = evaluation.read_split(store, "train_tools", "predictions", ["user_id", "tool", "rank", "split"])
    for u, name, r in zip(*(t.column(c).to_pylist() for c in ("user_id", "tool", "rank"))):
        tools.setdefault(name, {})[u] = r is not None and 0 <= r < k
    return vlm, tools


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--stage", default="bench_vlm", help="scored stage holding the VLM's answers")
    p.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="RUN:STAGE",
        help="also pair with another run's scored stage (e.g. another seed), as if it were a tool",
    )
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(a.config, list(a.overrides))
    store = open_store(cfg)
    users = store.read_table("prepare", "users", columns=["user_id", "n_train", "eh_bucket"])
    preds, queries = store.read_table(a.stage, "predictions"), store.read_table(a.stage, "queries")
    vlm = evaluation.system_records(preds, queries, users, cfg, model="VLM")
    tools = evaluation.evaluate_tools(store, cfg)
    rows = comparison(tools, vlm, evaluation.protocols(cfg)["sequential"])
    same = all(
        next(r["n"] for r in vlm if r["task"] == t and r["group"] == "all")
        == next(r["n"] for r in tools if r["task"] == t and r["group"] == "all")
        for t in ("sequential", "direct")
        if any(r["task"] == t for r in vlm)
    )
    table = markdown_table(rows, ["model", "task", "metric", *GROUPS])
    note = "same test users on both sides" if same else "WARNING: the VLM stage did not score every test query"
    print(f"{note}\n{table}")
    pairs = []
    if any(r["task"] == "sequential" for r in vlm):
        vlm_hits, tool_hits = _sequential_hits(store, preds, queries)
        for spec in a.against:
            run, _, stage = spec.partition(":")
            other = ArtifactStore(cfg.output_root, run, cfg.storage)
            tool_hits[spec] = stage_hits(other.read_table(stage, "predictions"), other.read_table(stage, "queries"))
        pairs = paired_by_group(vlm_hits, tool_hits, users)
    pair_table = markdown_table(pairs, list(pairs[0])) if pairs else ""
    print(f"\nsequential HR@{PAIRED_K}, paired per user (VLM vs each tool; all users, then the coldest):\n{pair_table}")
    agreement = None
    if any(r["task"] == "sequential" for r in vlm) and "tool_items" in preds.column_names:
        agreement = text_agreement(preds, queries, load_catalog(store, photos=False).text)
        print(f"\nsequential top {PAIRED_K} vs the first tool in the prompt, by item text: {json.dumps(agreement)}")
    with store.fs.open(store.path(f"bench_vlm_vs_tools_{a.stage}.json"), "w") as f:
        json.dump(
            {
                "rows": rows,
                "table": table,
                "same_users": same,
                "paired": pairs,
                "paired_table": pair_table,
                "text_agreement": agreement,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
