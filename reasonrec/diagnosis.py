"""Where the planner's tool choice goes wrong, with numbers (Ray-free; numpy / pyarrow).

* :func:`pick_table`: per grouping (``all``, EH bucket, cold-start group, ...), per group and per
  tool: how often the planner picked the tool as primary, how often it was right on those
  queries, which tool would have been right most often on those same queries, and the system's
  hit rate in the group against every tool's hit rate over the whole group.
* :func:`reliability`: the reliability table (equal-width bins of the predicted P(right): count,
  mean prediction, observed rate) of a probability, its ECE (the run's one ECE function,
  :func:`reasonrec.metrics.expected_calibration_error`, on the same bins) and Brier score.
* :func:`answer_rightness`: every tool's answer to a task's queries through the scoring path
  (``ToolBox.answer`` -> ``query_features`` -> ``TaskPlanner.usable_prob``): per query and tool,
  right or not and the planner's P(tool right).
* ``*_markdown``: compact Markdown tables of the above.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from reasonrec.metrics import COLD_START_AGGREGATES
from reasonrec.vocab import EH_BUCKETS


# ------------------------------------------------------------------------------ picks
def _group_order(value: str) -> tuple:
    """EH buckets in their natural order, then anything else by name."""
    return (0, EH_BUCKETS.index(value), "") if value in EH_BUCKETS else (1, 0, value)


def _rate(x: np.ndarray) -> float | None:
    return float(x.mean()) if len(x) else None


def pick_table(
    primary: Sequence[str | None],
    right: Mapping[str, Sequence[bool]],
    groups: Mapping[str, Sequence[Any]] | None = None,
    prob: Mapping[str, Sequence[float]] | None = None,
    system: Sequence[bool] | None = None,
) -> list[dict[str, Any]]:
    """One row per grouping x group x tool (grouping ``all`` first, then ``groups`` in order).

    ``primary`` [n]: the planner's primary tool per query; ``right[tool]`` [n]: was that tool
    right on the query; ``groups[name]`` [n]: the query's group label under that grouping;
    ``prob[tool]`` [n] (optional): the planner's P(tool right); ``system`` [n] (optional): was the
    system right (default: its primary tool's rightness).

    Row keys: ``grouping``, ``group``, ``tool``; the group's ``n_group``, ``system_right``,
    ``group_best_tool`` / ``group_best_right`` (the best single tool over the whole group),
    ``group_oracle_right`` (any tool right); the tool's ``tool_right_group`` (over the whole
    group), ``picked`` (queries with it as primary), ``share`` (of the group), ``right_when_picked``,
    ``best_on_picks`` / ``best_on_picks_right`` (the tool right most often on those same
    queries), ``oracle_on_picks`` and ``p_when_picked`` (mean P(right), with ``prob``). Rates over
    no queries are None. A primary that is not a key of ``right`` (e.g. None) gets its own row,
    judged by ``system``."""
    names = list(right)
    prim = np.array(["" if p is None else str(p) for p in primary], dtype=object)
    n = len(prim)
    r = np.stack([np.asarray(right[t], bool) for t in names], 1) if names else np.zeros((n, 0), bool)
    if r.shape[0] != n:
        raise ValueError(f"right has {r.shape[0]} rows but primary has {n}")
    col = {t: i for i, t in enumerate(names)}
    if system is None:
        idx = np.array([col.get(p, -1) for p in prim], np.int64)
        sys_right = np.where(idx >= 0, r[np.arange(n), np.maximum(idx, 0)] if names else False, False)
    else:
        sys_right = np.asarray(system, bool)
    p = {t: np.asarray(prob[t], np.float64) for t in names} if prob is not None else None
    tools = names + sorted(set(prim.tolist()) - set(names))
    groupings = {
        "all": np.full(n, "all", dtype=object),
        **{k: np.asarray(v, dtype=object) for k, v in (groups or {}).items()},
    }
    rows: list[dict[str, Any]] = []
    for grouping, labels in groupings.items():
        if len(labels) != n:
            raise ValueError(f"grouping '{grouping}' has {len(labels)} labels for {n} queries")
        text = np.array([str(x) for x in labels.tolist()], dtype=object)
        for g in sorted(set(text.tolist()), key=_group_order):
            m = text == g
            rg = r[m]
            rates = rg.mean(0) if names else np.zeros(0)
            best = int(np.argmax(rates)) if names else None
            head = {
                "grouping": grouping,
                "group": g,
                "n_group": int(m.sum()),
                "system_right": _rate(sys_right[m]),
                "group_best_tool": names[best] if best is not None else None,
                "group_best_right": float(rates[best]) if best is not None else None,
                "group_oracle_right": _rate(rg.any(1)) if names else None,
            }
            for t in tools:
                sel = m & (prim == t)
                k = int(sel.sum())
                rs = r[sel]
                on = rs.mean(0) if k and names else None
                b = int(np.argmax(on)) if on is not None else None
                rows.append(
                    {
                        **head,
                        "tool": t,
                        "tool_right_group": float(rates[col[t]]) if t in col else None,
                        "picked": k,
                        "share": k / int(m.sum()),
                        "right_when_picked": (_rate(rs[:, col[t]]) if t in col else _rate(sys_right[sel]))
                        if k
                        else None,
                        "best_on_picks": names[b] if b is not None else None,
                        "best_on_picks_right": float(on[b]) if b is not None else None,
                        "oracle_on_picks": _rate(rs.any(1)) if k and names else None,
                        "p_when_picked": float(p[t][sel].mean()) if k and p is not None and t in p else None,
                    }
                )
    return rows


def cold_start_labels(groups: Sequence[int]) -> np.ndarray:
    """Cold-start group 1..10 (:func:`reasonrec.metrics.cold_start_groups`) -> a partition label:
    the paper's ``coldest`` (1-3) and ``medium`` (4-6) aggregates, ``warm`` for the rest (7-10);
    0 (an unknown user) -> ``unknown``."""
    parts = [(k, v) for k, v in COLD_START_AGGREGATES.items() if k != "normal"]
    taken = {g for _, v in parts for g in v}
    rest = [g for g in COLD_START_AGGREGATES["normal"] if g not in taken]
    out = []
    for g in np.asarray(groups, np.int64).tolist():
        for name, v in parts:
            if g in v:
                out.append(f"{min(v)}-{max(v)} {name}")
                break
        else:
            out.append(f"{min(rest)}-{max(rest)} warm" if g in rest else "unknown")
    return np.array(out, dtype=object)


# ------------------------------------------------------------------------ calibration
def reliability(prob: Sequence[float], right: Sequence[bool], bins: int = 10) -> dict[str, Any]:
    """Reliability table of ``prob`` against ``right``: ``bins`` equal-width bins over [0, 1]
    (bin ``min(floor(p * bins), bins - 1)``, the ECE's binning), each with ``lo``, ``hi``, ``n``,
    ``mean_pred`` and ``observed`` (None when empty); ``ece`` (weighted |mean pred - observed|, by
    :func:`reasonrec.metrics.expected_calibration_error`), ``brier``, ``n``, ``mean_pred``,
    ``observed``. Non-finite probabilities are left out, as the ECE does."""
    from reasonrec.metrics import expected_calibration_error

    p = np.asarray(prob, np.float64).reshape(-1)
    y = np.asarray(right, np.float64).reshape(-1)
    if len(p) != len(y):
        raise ValueError(f"prob has {len(p)} rows but right has {len(y)}")
    ok = np.isfinite(p)
    p, y = np.clip(p[ok], 0.0, 1.0), y[ok]
    idx = np.minimum((p * bins).astype(int), bins - 1)
    table = []
    for b in range(bins):
        sel = idx == b
        table.append(
            {
                "lo": b / bins,
                "hi": (b + 1) / bins,
                "n": int(sel.sum()),
                "mean_pred": _rate(p[sel]),
                "observed": _rate(y[sel]),
            }
        )
    return {
        "n": int(len(p)),
        "mean_pred": _rate(p),
        "observed": _rate(y),
        "ece": expected_calibration_error(p, y, bins) if len(p) else None,
        "brier": float(np.mean((p - y) ** 2)) if len(p) else None,
        "bins": table,
    }


# --------------------------------------------------------------------- tool answers
def answer_rightness(
    rows: Sequence[Mapping[str, Any]],
    toolbox,
    planner,
    users,
    popularity: np.ndarray,
    split: str = "test",
    k: int = 10,
    correct_k: int = 5,
    batch: int = 1000,
) -> dict[str, Any]:
    """Every tool's answer to queries of one task (QUERIES rows with truth), through the scoring
    path (:class:`reasonrec.scoring.Router`: ``users.resolve`` with the row's history and
    ``split``, ``toolbox.answer`` with ``k``, ``query_features``, ``planner.usable_prob``), in
    batches of ``batch`` (direct: per candidate-list length). Returns ``query_id`` and
    ``user_id`` [n] (input order), ``names`` (the planner's tools), ``right[tool]`` [n] (truth in
    the top ``correct_k``; CTR: the label's side of 0.5, ``ToolAnswers.correct``), ``prob[tool]`` [n]
    (P(tool right)) and ``learned`` [n] (the tool the learned choice ranks first: highest P)."""
    from reasonrec.planner import answer_rows, query_features

    names = list(planner.names)
    n = len(rows)
    right = {t: np.zeros(n, bool) for t in names}
    prob = {t: np.full(n, np.nan) for t in names}
    learned = np.empty(n, dtype=object)
    by: dict[tuple[str, int], list[int]] = {}
    for i, r in enumerate(rows):
        by.setdefault((r["task"], len(r.get("candidates") or []) if r["task"] == "direct" else 0), []).append(i)
    for (task, _), idx in by.items():
        for s in range(0, len(idx), max(batch, 1)):
            part = idx[s : s + max(batch, 1)]
            sub = [rows[i] for i in part]
            st = [users.resolve(r["user_id"], r.get("history"), split) for r in sub]
            hists = [x.history for x in st]
            ans = answer_rows(toolbox, task, sub, st, k)
            if list(ans.names) != names:
                raise ValueError(f"{task}: the toolbox answers with {ans.names}, the planner knows {names}")
            col = "label" if task == "ctr" else "target"
            truth = np.array([-1 if r.get(col) is None else r[col] for r in sub])
            feats = query_features(
                ans, np.array([x.eh for x in st]), np.array([len(h) for h in hists]), np.asarray(popularity)
            )
            p = planner.usable_prob(feats)
            pos = np.asarray(part, np.int64)
            for j, t in enumerate(names):
                right[t][pos] = ans.correct(t, truth, correct_k)
                prob[t][pos] = p[:, j]
            learned[pos] = [names[j] for j in np.argsort(-p, axis=1, kind="stable")[:, 0]]
    return {
        "query_id": np.array([r["query_id"] for r in rows], np.int64),
        "user_id": np.array([r["user_id"] for r in rows], np.int64),
        "names": names,
        "right": right,
        "prob": prob,
        "learned": learned,
    }


# ------------------------------------------------------------------------- markdown
def _f(x: float | None, digits: int = 4) -> str:
    return "" if x is None or x != x else f"{x:.{digits}f}"


def pick_markdown(rows: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """Two tables from :func:`pick_table` rows: per group the system against the best single tool
    and the oracle (any tool right); then per group each picked tool (most picked first) with its
    hit rate on its picks, the best tool on those same picks, and its own rate over the group."""
    out = [f"#### {title}\n"] if title else []
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["grouping"], r["group"]), []).append(r)

    def name(key):
        return "all" if key[0] == "all" else f"{key[0]}: {key[1]}"

    out += ["| group | n | system | best single tool | oracle (any tool) |", "|---|---|---|---|---|"]
    for key, rs in groups.items():
        h = rs[0]
        best = f"{h['group_best_tool']} {_f(h['group_best_right'])}" if h["group_best_tool"] else ""
        out.append(
            f"| {name(key)} | {h['n_group']} | {_f(h['system_right'])} | {best} | {_f(h['group_oracle_right'])} |"
        )
    out += [
        "",
        "| group | picked tool | picks | share | right when picked | mean P(right) | best tool on these picks "
        "| oracle on picks | tool over group |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, rs in groups.items():
        for r in sorted((r for r in rs if r["picked"]), key=lambda r: -r["picked"]):
            best = f"{r['best_on_picks']} {_f(r['best_on_picks_right'])}" if r["best_on_picks"] else ""
            out.append(
                f"| {name(key)} | {r['tool'] or '(none)'} | {r['picked']} | {_f(r['share'], 3)} | "
                f"{_f(r['right_when_picked'])} | {_f(r['p_when_picked'])} | {best} | {_f(r['oracle_on_picks'])} "
                f"| {_f(r['tool_right_group'])} |"
            )
    return "\n".join(out) + "\n"


def calibration_markdown(rels: Mapping[str, Mapping[str, Any]], title: str = "") -> str:
    """One row per predictor (e.g. tool) of :func:`reliability` outputs: n, mean P, observed rate,
    ECE, Brier, and the fullest bin with the largest gap."""
    out = [f"#### {title}\n"] if title else []
    out += [
        "| tool | n | mean P(right) | observed | ECE | Brier | bin adding most to ECE (n, P -> observed) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rel in rels.items():
        full = [b for b in rel["bins"] if b["n"]]
        worst = max(full, key=lambda b: abs(b["mean_pred"] - b["observed"]) * b["n"], default=None)
        w = (
            f"[{worst['lo']:.1f}, {worst['hi']:.1f}) "
            f"({worst['n']}, {worst['mean_pred']:.3f} -> {worst['observed']:.3f})"
            if worst
            else ""
        )
        out.append(
            f"| {name} | {rel['n']} | {_f(rel['mean_pred'])} | {_f(rel['observed'])} | {_f(rel['ece'])} "
            f"| {_f(rel['brier'])} | {w} |"
        )
    return "\n".join(out) + "\n"


def reliability_markdown(rel: Mapping[str, Any], title: str = "") -> str:
    """The non-empty bins of one :func:`reliability` table, with its ECE and Brier in the heading."""
    head = f"{title}: " if title else ""
    out = [
        f"#### {head}ECE {_f(rel['ece'])}, Brier {_f(rel['brier'])}, n {rel['n']}\n",
        "| P(right) bin | n | mean P | observed | gap |",
        "|---|---|---|---|---|",
    ]
    for b in rel["bins"]:
        if b["n"]:
            out.append(
                f"| [{b['lo']:.1f}, {b['hi']:.1f}) | {b['n']} | {b['mean_pred']:.4f} | {b['observed']:.4f} "
                f"| {b['observed'] - b['mean_pred']:+.4f} |"
            )
    return "\n".join(out) + "\n"
