"""Scoring a batch of queries: the planner's routing (tools, tiers, low-risk answers) and the VLM's
answers for medium / high risk. Ray-free: the batch job wraps :class:`Router` and
:class:`VLMAnswerer` in Ray Data actor pools, the Serve app in deployments.

A query row follows ``schemas.QUERIES``; routing adds the decision columns (``ROUTED``); the VLM
step turns routed rows into ``schemas.PREDICTIONS``. A row that cannot be scored (unknown task,
unknown item ids, empty candidate list, ...) is rejected with its reason in ``error``, never
dropped: input rows = predictions + rejected.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reasonrec.config import PlannerConfig
from reasonrec.data.catalog import Catalog, PromptBuilder, UserDirectory, UserState
from reasonrec.data.schemas import PREDICTIONS, QUERIES, summary_counts
from reasonrec.hashing import splitmix64
from reasonrec.planner import (
    Decision,
    TaskPlanner,
    ToolBox,
    ToolHint,
    answer_rows,
    explanation_decision,
    plan,
    query_features,
)
from reasonrec.prompts.cot import ANSWER_MARKER
from reasonrec.vocab import TASKS

ROUTED = pa.schema(
    list(QUERIES)
    + [
        pa.field("route", pa.string()),
        pa.field("tools_used", pa.list_(pa.string())),
        pa.field("tool_confidence", pa.float32()),
        pa.field("items", pa.list_(pa.int64())),  # low tier: the tool's answer
        pa.field("prob", pa.float32()),
        pa.field("rationale", pa.string()),
        pa.field("hints", pa.string()),  # JSON: the consulted tools' answers (high tier)
        pa.field("primary_tool", pa.string()),
        pa.field("tool_items", pa.list_(pa.int64())),  # the primary tool's answer, every tier
        pa.field("tool_prob", pa.float32()),
        pa.field("eh_bucket", pa.string()),
        pa.field("cold_user", pa.bool_()),
        pa.field("tools_ms", pa.float32()),
        pa.field("tools_flops", pa.float64()),
        pa.field("error", pa.string()),
        # Set by :func:`apply_vlm_budget` (score.vlm_budget): routed to the VLM, answered by the tool.
        pa.field("vlm_skipped", pa.bool_()),
    ]
)
SCORED = pa.schema(list(PREDICTIONS) + [pa.field("error", pa.string())])


@contextmanager
def counted_flops(enabled: bool) -> Iterator[Callable[[], float | None]]:
    """``with counted_flops(on) as total:`` ... ``total()`` = torch FLOPs inside the block (None
    when off). torch's own counter: no hand-written per-layer formulas."""
    if not enabled:
        yield lambda: None
        return
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        yield lambda: float(counter.get_total_flops())


def _validate(task: str, row: Mapping[str, Any], catalog: Catalog) -> str | None:
    """Why a query cannot be scored, or None."""
    if task not in TASKS:
        return f"unknown task '{task}'"
    if row.get("user_id") is None:
        return "user_id is required"
    try:
        if row.get("history") is not None:
            catalog.check(row["history"], "history")
        if task == "direct":
            cands = row.get("candidates") or []
            if not cands:
                return "direct queries need a non-empty candidates list"
            if len(set(cands)) != len(cands):
                return "candidates list has duplicate items"
            catalog.check(cands, "candidates")
        if task in ("ctr", "explanation"):
            if row.get("item_id") is None:
                return f"{task} queries need item_id"
            catalog.check([row["item_id"]], "item_id")
    except ValueError as exc:
        return str(exc)
    return None


