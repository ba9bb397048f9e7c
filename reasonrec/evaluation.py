"""Evaluation library: metric records and report tables for the tools and the routed system (Ray-free).

Protocols (stated next to every number):
* sequential: leave-one-out test item, ranked over the full catalog, once with the history kept
  and once with the history items masked (RecBole's full-sort protocol);
* direct: the test item among its candidate list (1 + ``data.direct_negatives`` sampled unseen items);
* ctr: the 8:1:1 per-user CTR test split with ``data.ctr_negatives`` sampled negatives per positive.

The test items follow ``data.split_protocol``: ``loo`` (above) or ``timeshift`` (paper Fig. A1: each
user's first interaction at or after a time cut-off, every model trained on interactions before it;
``prepare`` derives the per-user tables that way, so this module only names it). P5 bundles have no
timestamps (``ts`` = position): a time shift on them is a shift in position only.

Every metric is reported overall and per segment: EH bucket (``eh:low|medium|high``) and the
paper's cold-start groups (ten equal-size user groups by training frequency, ``cs:1..10``, with
``cs:coldest`` = 1-3, ``cs:medium`` = 4-6, ``cs:normal`` = 1-10). A record is one JSON-able dict
per number: task, model, protocol, metric, k, group, value, n.

The inputs read here are narrow integer columns of the test queries (a few bytes per query and
tool); the per-query work happened in the ``train_tools`` prediction actors. The per-array
metrics and segment breakdowns themselves live in ``reasonrec.metrics``; the stage that writes
``{run}/report/`` is ``ray_jobs.evaluate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from reasonrec.config import RunConfig
from reasonrec.io import ArtifactStore
from reasonrec.metrics import breakdown, breakdown_fn, cold_start_groups, ctr_metrics, hit_at_k, ndcg_at_k
from reasonrec.vocab import RISK_TIERS, TASKS

KS = (5, 10, 20)


CTR_LEAK = "; OPTIMISTIC: trained on histories that contain the CTR test positives"
SEQ_MASKED = "full-catalog ranking with history items masked (RecBole full-sort), leave-one-out test item"
TIMESHIFT_ITEM = (
    "time-shift test item (each user's first interaction at or after the cut-off; trained only on "
    "interactions before it)"
)


# The explanation split stays a random draw; under the time shift it draws from the interactions
# kept (those before the cut-off and each tested user's first one after it).
EXPLANATION_SPLIT = {"timeshift": " of the interactions kept by the time-shift split (not a time split)"}


def split_protocol(cfg: RunConfig) -> str:
    """How the test items were drawn (``data.split_protocol``): named in every protocol string."""
    if cfg.data.split_protocol == "timeshift":
        return TIMESHIFT_ITEM
    return "leave-one-out test item"


def protocols(cfg: RunConfig) -> dict[str, str]:
    """The protocol string of every task (and ``sequential_masked``) under the run's split."""
    item = split_protocol(cfg)
    ctr_pos = "time-shift test items" if cfg.data.split_protocol == "timeshift" else "leave-one-out test items"
    return {
        "sequential": f"full-catalog ranking, {item}",
        "sequential_masked": SEQ_MASKED.replace("leave-one-out test item", item),
        "direct": f"1 positive + {cfg.data.direct_negatives} sampled negatives, {item}",
        "ctr": (
            f"{ctr_pos} as positives, {cfg.data.ctr_negatives} negatives per positive (test split)"
            if cfg.data.ctr_protocol == "loo"
            else f"8:1:1 per-user split, {cfg.data.ctr_negatives} negatives per positive (test split)"
        ),
    }


def read_split(store: ArtifactStore, stage: str, name: str, columns: list[str], split: str = "test"):
    """One split's rows of a stage's Parquet table (predictions carry a ``split`` column)."""
    ds = pads.dataset(store.path(stage, name), filesystem=store.arrow_fs, format="parquet")
    return ds.to_table(columns=columns, filter=pc.field("split") == split)


