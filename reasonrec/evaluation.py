"""Evaluation library: metric records and report tables for the tools and the routed system (Ray-free).

Protocols (stated next to every number):
* sequential: leave-one-out test item, ranked over the full catalog, once with the history kept
  and once with the history items masked (RecBole's full-sort protocol);
* direct: the test item among its candidate list (1 + ``data.direct_negatives`` sampled unseen items);
* ctr: the 8:1:1 per-user CTR test split with ``data.ctr_negatives`` sampled negatives per positive.

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


def protocols(cfg: RunConfig) -> dict[str, str]:
    return {
        "sequential": "full-catalog ranking, leave-one-out test item",
        "direct": f"1 positive + {cfg.data.direct_negatives} sampled negatives, leave-one-out test item",
        "ctr": (
            f"leave-one-out test items as positives, {cfg.data.ctr_negatives} negatives per positive (test split)"
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


def evaluate_tools(store: ArtifactStore, cfg: RunConfig) -> list[dict]:
    users = store.read_table("prepare", "users", columns=["user_id", "n_train", "eh_bucket"])
    proto = protocols(cfg)
    records: list[dict] = []
    preds = read_split(
        store,
        "train_tools",
        "predictions",
        ["user_id", "tool", "rank", "rank_excl", "cand_rank", "n_candidates", "split"],
    )
    for tool in sorted(set(preds.column("tool").to_pylist())):
        t = preds.filter(pc.equal(preds.column("tool"), tool))
        uids = t.column("user_id").to_numpy()
        buckets, groups = segments(users, uids)
        for column, protocol in (("rank", proto["sequential"]), ("rank_excl", SEQ_MASKED)):
            ranks = t.column(column).to_numpy()
            per_query = {f"{m}@{k}": f(ranks, k) for k in KS for m, f in (("hr", hit_at_k), ("ndcg", ndcg_at_k))}
            records += _records("sequential", tool, protocol, breakdown(per_query, buckets, groups))
        has = t.column("n_candidates").to_numpy() > 0
        if has.any():
            cr = t.column("cand_rank").to_numpy()[has]
            per_query = {f"{m}@{k}": f(cr, k) for k in (5, 10) for m, f in (("hr", hit_at_k), ("ndcg", ndcg_at_k))}
            records += _records("direct", tool, proto["direct"], breakdown(per_query, buckets[has], groups[has]))
    from reasonrec.tools import tool_class

    ctr = read_split(store, "train_tools", "ctr_predictions", ["user_id", "tool", "label", "prob", "split"])
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
        ("sequential", SEQ_MASKED, seq),
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
        "explanation": f"8:1:1 per-user split (test), review text as reference; {BLEU_SETTINGS}; {ROUGE_SETTINGS}",
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