class Router:
    """Loads nothing itself (tools, planners and context are passed in: load once per actor)."""

    def __init__(
        self,
        toolbox: ToolBox,
        planners: Mapping[str, TaskPlanner],
        users: UserDirectory,
        catalog: Catalog,
        cfg: PlannerConfig,
        k: int = 10,
        mode: str = "routed",
        split: str = "test",
        count_flops: bool = False,
    ):
        self.toolbox, self.planners, self.users, self.catalog = toolbox, dict(planners), users, catalog
        self.cfg, self.k, self.mode, self.split, self.count_flops = cfg, k, mode, split, count_flops

    def __call__(self, queries: pa.Table) -> pa.Table:
        rows = queries.to_pylist()
        out: list[dict[str, Any]] = [None] * len(rows)  # type: ignore[list-item]
        by_task: dict[tuple[str, int], list[int]] = {}
        states: dict[int, UserState] = {}
        for i, r in enumerate(rows):
            err = _validate(r.get("task"), r, self.catalog)
            if err is None:
                try:
                    states[i] = self.users.resolve(r["user_id"], r.get("history"), self.split)
                except ValueError as exc:
                    err = str(exc)
            if err is not None:
                out[i] = {**r, "route": "rejected", "error": err, "tools_used": [], "cold_user": False}
                continue
            # Direct queries are grouped by candidate-list length (tools score a [B, C] block).
            group = (r["task"], len(r["candidates"]) if r["task"] == "direct" else 0)
            by_task.setdefault(group, []).append(i)
        for (task, _), idx in by_task.items():
            t0 = time.perf_counter()
            with counted_flops(self.count_flops) as flops:
                if task == "explanation":
                    decisions = [explanation_decision(states[i].bucket, states[i].eh, states[i].cold_user) for i in idx]
                    answers = None
                else:
                    decisions, answers = self._plan(task, [rows[i] for i in idx], [states[i] for i in idx])
            ms = (time.perf_counter() - t0) * 1000 / len(idx)
            per_query_flops = None if flops() is None else flops() / len(idx)
            for j, (i, d) in enumerate(zip(idx, decisions)):
                st = states[i]
                rec = {
                    **rows[i],
                    "route": d.tier,
                    "tools_used": d.tools,
                    "tool_confidence": None if np.isnan(d.confidence) else d.confidence,
                    "rationale": d.rationale,
                    "eh_bucket": st.bucket,
                    "cold_user": st.cold_user,
                    "tools_ms": ms,
                    "tools_flops": per_query_flops,
                    "error": None,
                    "history": st.history.tolist(),
                }
                if answers is not None:
                    rec["primary_tool"] = d.primary
                    if task == "ctr":
                        rec["tool_prob"] = float(answers.prob[d.primary][j])
                    else:
                        rec["tool_items"] = [i for i in answers.items[d.primary][j, : self.k].tolist() if i >= 0]
                if d.tier == "low":  # the tool's answer is the answer
                    rec["prob"], rec["items"] = rec.get("tool_prob"), rec.get("tool_items")
                elif d.tier == "high" and answers is not None:
                    rec["hints"] = json.dumps([vars(answers.hint(n, j, self.catalog.text)) for n in d.tools])
                out[i] = rec
        return pa.Table.from_pylist(out, schema=ROUTED)

    def _plan(self, task: str, rows: list[dict], states: list[UserState]) -> tuple[list[Decision], Any]:
        hists = [s.history for s in states]
        planner = self.planners[task]
        fuse = planner.uses_fusion and self.cfg.tool_choice == "learned"
        k = max(self.k, planner.fusion.top_n) if fuse else self.k
        answers = answer_rows(self.toolbox, task, rows, states, k)
        eh, hist_len = np.array([s.eh for s in states]), np.array([len(h) for h in hists])
        feats = query_features(answers, eh, hist_len, self.catalog.popularity)
        if fuse:  # the guard chose the fused ranking of the tools' answers (reasonrec/fusion.py)
            answers.items["fusion"] = planner.fuse(answers, eh, hist_len, hists, self.catalog.popularity, self.k)
        truth = None
        if self.cfg.tool_choice == "oracle":
            col = "label" if task == "ctr" else "target"
            truth = np.array([-1 if r.get(col) is None else r[col] for r in rows])
        keys = np.array([r["query_id"] for r in rows], np.int64)
        decisions = plan(
            planner,
            answers,
            feats,
            [s.bucket for s in states],
            eh,
            keys,
            self.cfg,
            self.mode,
            [s.cold_user for s in states],
            truth,
        )
        return decisions, answers