def segments(users, user_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
            out.append(
                {
                    "task": task,
                    "model": model,
                    "protocol": protocol,
                    "metric": metric,
                    "k": int(k) if k else None,
                    "group": group,
                    "value": float(value),
                    "n": n,
                }
            )
    return out


def _tool_inputs(store: ArtifactStore):
    """The users (with their domain) and the test rows of the tools' ranking and CTR predictions."""
    users = store.read_table("prepare", "users", columns=["user_id", "n_train", "eh_bucket", "domain"])
    preds = read_split(
        store,
        "train_tools",
        "predictions",
        ["user_id", "tool", "rank", "rank_excl", "cand_rank", "n_candidates", "split"],
    )
    ctr = read_split(store, "train_tools", "ctr_predictions", ["user_id", "tool", "label", "prob", "split"])
    return users, preds, ctr


def evaluate_tools(store: ArtifactStore, cfg: RunConfig) -> list[dict]:
    """Every tool's records on the test queries (all domains together)."""
    users, preds, ctr = _tool_inputs(store)
    return tool_records(preds, ctr, users, cfg)


def evaluate_tools_by_domain(store: ArtifactStore, cfg: RunConfig) -> list[dict]:
    """:func:`evaluate_tools` once per domain of the test queries (:func:`per_domain`); none for a
    single-domain run."""
    users, preds, ctr = _tool_inputs(store)
    return per_domain(lambda p, c: tool_records(p, c, users, cfg), users, preds, ctr)


def tool_records(preds, ctr, users, cfg: RunConfig) -> list[dict]:
    """Records of the tools' test predictions: ``preds`` (ranking: rank, rank_excl, cand_rank,
    n_candidates) and ``ctr`` (label, prob), each row with its ``user_id`` and ``tool``."""
    proto = protocols(cfg)
    records: list[dict] = []
    for tool in sorted(set(preds.column("tool").to_pylist())):
        t = preds.filter(pc.equal(preds.column("tool"), tool))
        uids = t.column("user_id").to_numpy()
        buckets, groups = segments(users, uids)
        for column, protocol in (("rank", proto["sequential"]), ("rank_excl", proto["sequential_masked"])):
            ranks = t.column(column).to_numpy()
            per_query = {f"{m}@{k}": f(ranks, k) for k in KS for m, f in (("hr", hit_at_k), ("ndcg", ndcg_at_k))}
            records += _records("sequential", tool, protocol, breakdown(per_query, buckets, groups))
        has = t.column("n_candidates").to_numpy() > 0
        if has.any():
            cr = t.column("cand_rank").to_numpy()[has]
            per_query = {f"{m}@{k}": f(cr, k) for k in (5, 10) for m, f in (("hr", hit_at_k), ("ndcg", ndcg_at_k))}
            records += _records("direct", tool, proto["direct"], breakdown(per_query, buckets[has], groups[has]))
    from reasonrec.tools import tool_class

    for tool in sorted(set(ctr.column("tool").to_pylist())):
        # The ranking tools (and the ensemble, which averages them in) learn from the users'
        # leave-one-out training histories, and those contain the users' CTR valid/test
        # positives under the ``random`` CTR protocol (a separate 8:1:1 draw): optimistic numbers.
        leaky = cfg.data.ctr_protocol == "random" and bool({"sequential", "direct"} & set(tool_class(tool).tasks))
        t = ctr.filter(pc.equal(ctr.column("tool"), tool))
        labels, probs = t.column("label").to_numpy().astype(np.float64), t.column("prob").to_numpy()
        buckets, groups = segments(users, t.column("user_id").to_numpy())

        def fn(mask, labels=labels, probs=probs):
            if len(np.unique(labels[mask])) < 2:
                return {"auc": float("nan"), "logloss": float("nan")}
            return ctr_metrics(labels[mask], probs[mask])

        records += _records(
            "ctr", tool, proto["ctr"] + (CTR_LEAK if leaky else ""), breakdown_fn(fn, len(labels), buckets, groups)
        )
    return records


def markdown_tables(records: list[dict], protocol: dict[str, str]) -> str:
    """Readable tables: per task, models x (metric@k) overall, then per EH bucket and cold-start group."""
    out = []
    seq = [("hr", 5), ("ndcg", 5), ("hr", 10), ("ndcg", 10), ("hr", 20), ("ndcg", 20)]
    for task, proto, cols in (
        ("sequential", protocol["sequential"], seq),
        ("sequential", protocol.get("sequential_masked", SEQ_MASKED), seq),
        ("direct", protocol["direct"], [("hr", 5), ("ndcg", 5), ("hr", 10), ("ndcg", 10)]),
        ("ctr", protocol["ctr"], [("auc", None), ("logloss", None)]),
    ):
        rows = [r for r in records if r["task"] == task and r["protocol"] in (proto, proto + CTR_LEAK)]
        if not rows:
            continue
        val = {(r["model"], r["metric"], r["k"], r["group"]): r for r in rows}
        models = sorted({r["model"] for r in rows})
        head = [f"{m.upper()}@{k}" if k else m.upper() for m, k in cols]
        out.append(f"### {task} ({proto})\n")
        out.append("| model | n | " + " | ".join(head) + " |")
        out.append("|---|---|" + "---|" * len(cols))
        for model in models:
            first = val.get((model, cols[0][0], cols[0][1], "all"), {})
            cells = [
                f"{val[(model, m, k, 'all')]['value']:.4f}" if (model, m, k, "all") in val else "" for m, k in cols
            ]
            mark = " (optimistic\\*)" if first.get("protocol", "").endswith(CTR_LEAK) else ""
            out.append(f"| {model}{mark} | {first.get('n', 0)} | " + " | ".join(cells) + " |")
        if any(r["protocol"].endswith(CTR_LEAK) for r in rows):
            out.append(
                "\n\\* trained on leave-one-out histories that contain the users' CTR valid/test positives "
                "(the CTR split is a separate per-user 8:1:1 draw), so these CTR numbers are optimistic; "
                "the CTR models proper (DLRM, DCNv2, xDeepFM, xgboost) train on the CTR train rows."
            )
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


# ----------------------------------------------------------------------------- system
def per_query_correct(preds, queries, correct_k: int = 5) -> dict[str, np.ndarray]:
    """Join predictions to their queries' truth: per prediction row ``rank`` (0-based position
    of the target in the answer list, a large value when absent), ``label``/``prob`` (ctr),
    ``text``/``reference`` (explanation). Rows keep the predictions' order."""
    q = {int(i): j for j, i in enumerate(queries.column("query_id").to_pylist())}
    idx = np.array([q[int(i)] for i in preds.column("query_id").to_pylist()], np.int64)
    target = queries.column("target").to_numpy(zero_copy_only=False)[idx] if len(idx) else np.zeros(0)
    items = preds.column("items").to_pylist()
    rank = np.full(len(idx), 10**6, np.int64)
    for r, (lst, t) in enumerate(zip(items, target)):
        if lst and t == t and t is not None and int(t) in lst:
            rank[r] = lst.index(int(t))
    label = queries.column("label").to_numpy(zero_copy_only=False)[idx]
    reference = queries.column("reference").take(pa.array(idx, pa.int64())).to_pylist()
    return {"rank": rank, "label": label, "reference": reference, "target": target}


def system_records(preds, queries, users, cfg: RunConfig, model: str = "reasonrec") -> list[dict]:
    """Metrics of scored predictions per task: overall, per tier (``tier:low|medium|high``), per
    EH bucket and cold-start group; plus route shares, tool use and latency per tier."""
    from reasonrec.metrics import BLEU_SETTINGS, ROUGE_SETTINGS, rouge_l_scores, sentence_bleu4

    proto = {
        **protocols(cfg),
        "explanation": f"8:1:1 per-user split (test){EXPLANATION_SPLIT.get(cfg.data.split_protocol, '')}, "
        f"review text as reference; {BLEU_SETTINGS}; {ROUGE_SETTINGS}",
    }
    truth = per_query_correct(preds, queries)
    tasks = preds.column("task").to_numpy(zero_copy_only=False)
    routes = preds.column("route").to_numpy(zero_copy_only=False)
    uids = preds.column("user_id").to_numpy()
    lat = preds.column("latency_ms").to_numpy(zero_copy_only=False).astype(np.float64)
    used = np.array([len(t or []) > 0 for t in preds.column("tools_used").to_pylist()])
    vlm = preds.column("vlm_called").to_numpy(zero_copy_only=False).astype(bool)
    flops = (
        preds.column("flops").to_numpy(zero_copy_only=False).astype(np.float64)
        if "flops" in preds.column_names
        else np.full(preds.num_rows, np.nan)
    )
    records: list[dict] = []
    for task in TASKS:
        m = tasks == task
        if not m.any():
            continue
        known = np.isin(uids[m], users.column("user_id").to_numpy())
        buckets, groups = np.array(["high"] * m.sum(), object), np.full(m.sum(), 0, np.int64)
        if known.any():
            b, g = segments(users, uids[m][known])
            buckets[known], groups[known] = b, g
        tier = routes[m]
        if task in ("sequential", "direct"):
            rank = truth["rank"][m]
            per_query = {
                f"{name}@{k}": f(rank, k) for k in (5, 10) for name, f in (("hr", hit_at_k), ("ndcg", ndcg_at_k))
            }
            table = breakdown(per_query, buckets, groups)
            for t in RISK_TIERS:
                sel = tier == t
                if sel.any():
                    table[f"tier:{t}"] = {k: float(v[sel].mean()) for k, v in per_query.items()} | {"n": int(sel.sum())}
        elif task == "ctr":
            labels = truth["label"][m].astype(np.float64)
            probs = preds.column("prob").to_numpy(zero_copy_only=False)[m].astype(np.float64)

            def fn(mask, labels=labels, probs=probs):
                if len(np.unique(labels[mask])) < 2:
                    return {"auc": float("nan"), "logloss": float("nan")}
                return ctr_metrics(labels[mask], probs[mask])

            table = breakdown_fn(fn, int(m.sum()), buckets, groups)
            for t in RISK_TIERS:
                sel = tier == t
                if sel.any():
                    table[f"tier:{t}"] = {**fn(sel), "n": int(sel.sum())}
        else:
            hyp = [x or "" for x in preds.column("text").to_numpy(zero_copy_only=False)[m]]
            ref = [x or "" for x in np.asarray(truth["reference"], object)[m]]
            per_query = {
                "bleu4": np.asarray(sentence_bleu4(hyp, ref), np.float64),
                "rouge_l": np.asarray(rouge_l_scores(hyp, ref), np.float64),
            }
            table = breakdown(per_query, buckets, groups)
        records += _records(task, model, proto[task], table)
        # Route shares, tool use (paper Tables 4, 6), latency per tier (Table A3).
        for t in RISK_TIERS:
            sel = tier == t
            records.append(
                {
                    "task": task,
                    "model": model,
                    "protocol": "routing",
                    "metric": "route_share",
                    "k": None,
                    "group": f"tier:{t}",
                    "value": float(sel.mean()),
                    "n": int(sel.sum()),
                }
            )
            if sel.any():
                records.append(
                    {
                        "task": task,
                        "model": model,
                        "protocol": "routing",
                        "metric": "latency_ms_p50",
                        "k": None,
                        "group": f"tier:{t}",
                        "value": float(np.median(lat[m][sel])),
                        "n": int(sel.sum()),
                    }
                )
            counted = sel & ~np.isnan(flops[m])
            if counted.any():
                records.append(
                    {
                        "task": task,
                        "model": model,
                        "protocol": "routing: torch FLOPs per query",
                        "metric": "gflops_mean",
                        "k": None,
                        "group": f"tier:{t}",
                        "value": float(flops[m][counted].mean() / 1e9),
                        "n": int(counted.sum()),
                    }
                )
        if task != "explanation":
            records += disagreement_records(task, model, preds, truth, m, tier, vlm[m])
        tool_use = breakdown(
            {"tool_use": used[m].astype(np.float64), "vlm_call": vlm[m].astype(np.float64)}, buckets, groups
        )
        records += [{**r, "protocol": "routing"} for r in _records(task, model, "routing", tool_use)]
    return records


def system_records_by_domain(preds, queries, users, cfg: RunConfig, model: str = "reasonrec") -> list[dict]:
    """:func:`system_records` once per domain of the scored queries (:func:`per_domain`; ``users``
    with its ``domain`` column); none for a single-domain run."""
    return per_domain(lambda p: system_records(p, queries, users, cfg, model), users, preds)


DISAGREEMENT_PROTOCOL = (
    "VLM-answered queries vs the planner's primary tool: right = truth in top-5 (ranking), "
    "correct side of 0.5 (ctr); disagree = different top-1 item / side"
)


def disagreement_records(
    task: str, model: str, preds, truth: dict, m: np.ndarray, tier: np.ndarray, called: np.ndarray | None = None
) -> list[dict]:
    """Paper Table 7 on the queries the VLM answered (medium + high, and high alone = with tools
    in its prompt): the primary tool's accuracy, the system's, how often they disagree and who is
    right when they do. ``called`` (``vlm_called`` of the task's rows) leaves out the queries a
    VLM budget (score.vlm_budget) skipped: their tool answered."""
    if task == "ctr":
        label = truth["label"][m].astype(np.float64)
        sys_p = preds.column("prob").to_numpy(zero_copy_only=False)[m].astype(np.float64)
        tool_p = preds.column("tool_prob").to_numpy(zero_copy_only=False)[m].astype(np.float64)
        has_tool = ~np.isnan(tool_p)
        sys_ok, tool_ok = (sys_p >= 0.5) == (label > 0.5), (tool_p >= 0.5) == (label > 0.5)
        disagree = (sys_p >= 0.5) != (tool_p >= 0.5)
    else:
        sys_items = [x for i, x in enumerate(preds.column("items").to_pylist()) if m[i]]
        tool_items = [x for i, x in enumerate(preds.column("tool_items").to_pylist()) if m[i]]
        sys_ok = truth["rank"][m] < 5
        target = truth["target"][m]
        has_tool = np.array([bool(t) for t in tool_items])
        tool_ok = np.array([bool(t) and g == g and int(g) in t[:5] for t, g in zip(tool_items, target)])
        disagree = np.array([bool(t) and bool(s) and t[0] != s[0] for s, t in zip(sys_items, tool_items)])
    out = []
    for group, sel in (("vlm_answered", np.isin(tier, ["medium", "high"])), ("tier:high", tier == "high")):
        sel = sel & has_tool & (True if called is None else called)
        if not sel.any():
            continue
        d = sel & disagree
        values = {
            "tool_accuracy": tool_ok[sel].mean(),
            "system_accuracy": sys_ok[sel].mean(),
            "disagreement_rate": disagree[sel].mean(),
            "tool_accuracy_on_disagreement": tool_ok[d].mean() if d.any() else float("nan"),
            "system_accuracy_on_disagreement": sys_ok[d].mean() if d.any() else float("nan"),
        }
        out += [
            {
                "task": task,
                "model": model,
                "protocol": DISAGREEMENT_PROTOCOL,
                "metric": k,
                "k": None,
                "group": group,
                "value": float(v),
                "n": int(d.sum() if "on_disagreement" in k else sel.sum()),
            }
            for k, v in values.items()
        ]
    return out


def disagreement_markdown(records: list[dict]) -> str:
    rows = [r for r in records if r["protocol"] == DISAGREEMENT_PROTOCOL]
    if not rows:
        return ""
    val = {(r["task"], r["group"], r["metric"]): r for r in rows}
    cols = (
        "tool_accuracy",
        "system_accuracy",
        "disagreement_rate",
        "tool_accuracy_on_disagreement",
        "system_accuracy_on_disagreement",
    )
    out = [
        f"### Tool vs system disagreements (paper Table 7; {DISAGREEMENT_PROTOCOL})\n",
        "| task | queries | n | tool acc. | system acc. | disagreement | tool acc. on disagr. "
        "| system acc. on disagr. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, group in sorted({(r["task"], r["group"]) for r in rows}):
        cells = [val.get((task, group, c)) for c in cols]
        out.append(
            f"| {task} | {group} | {cells[0]['n']} | "
            + " | ".join(f"{c['value']:.3f}" if c and c["value"] == c["value"] else "" for c in cells)
            + " |"
        )
    return "\n".join(out) + "\n"


def system_markdown(records: list[dict]) -> str:
    out = ["## System (ReasonRec routed scoring)\n"]
    head = {
        "sequential": [("hr", 5), ("ndcg", 5), ("hr", 10)],
        "direct": [("hr", 5), ("ndcg", 5), ("hr", 10)],
        "ctr": [("auc", None), ("logloss", None)],
        "explanation": [("bleu4", None), ("rouge_l", None)],
    }
    val = {(r["task"], r["model"], r["metric"], r["k"], r["group"]): r for r in records}
    for task, cols in head.items():
        if not any(r["task"] == task for r in records):
            continue
        proto = next(r["protocol"] for r in records if r["task"] == task and r["protocol"] != "routing")
        out.append(f"### {task} ({proto})\n")
        out.append(
            "| group | n | "
            + " | ".join(f"{m.upper()}@{k}" if k else m.upper() for m, k in cols)
            + " | route share | tool use | VLM calls |"
        )
        out.append("|---|---|" + "---|" * (len(cols) + 3))
        for g in (
            "all",
            "tier:low",
            "tier:medium",
            "tier:high",
            "eh:low",
            "eh:medium",
            "eh:high",
            "cs:coldest",
            "cs:medium",
            "cs:normal",
        ):
            first = val.get((task, "reasonrec", cols[0][0], cols[0][1], g))
            share = val.get((task, "reasonrec", "route_share", None, g))
            tu = val.get((task, "reasonrec", "tool_use", None, g))
            vc = val.get((task, "reasonrec", "vlm_call", None, g))
            if not first and not share:
                continue
            n = (first or share)["n"]
            cells = [
                f"{val[(task, 'reasonrec', m, k, g)]['value']:.4f}" if (task, "reasonrec", m, k, g) in val else ""
                for m, k in cols
            ]
            out.append(
                f"| {g} | {n} | " + " | ".join(cells) + f" | {share['value']:.3f} |"
                if share
                else f"| {g} | {n} | " + " | ".join(cells) + " | |"
            )
            out[-1] += (f" {tu['value']:.3f} |" if tu else " |") + (f" {vc['value']:.3f} |" if vc else " |")
        out.append("")
    out.append(disagreement_markdown(records))
    out.append(cost_markdown(records))
    return "\n".join(out)


def cost_markdown(records: list[dict]) -> str:
    """Paper Table A3 on our run: share of queries, p50 latency and torch GFLOPs per tier."""
    val = {(r["task"], r["metric"], r["group"]): r for r in records if r["model"] == "reasonrec"}
    tasks = [t for t in TASKS if (t, "route_share", "tier:low") in val]
    if not tasks:
        return ""
    out = [
        "### Cost per tier (paper Table A3; GFLOPs = torch ops only, when `score.count_flops` is on)\n",
        "| task | tier | share | p50 latency (ms) | mean GFLOPs / query |",
        "|---|---|---|---|---|",
    ]
    for task in tasks:
        for tier in RISK_TIERS:
            g = f"tier:{tier}"
            share, lat, gf = (val.get((task, m, g)) for m in ("route_share", "latency_ms_p50", "gflops_mean"))
            if not share or not share["n"]:
                continue
            out.append(
                f"| {task} | {tier} | {share['value']:.3f} | {lat['value']:.1f} | "
                + (f"{gf['value']:.4f} |" if gf else "|")
            )
    return "\n".join(out) + "\n"


def plots(records: list[dict], writer) -> list[str]:
    """PNG plots next to the report: a metric by EH bucket per task, route shares, latency per tier."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    main = {"sequential": "hr", "direct": "hr", "ctr": "auc", "explanation": "rouge_l"}
    figs = {
        "metric_by_eh.png": lambda ax: [
            ax.plot(
                ["eh:low", "eh:medium", "eh:high"],
                [
                    next(
                        (
                            r["value"]
                            for r in records
                            if r["task"] == t and r["metric"] == m and r["group"] == g and r["k"] in (5, None)
                        ),
                        np.nan,
                    )
                    for g in ("eh:low", "eh:medium", "eh:high")
                ],
                marker="o",
                label=t,
            )
            for t, m in main.items()
        ],
        "route_shares.png": lambda ax: [
            ax.bar(
                [f"{t[:4]}:{tier}" for tier in RISK_TIERS],
                [
                    next(
                        (
                            r["value"]
                            for r in records
                            if r["task"] == t and r["metric"] == "route_share" and r["group"] == f"tier:{tier}"
                        ),
                        0,
                    )
                    for tier in RISK_TIERS
                ],
                label=t,
            )
            for t in main
        ],
        "latency_by_tier.png": lambda ax: [
            ax.bar(
                [f"{t[:4]}:{tier}" for tier in RISK_TIERS],
                [
                    next(
                        (
                            r["value"]
                            for r in records
                            if r["task"] == t and r["metric"] == "latency_ms_p50" and r["group"] == f"tier:{tier}"
                        ),
                        0,
                    )
                    for tier in RISK_TIERS
                ],
                label=t,
            )
            for t in main
        ],
    }
    for name, draw in figs.items():
        fig, ax = plt.subplots(figsize=(7, 3.5))
        draw(ax)
        ax.set_title(name[:-4].replace("_", " "))
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        writer.write_bytes(name, buf.getvalue())
        names.append(name)
    return names


def guard_markdown(store: ArtifactStore) -> str:
    """The planner's tool-choice guard per task (``planner/summary.json``): learned or fixed, and why."""
    if store.manifest("planner") is None:
        return ""
    guard = store.read_json("planner", "summary.json").get("guard", {})
    if not guard:
        return ""
    rows = [
        f"| {t} | {g['use']}{' (' + g['fixed_tool'] + ')' if g['use'] == 'fixed' else ''} | {g['why']} |"
        for t, g in guard.items()
    ]
    return (
        "\n**Tool choice guard** (the learned choice or the fused ranking is kept only where it beats the "
        "best fixed tool on held-out validation queries by more than its noise):\n\n"
        "| task | choice | evidence |\n|---|---|---|\n" + "\n".join(rows) + "\n"
    )


# ------------------------------------------------------------------------ calibration
CALIBRATION_BINS = 10
CALIBRATION_GROUPS = ("all", "eh:low", "eh:medium", "eh:high")
CALIBRATION_SOURCES = ("vlm_verbal", "vlm_token", "planner")
CALIBRATION_NAMES = {
    "vlm_verbal": "VLM verbalised confidence",
    "vlm_token": "VLM token-probability confidence",
    "planner": "planner P(tool right)",
}


# The column each confidence source reads where scoring recorded it (PREDICTIONS); runs scored
# before those columns existed fall back to what the other columns imply (calibration_inputs).
CALIBRATION_COLUMNS = {"vlm_verbal": "conf_verbal", "vlm_token": "conf_token", "planner": "tool_confidence"}
CALIBRATION_FALLBACKS = {
    "vlm_verbal": "parsed from the thought (this run predates the `conf_verbal` column)",
    "vlm_token": "`confidence` of the VLM answers whose thought states none (this run predates the "
    "`conf_token` column)",
    "planner": "`confidence` of the tool answers (this run predates the `tool_confidence` column)",
}


def calibration_protocol(source: str, k: int, columns: Sequence[str] = ()) -> str:
    """What a confidence is scored against (each against what it is a probability of) and where it
    comes from: the recorded column (:data:`CALIBRATION_COLUMNS`) when ``columns`` (the predictions'
    columns) has it, else the fallback for runs scored before it (:data:`CALIBRATION_FALLBACKS`)."""
    planner_rows = (
        "every ranking / CTR query (the primary tool's answer where the VLM answered)"
        if CALIBRATION_COLUMNS["planner"] in columns
        else "tool answers (VLM not called)"
    )
    right = {
        "vlm_verbal": f"VLM answers; right = truth in the VLM's top {k} (the instruction targets' usable_k)",
        "vlm_token": "VLM answers; right = the VLM's top-1 item is the truth",
        "planner": f"{planner_rows}; right = truth in the answer's top {k} (planner.correct_k)",
    }[source]
    name = f"{CALIBRATION_NAMES[source]} ({calibration_source(source, columns)})"
    return f"calibration ({CALIBRATION_BINS} equal-width bins): {name}; {right}; CTR: right side of 0.5"


def calibration_source(source: str, columns: Sequence[str]) -> str:
    """Where ``source``'s confidences come from, given the predictions' ``columns``."""
    col = CALIBRATION_COLUMNS[source]
    return f"recorded `{col}`" if col in columns else CALIBRATION_FALLBACKS[source]


def _verbal_confidence(preds, m: np.ndarray) -> np.ndarray:
    """The VLM's verbalised confidence per row: the ``conf_verbal`` column where scoring records
    it, else the ``Confidence:`` field parsed from the row's ``thought`` (the parse the VLM's own
    output went through); NaN where there is none."""
    from reasonrec.prompts.cot import parse_output

    if "conf_verbal" in preds.column_names:
        return np.where(m, _floats(preds, "conf_verbal"), np.nan)
    tasks = preds.column("task").to_pylist()
    out = np.full(preds.num_rows, np.nan)
    for i, th in enumerate(preds.column("thought").to_pylist()):
        if m[i] and th:
            c = parse_output(th, tasks[i]).thought.confidence
            out[i] = np.nan if c is None else c
    return out


def _floats(preds, col: str) -> np.ndarray:
    """A float32 confidence column as float64 rounded to 6 decimals: the value scoring stored (a
    verbalised 0.70 is 0.69999999 in float32 and would fall into the [0.6, 0.7) bin), NaN for null."""
    return np.round(preds.column(col).to_numpy(zero_copy_only=False).astype(np.float64), 6)


def calibration_inputs(preds, queries, cfg: RunConfig) -> dict[str, dict[str, np.ndarray]]:
    """Per confidence source: ``conf`` and ``right`` per prediction row (NaN confidence where the
    source says nothing about the row), for the ranking and CTR tasks (explanations have no
    right / wrong). Rows keep the predictions' order.

    * ``vlm_verbal``: VLM-answered rows, the verbalised confidence (``_verbal_confidence``).
    * ``vlm_token``: VLM-answered rows, the token-probability confidence: the ``conf_token``
      column where scoring records it; else the ``confidence`` column on the rows whose thought
      states no confidence (scoring falls back to the token one there); NaN elsewhere.
    * ``planner``: the planner's P(the answer given is right): the ``tool_confidence`` column
      where scoring records it (right judged on ``tool_items`` where the VLM answered); else the
      ``confidence`` column of the rows the tools answered (``vlm_called`` false), which scoring
      fills with it."""
    truth = per_query_correct(preds, queries)
    task = preds.column("task").to_numpy(zero_copy_only=False)
    scored = np.isin(task, ["sequential", "direct", "ctr"])
    vlm = preds.column("vlm_called").to_numpy(zero_copy_only=False).astype(bool)
    conf = _floats(preds, "confidence")
    label = np.asarray(truth["label"], np.float64)
    is_ctr = task == "ctr"

    def side(col: str) -> np.ndarray:
        p = preds.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
        return (p >= 0.5) == (label > 0.5)

    def in_top(items_col: str, k: int) -> np.ndarray:
        target = truth["target"]
        return np.array(
            [bool(lst) and t == t and t is not None and int(t) in lst[:k] for lst, t in zip(items_col, target)]
        )

    items = preds.column("items").to_pylist()
    right_sys = {k: np.where(is_ctr, side("prob"), in_top(items, k)) for k in {1, cfg.instructions.usable_k}}
    on_vlm = scored & vlm
    verbal = _verbal_confidence(preds, on_vlm)
    if "conf_token" in preds.column_names:
        token = _floats(preds, "conf_token")
    else:
        token = np.where(np.isnan(verbal), conf, np.nan)
    out = {
        "vlm_verbal": {"conf": np.where(on_vlm, verbal, np.nan), "right": right_sys[cfg.instructions.usable_k]},
        "vlm_token": {"conf": np.where(on_vlm, token, np.nan), "right": right_sys[1]},
    }
    k = cfg.planner.correct_k
    planner_right = np.where(is_ctr, side("prob"), in_top(items, k))
    if "tool_confidence" in preds.column_names:
        tool_right = np.where(is_ctr, side("tool_prob"), in_top(preds.column("tool_items").to_pylist(), k))
        planner_right = np.where(vlm, tool_right, planner_right)
        pconf = np.where(scored, _floats(preds, "tool_confidence"), np.nan)
    else:
        pconf = np.where(scored & ~vlm, conf, np.nan)
    out["planner"] = {"conf": pconf.astype(np.float64), "right": planner_right}
    return out


def calibration_records(preds, queries, cfg: RunConfig) -> list[dict]:
    """ECE (``CALIBRATION_BINS`` equal-width bins) and the reliability table (per non-empty bin:
    mean confidence, accuracy, count) of each confidence source (:func:`calibration_inputs`), per
    task and EH bucket (the bucket scoring resolved, ``eh_bucket``). Records with ``model`` = the
    source, metrics ``ece`` / ``mean_confidence`` / ``accuracy`` / ``brier`` and, per bin ``k``,
    ``bin_confidence`` / ``bin_accuracy`` (``n`` = the bin's count)."""
    from reasonrec.diagnosis import reliability

    inputs = calibration_inputs(preds, queries, cfg)
    task = preds.column("task").to_numpy(zero_copy_only=False)
    bucket = np.array([f"eh:{b}" for b in preds.column("eh_bucket").to_pylist()], dtype=object)
    records: list[dict] = []
    for source, d in inputs.items():
        k = cfg.instructions.usable_k if source == "vlm_verbal" else cfg.planner.correct_k
        proto = calibration_protocol(source, k, preds.column_names)
        base = {"model": source, "protocol": proto}
        for t in ("sequential", "direct", "ctr"):
            for group in CALIBRATION_GROUPS:
                sel = (task == t) & np.isfinite(d["conf"]) & (True if group == "all" else bucket == group)
                if not sel.any():
                    continue
                rel = reliability(d["conf"][sel], d["right"][sel], CALIBRATION_BINS)
                head = {**base, "task": t, "group": group}
                for metric, key in (("ece", "ece"), ("mean_confidence", "mean_pred"), ("accuracy", "observed")):
                    records.append({**head, "metric": metric, "k": None, "value": float(rel[key]), "n": rel["n"]})
                records.append({**head, "metric": "brier", "k": None, "value": float(rel["brier"]), "n": rel["n"]})
                for i, b in enumerate(rel["bins"]):
                    if b["n"]:
                        records.append(
                            {**head, "metric": "bin_confidence", "k": i, "value": b["mean_pred"], "n": b["n"]}
                        )
                        records.append({**head, "metric": "bin_accuracy", "k": i, "value": b["observed"], "n": b["n"]})
    return records


TOKEN_CONFIDENCE_GAP = (
    "This run's predictions predate the `conf_token` column: the token-probability confidence is "
    "not stored for every VLM answer (scoring kept one `confidence` per prediction: the verbalised "
    "one, the token one only where the thought states none), so its rows here are the VLM answers "
    "without a verbalised confidence. Runs scored since record both (`conf_verbal`, `conf_token`, "
    "and the planner's `tool_confidence`) for every answer, and this section reads them."
)


CALIBRATION_NONE = {
    "vlm_verbal": "no rows: no VLM answer to a ranking / CTR test query stated a confidence (or the VLM answered none)",
    "vlm_token": "no rows: no VLM answer to a ranking / CTR test query has its token confidence stored",
    "planner": "no rows: no ranking / CTR test query has the planner's P(tool right) stored",
}


def calibration_markdown(records: list[dict], columns: list[str] | None = None) -> str:
    """ECE per confidence source, task and EH bucket, then the reliability tables (non-empty bins)."""
    rows = [r for r in records if r["model"] in CALIBRATION_SOURCES and r["protocol"].startswith("calibration")]
    val = {(r["model"], r["task"], r["group"], r["metric"], r["k"]): r for r in rows}
    out = [
        f"### Calibration (ECE over {CALIBRATION_BINS} equal-width bins: sum over bins of "
        "share x |accuracy - mean confidence|; test queries)\n",
        "| confidence | task | " + " | ".join(f"ECE {g}" for g in CALIBRATION_GROUPS) + " | mean conf. | accuracy |",
        "|---|---|" + "---|" * (len(CALIBRATION_GROUPS) + 2),
    ]
    keys = sorted(
        {(r["model"], r["task"]) for r in rows}, key=lambda x: (CALIBRATION_SOURCES.index(x[0]), TASKS.index(x[1]))
    )
    for source, task in keys:
        cells = []
        for g in CALIBRATION_GROUPS:
            r = val.get((source, task, g, "ece", None))
            cells.append(f"{r['value']:.4f} (n={r['n']})" if r else "")
        mc, acc = (
            val.get((source, task, "all", "mean_confidence", None)),
            val.get((source, task, "all", "accuracy", None)),
        )
        out.append(f"| {CALIBRATION_NAMES[source]} | {task} | " + " | ".join(cells) + f" | {_fmt(mc)} | {_fmt(acc)} |")
    out.append("\nWhat each confidence is scored against:\n")
    for source in CALIBRATION_SOURCES:
        proto = next((r["protocol"] for r in rows if r["model"] == source), None)
        where = calibration_source(source, columns or ())
        out.append(f"- {proto}" if proto else f"- {CALIBRATION_NAMES[source]} ({where}): {CALIBRATION_NONE[source]}")
    if not any(c in (columns or []) for c in ("conf_token",)):
        out.append(f"\n{TOKEN_CONFIDENCE_GAP}")
    out.append("\n#### Reliability tables (bins with answers; bin i = confidence in [i/10, (i+1)/10))\n")
    out.append("| confidence | task | group | bin | n | mean confidence | accuracy | gap |")
    out.append("|---|---|---|---|---|---|---|---|")
    for source, task in keys:
        for g in CALIBRATION_GROUPS:
            for i in range(CALIBRATION_BINS):
                c, a = val.get((source, task, g, "bin_confidence", i)), val.get((source, task, g, "bin_accuracy", i))
                if c and a:
                    out.append(
                        f"| {CALIBRATION_NAMES[source]} | {task} | {g} | [{i / 10:.1f}, {(i + 1) / 10:.1f}) | {c['n']} "
                        f"| {c['value']:.4f} | {a['value']:.4f} | {a['value'] - c['value']:+.4f} |"
                    )
    return "\n".join(out) + "\n"


def reliability_series(records: list[dict]) -> dict[tuple[str, str], dict[str, dict[str, list]]]:
    """The reliability diagram's points from :func:`calibration_records`: per (task, group), per
    confidence source, the non-empty bins' mean confidence (x), accuracy (y) and count, by bin."""
    out: dict[tuple[str, str], dict[str, dict[str, list]]] = {}
    bins = {}
    for r in records:
        if r["model"] in CALIBRATION_SOURCES and r["metric"] in ("bin_confidence", "bin_accuracy"):
            bins.setdefault((r["task"], r["group"], r["model"], r["k"]), {})[r["metric"]] = r
    for (task, group, source, _k), b in sorted(bins.items(), key=lambda kv: kv[0][3]):
        if len(b) == 2:
            pts = out.setdefault((task, group), {}).setdefault(source, {"confidence": [], "accuracy": [], "n": []})
            pts["confidence"].append(b["bin_confidence"]["value"])
            pts["accuracy"].append(b["bin_accuracy"]["value"])
            pts["n"].append(b["bin_confidence"]["n"])
    return out


def reliability_plot(records: list[dict], writer, name: str = "reliability.png") -> list[str]:
    """Reliability diagrams next to the report: one panel per task (rows) and EH group (columns),
    one line per confidence source (accuracy against mean confidence per non-empty bin, marker
    area by count; the diagonal is perfect calibration). Nothing is written without points."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = reliability_series(records)
    tasks = [t for t in ("sequential", "direct", "ctr") if any(k[0] == t for k in series)]
    if not tasks:
        return []
    fig, axes = plt.subplots(
        len(tasks), len(CALIBRATION_GROUPS), figsize=(3 * len(CALIBRATION_GROUPS), 2.8 * len(tasks)), squeeze=False
    )
    for i, task in enumerate(tasks):
        for j, group in enumerate(CALIBRATION_GROUPS):
            ax = axes[i][j]
            ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
            for source, pts in series.get((task, group), {}).items():
                n, color = np.asarray(pts["n"], np.float64), f"C{CALIBRATION_SOURCES.index(source)}"
                ax.plot(pts["confidence"], pts["accuracy"], linewidth=1, color=color, label=CALIBRATION_NAMES[source])
                ax.scatter(pts["confidence"], pts["accuracy"], s=8 + 60 * n / max(n.max(), 1), color=color)
            ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{task}, {group}")
            ax.title.set_fontsize(8)
            ax.tick_params(labelsize=7)
            if i == len(tasks) - 1:
                ax.set_xlabel("mean confidence", fontsize=7)
            if j == 0:
                ax.set_ylabel("accuracy", fontsize=7)
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines() if not h.get_label().startswith("_")}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    writer.write_bytes(name, buf.getvalue())
    return [name]


def _fmt(r: dict | None) -> str:
    return f"{r['value']:.4f}" if r and r["value"] == r["value"] else ""


# ------------------------------------------------------------------------ per domain
# A query's domain is its user's (``users.domain``): prepare keys users by (domain, user_key), so
# every user, its history and its target items belong to one domain. Per-domain records are the
# run's records computed on one domain's queries alone (cold-start groups over that domain's
# users), their ``group`` prefixed: ``domain:beauty`` (overall), ``domain:beauty|eh:low``, ...
DOMAIN_PREFIX = "domain:"
DOMAIN_SEP = "|"
DOMAIN_RULE = (
    "a query's domain is its user's: prepare keys users by (domain, user key), so a user's history "
    "and target items are all of one domain"
)
DOMAIN_CAVEAT = (
    "the multi-domain run ranks over the joint catalog of every domain (sequential, full ranking), "
    "the single-domain runs over their own domain's items only; direct / CTR negatives are drawn from "
    "the user's own domain in both"
)
DROP_PROTOCOL = "per-domain drop: multi-domain run minus single-domain run"


def domain_group(domain: str, group: str) -> str:
    """A per-domain record's group: ``domain:{d}`` for ``all``, else ``domain:{d}|{group}``."""
    return f"{DOMAIN_PREFIX}{domain}" + ("" if group == "all" else f"{DOMAIN_SEP}{group}")


def split_domain_group(group: str) -> tuple[str | None, str]:
    """(domain, plain group) of a record's group; (None, group) for an all-domain record."""
    if not group.startswith(DOMAIN_PREFIX):
        return None, group
    domain, _, rest = group[len(DOMAIN_PREFIX) :].partition(DOMAIN_SEP)
    return domain, rest or "all"


def query_domains(users, user_ids: np.ndarray) -> np.ndarray:
    """The domain of each query (its user's ``domain``); None for a user ``users`` lacks."""
    uid = users.column("user_id").to_numpy()
    dom = np.asarray(users.column("domain").to_pylist(), dtype=object)
    pos = np.full(int(max(uid.max(initial=-1), np.max(user_ids, initial=-1))) + 1, -1, np.int64)
    pos[uid] = np.arange(len(uid))
    idx = pos[np.asarray(user_ids, np.int64)]
    return np.where(idx >= 0, dom[np.maximum(idx, 0)] if len(dom) else None, None)


def per_domain(records_of, users, *tables: pa.Table) -> list[dict]:
    """``records_of(*tables)`` on each domain's rows of ``tables`` (each has ``user_id``), groups
    relabelled by :func:`domain_group`. Empty when the rows span fewer than two domains (a
    single-domain run: its overall records are its domain's)."""
    doms = [query_domains(users, t.column("user_id").to_numpy()) for t in tables]
    names = sorted({d for ds in doms for d in ds.tolist() if d is not None})
    if len(names) < 2:
        return []
    out = []
    for name in names:
        subset = [t.filter(pa.array(d == name)) for t, d in zip(tables, doms)]
        out += [{**r, "group": domain_group(name, r["group"])} for r in records_of(*subset)]
    return out


def split_by_domain(records: list[dict]) -> tuple[list[dict], dict[str, list[dict]]]:
    """(all-domain records, {domain: its records with plain groups}); drop records stay out of both."""
    overall: list[dict] = []
    by: dict[str, list[dict]] = {}
    for r in records:
        if r["protocol"].startswith(DROP_PROTOCOL):
            continue
        domain, group = split_domain_group(r["group"])
        if domain is None:
            overall.append(r)
        else:
            by.setdefault(domain, []).append({**r, "group": group})
    return overall, dict(sorted(by.items()))


def domain_markdown(records: list[dict], protocol: dict[str, str]) -> str:
    """Every table of the report once per domain: the system tables (when scored) and the tools'."""
    _, by = split_by_domain(records)
    if not by:
        return ""
    out = [f"## Per domain\n\nQueries split by domain ({DOMAIN_RULE}); n = that domain's test queries.\n"]
    for domain, recs in by.items():
        out.append(f"## Domain `{domain}`\n")
        system = [r for r in recs if r["model"] == "reasonrec"]
        if system:
            # system_markdown's own heading (its first line) gives way to the domain's.
            out.append(f"### System (ReasonRec routed scoring), domain `{domain}`\n")
            out.append(system_markdown(system).split("\n", 1)[1])
        out.append(markdown_tables(recs, protocol))
    return "\n".join(out)


def domain_drop_records(records: list[dict], baselines: dict[str, tuple[str, list[dict]]]) -> list[dict]:
    """Per domain with a baseline (``{domain: (single-domain run name, its records)}``): the
    headline metrics (:data:`COMPARE_METRICS`, history kept) of this run's queries of that domain
    next to the single-domain run's overall ones. A record per (task, model, metric) both have:
    ``value`` = drop = multi - single, ``relative`` = drop / single (NaN where single is 0),
    ``multi`` / ``single`` the two values, ``baseline`` the run, ``group`` ``domain:{d}``."""
    _, by = split_by_domain(records)
    out = []
    for domain, (run, base_records) in sorted(baselines.items()):
        multi, single = _headline(by.get(domain, [])), _headline(base_records)
        for key in sorted(set(multi) & set(single), key=_compare_order):
            m, s = multi[key]["value"], single[key]["value"]
            task, model, metric, k = key
            out.append(
                {
                    "task": task,
                    "model": model,
                    "protocol": f"{DROP_PROTOCOL} `{run}`",
                    "metric": metric,
                    "k": k,
                    "group": domain_group(domain, "all"),
                    "value": float(m - s),
                    "relative": float((m - s) / s) if s else float("nan"),
                    "multi": float(m),
                    "single": float(s),
                    "n": multi[key]["n"],
                    "n_single": single[key]["n"],
                    "baseline": run,
                }
            )
    return out


def _compare_order(key: tuple) -> tuple:
    """(task, model, metric, k) in :data:`COMPARE_METRICS` order, ``reasonrec`` first."""
    task, model, metric, k = key
    tasks = list(COMPARE_METRICS)
    return (tasks.index(task), model != "reasonrec", model, COMPARE_METRICS[task].index((metric, k)))


def domain_drop_markdown(drops: list[dict], run_name: str, missing: dict[str, str | None] | None = None) -> str:
    """The per-domain section: each domain's headline numbers next to its single-domain run's;
    ``missing`` maps the domains without one to the run named for them that has no report yet
    (None: no run named in ``evaluate.domain_baselines``)."""
    missing = missing or {}
    if not drops and not missing:
        return ""
    out = [
        "## Per-domain drop (multi-domain vs single-domain runs)\n",
        f"This run (`{run_name}`) trains one set of tools and one VLM on every domain; each domain's "
        f"numbers here are on its own test queries ({DOMAIN_RULE}), next to the single-domain run of "
        "that domain (overall values, history kept). Drop = multi - single (absolute; negative = "
        f"the multi-domain run is worse there), and relative to single. Caveat: {DOMAIN_CAVEAT}.\n",
        "| domain | single-domain run | task | model | metric | multi | n | single | n | drop | relative |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in drops:
        domain, _ = split_domain_group(r["group"])
        name = f"{r['metric'].upper()}@{r['k']}" if r["k"] else r["metric"].upper()
        rel = f"{r['relative']:+.1%}" if r["relative"] == r["relative"] else ""
        out.append(
            f"| {domain} | `{r['baseline']}` | {r['task']} | {r['model']} | {name} | {r['multi']:.4f} | {r['n']} "
            f"| {r['single']:.4f} | {r['n_single']} | {r['value']:+.4f} | {rel} |"
        )
    for d, run in sorted(missing.items()):
        out.append(
            f"\nDomain `{d}`: its single-domain run `{run}` has no report under this output_root yet "
            "(evaluate it, then re-run this evaluate)."
            if run
            else f"\nDomain `{d}`: no single-domain run named (`evaluate.domain_baselines`)."
        )
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------ protocol comparison
COMPARE_METRICS = {
    "sequential": [("hr", 5), ("ndcg", 5), ("hr", 10)],
    "direct": [("hr", 5), ("ndcg", 5)],
    "ctr": [("auc", None)],
    "explanation": [("rouge_l", None)],
}


def _headline(records: list[dict]) -> dict[tuple, dict]:
    """The records :func:`comparison_markdown` compares: overall (``all``) values of the main
    metrics per task and model, history kept (no masked, routing, disagreement or calibration rows)."""
    out = {}
    for r in records:
        if r["group"] != "all" or (r["metric"], r["k"]) not in COMPARE_METRICS.get(r["task"], []):
            continue
        p = r["protocol"]
        if "masked" in p or p.startswith(("routing", "calibration")) or p == DISAGREEMENT_PROTOCOL:
            continue
        out[(r["task"], r["model"], r["metric"], r["k"])] = r
    return out


def comparison_markdown(runs: list[tuple[str, str, list[dict]]]) -> str:
    """One table per task: models x runs (``(label, split protocol, records)``, this run first),
    the main metrics overall with their query counts; the protocols named under the table."""
    heads = [(label, split, _headline(recs)) for label, split, recs in runs]
    out = [
        "## Split protocols side by side (overall values, history kept; each run's line says how its "
        "`reasonrec` rows were scored)\n"
    ]
    out += [f"- `{label}`: {split}" for label, split, _ in heads]
    out.append("")
    for task, cols in COMPARE_METRICS.items():
        models = sorted({k[1] for _, _, h in heads for k in h if k[0] == task}, key=lambda m: (m != "reasonrec", m))
        if not models:
            continue
        names = [f"{m.upper()}@{k}" if k else m.upper() for m, k in cols]
        out.append(f"### {task}\n")
        out.append("| model | " + " | ".join(f"{label}: {n}" for label, _, _ in heads for n in names + ["n"]) + " |")
        out.append("|---|" + "---|" * (len(heads) * (len(cols) + 1)))
        for model in models:
            cells = []
            for _, _, h in heads:
                recs = [h.get((task, model, m, k)) for m, k in cols]
                cells += [f"{r['value']:.4f}" if r and r["value"] == r["value"] else "" for r in recs]
                cells.append(str(next((r["n"] for r in recs if r), "")))
            out.append(f"| {model} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)
