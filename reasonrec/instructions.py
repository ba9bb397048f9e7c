"""Reasoning-aware instruction examples (paper 3.2, Appendix A), Ray-free.

Queries come from the prepared splits (:func:`reasonrec.data.queries.prepared_queries`, shared with
the planner fit and the scoring job).
Building an example takes two passes so that the confidence target is a calibrated frequency:

1. :func:`label_batch` runs every tool on the query (the same :class:`~reasonrec.planner.ToolBox`
   the planner uses at scoring time) and records which tools are *usable* (the truth in their
   top ``usable_k``; CTR: the right side of 0.5), their answers as hints, and whether the
   reference answer -- the majority-vote ensemble, else the mean over tools -- is right;
2. the confidence target of a query is the rate at which the reference answer is right among
   training queries of its (task, EH bucket, history-length bin): a calibrated probability of
   being right given what the model can see, not a constant (:func:`confidence_table`);
3. :func:`render_batch` writes the prompt (template mixture or one template), the photo item ids,
   and the chain-of-thought target. A share ``hint_fraction`` of the ranking/CTR examples (by
   hash) shows up to ``max_tool_hints`` tools' answers (the high-risk prompt; a random draw of
   tools, or the best by validation usable rate) and names the usable ones among them; the rest
   show none (the medium-risk prompt) and name up to 3 usable tools. A configured share
   of hinted examples gets wrong hints (``NoisyTools``) and names no tool: learning to overrule.
   With ``hint_calibration``, each tool's training hints are made as reliable as its answers on
   validation rows (:func:`hint_keep_rates`): the tools answer training prefixes they were fitted
   on, so in-sample they look far better than at scoring time, most of all the transductive ones.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from reasonrec.config import InstructionsConfig
from reasonrec.data.catalog import Catalog, PromptBuilder, UserDirectory
from reasonrec.data.queries import prefix_position
from reasonrec.data.schemas import INSTRUCTIONS, QUERIES
from reasonrec.hashing import splitmix64
from reasonrec.metrics import rouge_l_scores
from reasonrec.planner import N_HINT_ITEMS, RANKING, ToolBox
from reasonrec.prompts.cot import MAX_THOUGHT_TOOLS, NoisyTools, compose_target, ctr_answer
from reasonrec.prompts.templates import ToolHint
from reasonrec.prompts.user_desc import describe_users

LABELED = pa.schema(
    list(QUERIES)
    + [
        pa.field("split", pa.string()),
        pa.field("eh", pa.float32()),
        pa.field("eh_bucket", pa.string()),
        pa.field("len_bin", pa.int32()),
        pa.field("usable", pa.list_(pa.string())),
        pa.field("hints", pa.string()),
        pa.field("ref_right", pa.float32()),
    ]
)


def len_bin(n: np.ndarray) -> np.ndarray:
    """History-length bin: floor(log2(1 + n)), capped at 6 (fixed edges: no global pass)."""
    return np.minimum(np.floor(np.log2(1 + np.asarray(n, np.float64))), 6).astype(np.int32)


# ------------------------------------------------------------------------------ pass 1
def label_batch(
    queries: pa.Table,
    split: str,
    toolbox: ToolBox,
    users: UserDirectory,
    catalog: Catalog,
    cfg: InstructionsConfig,
    holdout: ToolBox | None = None,
    holdout_items: int = 0,
) -> pa.Table:
    """LABELED rows: usable tools, all tools' answers (hints JSON) and the reference answer's
    correctness, per query (one task per batch or mixed).

    ``holdout`` (tools trained without each user's last ``holdout_items`` training items): training
    queries that predict one of those items are labelled by these copies, so their hints are as
    reliable as at test time; the other sequential/direct training queries keep their usable tools
    from ``toolbox`` but get no hints (its answers there are in-sample: SASRec's HR@5 on training
    transitions of the synthetic world is 0.57 against 0.38 on test users, BPR-MF's 0.79 against
    0.21). CTR and explanation rows are unaffected (no held-out copies of the CTR tools)."""
    if holdout is not None and split == "train" and queries.num_rows:
        k = prefix_position(queries.column("query_id").to_numpy(), queries.column("task").to_pylist(), split)
        oos, insample = (k >= 0) & (k < holdout_items), k >= holdout_items
        parts = [
            label_batch(queries.filter(pa.array(oos)), split, holdout, users, catalog, cfg),
            label_batch(queries.filter(pa.array(insample)), split, toolbox, users, catalog, cfg),
            label_batch(queries.filter(pa.array(k < 0)), split, toolbox, users, catalog, cfg),
        ]
        parts[1] = parts[1].set_column(
            parts[1].schema.get_field_index("hints"), "hints", pa.array(["[]"] * parts[1].num_rows, pa.string())
        )
        return pa.concat_tables(parts)
    rows = queries.to_pylist()
    out = []
    for task in {r["task"] for r in rows}:
        idx = [i for i, r in enumerate(rows) if r["task"] == task]
        sub = [rows[i] for i in idx]
        states = [users.resolve(r["user_id"], r.get("history"), split) for r in sub]
        usable: list[list[str]] = [[] for _ in sub]
        hints: list[list[dict]] = [[] for _ in sub]
        ref = np.zeros(len(sub))
        if task == "explanation":
            # No tools explain; "right" is graded: ROUGE-L of the review against the item's own
            # text (how much of the review the item description predicts).
            ref = rouge_l_scores([catalog.text[r["item_id"]] for r in sub], [r["reference"] or "" for r in sub])
        else:
            groups: dict[int, list[int]] = {}
            for j, r in enumerate(sub):
                groups.setdefault(len(r["candidates"]) if task == "direct" else 0, []).append(j)
            for js in groups.values():
                u = np.array([states[j].user_id for j in js], np.int64)
                h = [states[j].history for j in js]
                kw = {}
                if task == "direct":
                    kw["candidates"] = np.array([sub[j]["candidates"] for j in js], np.int64)
                if task == "ctr":
                    kw["items"] = np.array([sub[j]["item_id"] for j in js], np.int64)
                truth = np.array([sub[j]["label" if task == "ctr" else "target"] for j in js])
                ans = toolbox.answer(task, u, h, cfg.usable_k, **kw)
                ok = {n: ans.correct(n, truth, cfg.usable_k) for n in ans.names}
                if "ensemble" in toolbox.tools:
                    ens = toolbox.answer(task, u, h, cfg.usable_k, names=["ensemble"], **kw)
                    ref_ok = ens.correct("ensemble", truth, cfg.usable_k).astype(float)
                else:
                    ref_ok = np.mean([ok[n] for n in ans.names], 0) if ans.names else np.zeros(len(js))
                for a, j in enumerate(js):
                    usable[j] = [n for n in ans.names if ok[n][a]]
                    # One spare text: hint calibration may take the truth out of a list.
                    hints[j] = [vars(ans.hint(n, a, catalog.text, N_HINT_ITEMS + 1)) for n in ans.names]
                    ref[j] = ref_ok[a]
        for j, (r, st) in enumerate(zip(sub, states)):
            out.append(
                {
                    **r,
                    "split": split,
                    "eh": st.eh,
                    "eh_bucket": st.bucket,
                    "len_bin": int(len_bin(np.array([len(st.history)]))[0]),
                    "usable": usable[j],
                    "hints": json.dumps(hints[j]),
                    "ref_right": float(ref[j]),
                }
            )
    return pa.Table.from_pylist(out, schema=LABELED)


def tool_ranking(
    task: Sequence[str], usable: Sequence[Sequence[str]], first: Sequence[str] = ()
) -> dict[str, list[str]]:
    """Per task, the tools usable on at least one row, by usable rate (best first, ties by name):
    the order the planner's ``fixed`` tool choice shows them in. Fit it on validation rows, like
    the confidence table. Tools named in ``first`` (``instructions.tool_order``) lead, in that
    order, where the task has them."""
    out: dict[str, list[str]] = {}
    counts: dict[str, dict[str, int]] = {}
    for t, names in zip(task, usable):
        c = counts.setdefault(str(t), {})
        for n in names:
            c[n] = c.get(n, 0) + 1
    for t, c in counts.items():
        if c:  # explanation has no tools
            pinned = [n for n in first if n in c]
            out[t] = pinned + sorted((n for n in c if n not in pinned), key=lambda n: (-c[n], n))
    return out


def confidence_table(
    task: Sequence[str], bucket: Sequence[str], lbin: Sequence[int], ref_right: Sequence[float], prior: float = 2.0
) -> dict[str, float]:
    """Calibrated P(right) per (task, bucket, length bin): the group's mean of ``ref_right``
    shrunk toward the task's mean with ``prior`` pseudo-counts (small groups stay sensible).
    Keys ``task|bucket|bin`` and ``task`` (the fallback). Fit it on validation rows: tools were
    trained on the training split, so their training-query accuracy is optimistic."""
    task, bucket = np.asarray(task, object), np.asarray(bucket, object)
    lbin, ref = np.asarray(lbin), np.asarray(ref_right, np.float64)
    out: dict[str, float] = {}
    for t in np.unique(task):
        m = task == t
        mean = float(ref[m].mean())
        out[str(t)] = mean
        keys = np.array([f"{t}|{b}|{int(x)}" for b, x in zip(bucket[m], lbin[m])], object)
        for k in np.unique(keys):
            g = ref[m][keys == k]
            out[str(k)] = float((g.sum() + prior * mean) / (len(g) + prior))
    return out


# ------------------------------------------------------------------------------ pass 2
def hint_keep_rates(
    task: Sequence[str], split: Sequence[str], usable: Sequence[Sequence[str]]
) -> dict[str, dict[str, float]]:
    """Per ranking task and tool, the share of its usable training answers to keep usable so that
    it is right as often on training rows as on validation rows: min(1, rate_valid / rate_train).

    The tools answer training prefixes they were fitted on; a meta-learner that trusts in-sample
    answers learns the wrong trust (stacking uses out-of-fold predictions for this reason). On the
    1,200-user synthetic world LightGCN holds the truth in its top 10 for 85% of users' last
    training items and 53% of their validation items, SASRec for 65% and 60%: trained on raw hints
    the VLM learns to trust the weakest of the three tools most. ``tools.holdout_items`` removes
    the bias at the source but leaves few hinted examples; this keeps them all and lowers each
    tool's in-sample rate to its validation rate."""
    rows: dict[tuple[str, str], int] = {}
    hits: dict[tuple[str, str, str], int] = {}
    for t, s, names in zip(task, split, usable):
        if t not in RANKING:
            continue
        rows[t, s] = rows.get((t, s), 0) + 1
        for n in names:
            hits[t, s, n] = hits.get((t, s, n), 0) + 1
    out: dict[str, dict[str, float]] = {}
    for (t, s, n), h in hits.items():
        if s != "train":
            continue
        r_train = h / rows[t, "train"]
        r_valid = hits.get((t, "valid", n), 0) / rows[t, "valid"] if rows.get((t, "valid")) else r_train
        out.setdefault(t, {})[n] = min(1.0, r_valid / r_train)
    return out


def _frac(keys: np.ndarray, salt: int) -> np.ndarray:
    h = splitmix64(np.asarray(keys, np.int64).astype(np.uint64) ^ np.uint64(salt))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _demote_truth(
    hints: Sequence[ToolHint], usable: Sequence[str], truth_text: str, key: int, keep: Mapping[str, float], seed: int
) -> tuple[list[ToolHint], list[str]]:
    """Hint calibration of one training example: each usable tool stays usable with probability
    ``keep[tool]`` (a pure function of seed, example key and tool); otherwise its list is shown as
    if it had ranked the truth below its top ``usable_k`` (the truth's text out, its next text in)
    and the thought does not name it."""
    out, demoted = [], set()
    for h in hints:
        salt = seed * 131 + zlib.crc32(h.name.encode())
        if h.name in usable and _frac(np.array([key]), salt)[0] >= keep.get(h.name, 1.0):
            demoted.add(h.name)
            h = replace(h, items=[t for t in h.items if t != truth_text])
        out.append(h)
    return out, [n for n in usable if n not in demoted]


def render_batch(
    labeled: pa.Table,
    conf: Mapping[str, float],
    prompts: PromptBuilder,
    users: UserDirectory,
    catalog: Catalog,
    cfg: InstructionsConfig,
    tool_rank: Mapping[str, Sequence[str]] | None = None,
    hint_keep: Mapping[str, Mapping[str, float]] | None = None,
) -> pa.Table:
    """INSTRUCTIONS rows for LABELED rows. ``tool_rank`` (:func:`tool_ranking`) is needed when
    ``cfg.hint_order == "usable_rate"``, ``hint_keep`` (:func:`hint_keep_rates`) when
    ``cfg.hint_calibration`` is on."""
    if cfg.hint_order == "usable_rate" and tool_rank is None:
        raise ValueError("hint_order 'usable_rate' needs the tools' ranking (tool_ranking on validation rows)")
    if cfg.hint_calibration and hint_keep is None:
        raise ValueError(
            "hint_calibration needs the tools' keep rates (hint_keep_rates on training and validation rows)"
        )
    noisy = NoisyTools(cfg.noisy_tools_fraction, cfg.seed)
    rows = labeled.to_pylist()
    qids = np.array([r["query_id"] for r in rows], np.int64)
    with_hints = _frac(qids, cfg.seed * 31 + 5) < cfg.hint_fraction
    # usable_rate: each task's tools by position in the ranking; never-usable tools go last.
    position = {t: {n: i for i, n in enumerate(names)} for t, names in (tool_rank or {}).items()}
    out = []
    for i, r in enumerate(rows):
        task, key = r["task"], int(r["query_id"])
        st = users.resolve(r["user_id"], r.get("history"), r["split"])
        if r.get("history") is not None:  # a training prefix: describe what came before it only
            st = replace(st, desc=describe_users([st.history], catalog.attrs)[0])
        c = conf.get(f"{task}|{r['eh_bucket']}|{r['len_bin']}", conf.get(task, 0.5))
        all_hints = [ToolHint(h["name"], list(h.get("items") or []), h.get("prob")) for h in json.loads(r["hints"])]
        shown, tools, corrupted = [], list(r["usable"])[:MAX_THOUGHT_TOOLS], False
        if task != "explanation" and all_hints and with_hints[i]:
            if cfg.hint_order == "usable_rate":
                pos = position.get(task, {})
                shown = sorted(all_hints, key=lambda h: pos.get(h.name, len(pos)))[: cfg.max_tool_hints]
            else:
                order = np.random.default_rng([cfg.seed, key & 0x7FFFFFFF, 11]).permutation(len(all_hints))
                shown = [all_hints[o] for o in order[: cfg.max_tool_hints]]
            usable = [n for n in r["usable"] if n in {h.name for h in shown}]
            truth_text = [catalog.text[r["target"]]] if r.get("target") is not None else []
            if cfg.hint_calibration and r["split"] == "train" and task in RANKING:
                shown, usable = _demote_truth(shown, usable, truth_text[0], key, hint_keep.get(task, {}), cfg.seed)
            shown = [replace(h, items=h.items[:N_HINT_ITEMS]) for h in shown]
            distractors = [
                catalog.text[j]
                for j in np.random.default_rng([cfg.seed, key & 0x7FFFFFFF, 13]).choice(
                    catalog.n_items, min(catalog.n_items, 20), replace=False
                )
            ]
            shown, tools, corrupted = noisy.apply(key, shown, usable, truth_text, distractors)
        if task == "ctr":
            answer = ctr_answer(r["label"])
        elif task == "explanation":
            answer = r["reference"] or ""
        else:
            answer = catalog.text[r["target"]]
        target = compose_target(task, answer, c, st.bucket, st.eh, tools)
        rendered = prompts.render(
            task,
            st,
            key,
            candidates=r.get("candidates") or (),
            item_id=r.get("item_id"),
            rating=r.get("rating"),
            hints=shown,
        )
        out.append(
            {
                "example_id": key,
                "user_id": r["user_id"],
                "task": task,
                "split": r["split"],
                "phase": st.bucket,
                "template_id": rendered["template_id"],
                "prompt": rendered["prompt"],
                "image_items": rendered["image_items"],
                "target": target,
                "tools_usable": tools,
                "noisy_tools": corrupted,
            }
        )
    return pa.Table.from_pylist(out, schema=INSTRUCTIONS)