def build_router(cfg, store, split: str = "test", toolbox=None) -> Router:
    """The router a run's config describes (the batch job's actors and the Serve planner build it
    here, so online and offline decisions match). ``toolbox`` replaces the in-process tools (the
    Serve planner passes one that calls the tool deployment); None loads them from ``store``."""
    from reasonrec.data.catalog import load_context
    from reasonrec.planner import load_planners, load_toolbox

    catalog, users, _ = load_context(store, cfg.vlm, cfg.data.eh_thresholds)
    return Router(
        toolbox if toolbox is not None else load_toolbox(store),
        load_planners(store, cfg.planner),
        users,
        catalog,
        cfg.planner,
        cfg.score.k,
        cfg.score.mode,
        split,
        cfg.score.count_flops,
    )


def build_vlm_answerer(cfg, store, split: str = "test", batch_size: int | None = None) -> VLMAnswerer:
    """The fine-tuned VLM answerer of a run, with the instruction builder's template mixture and
    prompt candidates (what the adapter was trained on)."""
    from reasonrec.data.catalog import load_context
    from reasonrec.prompts.templates import TemplateSampler
    from reasonrec.vlm.infer import VLMPredictor
    from reasonrec.vlm.train import load_finetuned

    ic = cfg.instructions
    catalog, users, prompts = load_context(
        store,
        cfg.vlm,
        cfg.data.eh_thresholds,
        TemplateSampler(ic.template_mixture, ic.single_template, ic.seed),
        ic.prompt_candidates,
    )
    predictor = VLMPredictor(load_finetuned(store, cfg.vlm))
    return VLMAnswerer(
        predictor,
        prompts,
        users,
        catalog,
        cfg.score.k,
        split,
        cfg.score.vlm_batch_size if batch_size is None else batch_size,
        cfg.score.count_flops,
        cfg.vlm.sequential_pool,
    )


# --------------------------------------------------------------------------------- VLM budget
VLM_TIERS = ("medium", "high")  # the tiers the VLM answers
# Explanation queries have no tool answer (only the VLM writes one): they come first.
EXPLANATION_GAIN = float("inf")
NEUTRAL_VLM_RIGHT = 0.5  # P(VLM right) where the planner has no estimate for the bucket
BUDGET_COLUMNS = ["query_id", "task", "route", "eh_bucket", "tool_confidence"]
BUDGET_SELECTION = pa.schema([("query_id", pa.int64()), ("task", pa.string()), ("gain", pa.float64())])
BUDGET_NOTE = "; VLM budget spent"


def vlm_gains(routed: pa.Table, vlm_right: Mapping[str, Mapping[str, float]]) -> np.ndarray:
    """Expected gain of asking the VLM, per row of ``routed`` (:data:`BUDGET_COLUMNS` suffice):
    P(VLM right) - P(tool right), i.e. the planner's ``vlm_right[task][eh_bucket]``
    (:attr:`TaskPlanner.vlm_right`, :data:`NEUTRAL_VLM_RIGHT` where absent) minus the row's
    ``tool_confidence`` (0 where null: no evidence the tool is right); explanation rows get
    :data:`EXPLANATION_GAIN`."""
    tasks = routed.column("task").to_pylist()
    buckets = routed.column("eh_bucket").to_pylist()
    conf = routed.column("tool_confidence").to_pylist()
    out = np.empty(len(tasks), np.float64)
    for i, (t, b, c) in enumerate(zip(tasks, buckets, conf)):
        if t == "explanation":
            out[i] = EXPLANATION_GAIN
        else:
            p = (vlm_right.get(t) or {}).get(b)
            out[i] = (NEUTRAL_VLM_RIGHT if p is None else float(p)) - (0.0 if c is None else float(c))
    return out


def select_for_vlm_budget(routed: pa.Table, vlm_right: Mapping[str, Mapping[str, float]], budget: int) -> pa.Table:
    """The queries the VLM answers under a budget of ``budget`` calls (negative: unlimited): of
    the rows routed to the VLM (:data:`VLM_TIERS`), the ``budget`` largest :func:`vlm_gains`,
    ties broken by a hash of ``query_id`` (deterministic, and spread over the whole query table:
    by ``query_id`` itself, tied gains sent every call to the first shards and the first task).
    Returns :data:`BUDGET_SELECTION` rows, best first."""
    cand = routed.filter(pc.is_in(routed.column("route"), pa.array(list(VLM_TIERS))))
    gains = vlm_gains(cand, vlm_right)
    ids = cand.column("query_id").to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.lexsort((ids, splitmix64(ids), -gains))  # last key first: gain descending, hash, id
    if budget >= 0:
        order = order[:budget]
    return pa.table(
        {
            "query_id": pa.array(ids[order], pa.int64()),
            "task": cand.column("task").take(pa.array(order, pa.int64())),
            "gain": pa.array(gains[order], pa.float64()),
        },
        schema=BUDGET_SELECTION,
    )


def apply_vlm_budget(routed: pa.Table, selected: set[int] | frozenset[int]) -> pa.Table:
    """Routed rows -> the same rows with the VLM budget applied: a row routed to the VLM whose
    ``query_id`` is not in ``selected`` is flagged ``vlm_skipped`` and answered by its primary
    tool (items / prob = tool_items / tool_prob; an explanation gets no text), its rationale
    saying so; the VLM answers only the selected ones."""
    rows = routed.to_pylist()
    for r in rows:
        skip = r["route"] in VLM_TIERS and r["query_id"] not in selected
        r["vlm_skipped"] = skip
        if skip:
            r["items"], r["prob"] = r.get("tool_items"), r.get("tool_prob")
            who = f": {r['primary_tool']} answers" if r.get("primary_tool") else ": no VLM answer"
            r["rationale"] = f"{r.get('rationale') or ''}{BUDGET_NOTE}{who}"
    return pa.Table.from_pylist(rows, schema=routed.schema)


# --------------------------------------------------------------------------------- VLM
def to_scored(routed: pa.Table, answers: Mapping[int, dict] | None = None) -> pa.Table:
    """Routed rows -> SCORED rows; ``answers[row]`` holds the VLM's answer where it ran."""
    answers = answers or {}
    out = []
    for i, r in enumerate(routed.to_pylist()):
        a = answers.get(i, {})
        out.append(
            {
                "query_id": r["query_id"],
                "user_id": r["user_id"],
                "task": r["task"],
                "route": r["route"],
                "tools_used": r.get("tools_used") or [],
                "confidence": a.get("confidence", r.get("tool_confidence")),
                "items": a.get("items", r.get("items")),
                "prob": a.get("prob", r.get("prob")),
                "text": a.get("text"),
                "rationale": r.get("rationale"),
                "latency_ms": (r.get("tools_ms") or 0.0) + a.get("ms", 0.0),
                "eh_bucket": r.get("eh_bucket"),
                "cold_user": r.get("cold_user"),
                "vlm_called": i in answers,
                "vlm_skipped": bool(r.get("vlm_skipped")) and i not in answers,
                "primary_tool": r.get("primary_tool"),
                "tool_items": r.get("tool_items"),
                "tool_prob": r.get("tool_prob"),
                "flops": None if r.get("tools_flops") is None else r["tools_flops"] + a.get("flops", 0.0),
                "thought": a.get("thought"),
                "conf_verbal": a.get("conf_verbal"),
                "conf_token": a.get("conf_token"),
                "tool_confidence": r.get("tool_confidence"),
                "error": r.get("error"),
            }
        )
    return pa.Table.from_pylist(out, schema=SCORED)


def passthrough(routed: pa.Table, skip_vlm: bool = False) -> pa.Table:
    """Tools-only scoring: no VLM step (only valid when no row needs the VLM: none routed to it,
    or every one skipped by the VLM budget; ``skip_vlm``: a budget of 0 skips them all here)."""
    if skip_vlm:
        routed = apply_vlm_budget(routed, frozenset())
    pending = pc.is_in(routed.column("route"), pa.array(list(VLM_TIERS)))
    if "vlm_skipped" in routed.column_names:
        pending = pc.and_kleene(pending, pc.invert(pc.fill_null(routed.column("vlm_skipped"), False)))
    if pc.any(pending).as_py():
        raise ValueError("queries routed to the VLM but no VLM step is configured")
    shard = routed.column("shard") if "shard" in routed.column_names else None
    out = to_scored(routed.drop_columns(["shard"]) if shard is not None else routed)
    return out.append_column("shard", shard) if shard is not None else out


class VLMAnswerer:
    """Answers routed medium / high rows with the fine-tuned VLM in chunks of ``batch_size``;
    low and rejected rows, and rows the VLM budget skipped (``vlm_skipped``, already answered by
    their tool), pass through untouched (the VLM never sees them). ``calls`` counts the queries
    the VLM answered.

    ``sequential_pool`` = N > 0 (``vlm.sequential_pool``): a sequential query is answered by
    scoring the candidate pool :meth:`sequential_pool` builds from the router's tool answers
    (``VLMPredictor.score_candidates``, as a direct query) instead of decoding over the catalog trie."""

    def __init__(
        self,
        predictor,
        prompts: PromptBuilder,
        users: UserDirectory,
        catalog: Catalog,
        k: int = 10,
        split: str = "test",
        batch_size: int = 4,
        count_flops: bool = False,
        sequential_pool: int = 0,
    ):
        self.predictor, self.prompts, self.users, self.catalog = predictor, prompts, users, catalog
        self.k, self.split, self.batch_size, self.count_flops = k, split, max(batch_size, 1), count_flops
        self.prior = catalog.text_prior()  # items sharing a title split its probability
        self.trie = catalog.trie(predictor.tok)
        self.pool_size = max(int(sequential_pool), 0)
        self._items_of_text: dict[str, list[int]] = {}  # hint text -> the catalog items with that text
        if self.pool_size:
            for i, text in enumerate(catalog.text):
                self._items_of_text.setdefault(text.strip(), []).append(i)
        self.calls = 0

    def __call__(self, routed: pa.Table) -> pa.Table:
        rows = routed.to_pylist()
        todo: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            if r["route"] in VLM_TIERS and not r.get("vlm_skipped"):
                todo.setdefault(r["task"], []).append(i)
        answers: dict[int, dict] = {}
        for task, idx in todo.items():
            for lo in range(0, len(idx), self.batch_size):
                chunk = idx[lo : lo + self.batch_size]
                answers.update(self.answer(task, [rows[i] for i in chunk], chunk))
        return to_scored(routed, answers)

    def examples(self, task: str, rows: list[dict]) -> tuple[list[dict], list[list[str]]]:
        """The VLM's examples for routed rows (prompts with the hints the router attached) and,
        per row, the names of the tools its prompt shows."""
        examples, shown = [], []
        for r in rows:
            st = self.users.resolve(r["user_id"], r["history"], self.split)
            hints = (
                [ToolHint(h["name"], list(h.get("items") or []), h.get("prob")) for h in json.loads(r["hints"])]
                if r.get("hints")
                else []
            )
            rendered = self.prompts.render(
                task,
                st,
                r["query_id"],
                candidates=r.get("candidates") or (),
                item_id=r.get("item_id"),
                rating=r.get("rating"),
                hints=hints,
            )
            examples.append(self.prompts.example(rendered))
            shown.append([h.name for h in hints])
        return examples, shown

    def sequential_pool(self, row: Mapping[str, Any]) -> list[int]:
        """The candidate pool of a routed sequential row: the union of the consulted tools' top-N
        (N = ``sequential_pool``) as the router hands them over: the primary tool's answer
        (``tool_items``, every tier) and each shown tool's hint (high tier; hints name texts, which
        bring every catalog item with that text). First-seen order; empty when the row has none."""
        n = self.pool_size
        pool = dict.fromkeys(int(i) for i in (row.get("tool_items") or [])[:n])
        for hint in json.loads(row["hints"]) if row.get("hints") else []:
            for text in (hint.get("items") or [])[:n]:
                pool.update(dict.fromkeys(self._items_of_text.get(text.strip(), ())))
        return list(pool)

    def _rank_sequential(self, examples: list[dict], rows: list[dict], shown: list[list[str]]) -> list:
        """Sequential answers: the catalog trie, or (``sequential_pool`` > 0) the candidate pool for
        every row that has one (rows without tool items still decode over the trie)."""
        p = self.predictor
        pools = [self.sequential_pool(r) for r in rows] if self.pool_size else [[] for _ in rows]
        by_pool = [i for i, pool in enumerate(pools) if pool]
        by_trie = [i for i, pool in enumerate(pools) if not pool]
        res: list = [None] * len(rows)
        if by_pool:
            out = p.score_candidates(
                [examples[i] for i in by_pool],
                [[self.catalog.text[c] for c in pools[i]] for i in by_pool],
                [pools[i] for i in by_pool],
                candidate_prior=[self.prior[pools[i]] for i in by_pool],
            )
            for i, o in zip(by_pool, out):
                o.task = "sequential"
                res[i] = o
        if by_trie:
            out = p.rank_catalog(
                [examples[i] for i in by_trie], self.trie, k=self.k, shown_tools=[shown[i] for i in by_trie]
            )
            for i, o in zip(by_trie, out):
                res[i] = o
        return res

    def answer(self, task: str, rows: list[dict], idx: list[int]) -> dict[int, dict]:
        examples, shown = self.examples(task, rows)
        p = self.predictor
        with counted_flops(self.count_flops) as flops:
            if task == "sequential":
                res = self._rank_sequential(examples, rows, shown)
            elif task == "direct":
                res = p.score_candidates(
                    examples,
                    [[self.catalog.text[c] for c in r["candidates"]] for r in rows],
                    [r["candidates"] for r in rows],
                    candidate_prior=[self.prior[r["candidates"]] for r in rows],
                )
            elif task == "ctr":
                res = p.ctr(examples)
            else:
                res = p.explain(examples)
        per_query_flops = None if flops() is None else flops() / len(rows)
        self.calls += len(rows)
        out = {}
        for i, o in zip(idx, res):
            conf = o.conf_verbal if o.conf_verbal is not None else o.conf_token
            out[i] = {
                "items": o.items[: self.k] if o.items is not None else None,
                "prob": o.prob,
                "text": o.text,
                "confidence": conf,
                "conf_verbal": o.conf_verbal,
                "conf_token": o.conf_token,
                "ms": o.latency_ms,
                "thought": o.thought_text.removesuffix(ANSWER_MARKER).strip(),
                **({} if per_query_flops is None else {"flops": per_query_flops}),
            }
        return out


def summarize(
    preds: pa.Table,
    rejected: pa.Table | int,
    n: int,
    n_shards: int,
    resumed: int,
    seconds: float,
    mode: str,
    planner_summary: Mapping[str, Any],
    vlm_budget: int = -1,
) -> dict[str, Any]:
    """The scoring stage's summary of its committed output: ``n`` queries in, ``preds`` (SCORED
    predictions, or :func:`summary_counts` of them) + ``rejected`` (a table, or its row count)
    out, tiers by task (tasks in order of first appearance), VLM calls (and the ``vlm_budget``,
    -1 = unlimited, with the queries it skipped), bypass rate, the planner's calibration."""
    if "count" not in preds.column_names:
        preds = summary_counts(preds)
    weight = preds.column("count")

    def total(mask=None) -> int:
        if mask is None:
            return int(pc.sum(weight).as_py() or 0)
        return int(pc.sum(pc.if_else(pc.fill_null(mask, False), weight, 0)).as_py() or 0)

    by_task: dict[str, dict[str, int]] = {}
    routes = preds.group_by(["task", "route"], use_threads=False).aggregate([("count", "sum")])
    for r in routes.to_pylist():  # groups in order of first appearance
        by_task.setdefault(r["task"], {"low": 0, "medium": 0, "high": 0})[r["route"]] += r["count_sum"]
    n_preds = total()
    vlm_calls = total(preds.column("vlm_called"))
    rejected = rejected if isinstance(rejected, int) else rejected.num_rows
    return {
        "queries": n,
        "predictions": n_preds,
        "rejected": rejected,
        "shards": n_shards,
        "shards_resumed": resumed,
        "mode": mode,
        "routes": by_task,
        "vlm_calls": vlm_calls,
        "vlm_budget": vlm_budget,
        "vlm_skipped": total(preds.column("vlm_skipped")) if "vlm_skipped" in preds.column_names else 0,
        "bypass_rate": total(pc.equal(preds.column("route"), "low")) / n_preds if n_preds else 0.0,
        "cold_users": total(preds.column("cold_user")),
        "seconds": round(seconds, 1),
        "queries_per_s": round(n / max(seconds, 1e-9), 2),
        "planner_calibration": planner_summary.get("calibration", {}),
        "planner_guard": planner_summary.get("guard", {}),
    }
