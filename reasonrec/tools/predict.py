"""Tool predictions per query, used to label "usable" tools and to evaluate tools (Ray-free).

Queries per user (leave-one-out):
* ``train``: history = train_items[:-1], target = the last training item (users with >= 2);
* ``valid``: history = train_items, target = valid_item;
* ``test``:  history = train_items + [valid_item], target = test_item.

For every ranking tool and query we keep the top-K items and scores, a confidence, the target's
rank over the whole catalog (full ranking, history not excluded: the RecBole protocol) and, where
the query has a direct-recommendation candidate list, the target's rank within it; and the
full-catalog rank with the query's history masked (RecBole's full-sort protocol).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from reasonrec.metrics import rank_full_catalog, rank_in_candidates
from reasonrec.tools.base import Tool
from reasonrec.tools.ensemble import Ensemble

PREDICTIONS = pa.schema(
    [
        ("user_id", pa.int64()),
        ("split", pa.string()),
        ("tool", pa.string()),
        ("target", pa.int64()),
        ("items", pa.list_(pa.int64())),
        ("scores", pa.list_(pa.float32())),
        ("confidence", pa.float32()),
        ("rank", pa.int64()),  # 0-based rank of the target over the whole catalog
        ("rank_excl", pa.int64()),  # the same with the query's history items masked (the truth kept):
        # RecBole's full-sort protocol
        ("cand_rank", pa.int64()),  # 0-based rank of the target among direct candidates, -1 if none
        ("n_candidates", pa.int64()),
    ]
)

CTR_PREDICTIONS = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("split", pa.string()),
        ("label", pa.int8()),
        ("tool", pa.string()),
        ("prob", pa.float32()),
    ]
)


def loo_queries(batch: pa.Table) -> dict[str, tuple[np.ndarray, list[np.ndarray], np.ndarray]]:
    """{split: (users, histories, targets)} for a batch of LOO rows (histories: :func:`split_history`)."""
    from reasonrec.data.prepare import split_history

    users = batch.column("user_id").to_numpy()
    train = [np.asarray(x, dtype=np.int64) for x in batch.column("train_items").to_pylist()]
    valid = batch.column("valid_item").to_pylist()
    test = batch.column("test_item").to_pylist()
    out: dict[str, tuple[list, list, list]] = {"train": ([], [], []), "valid": ([], [], []), "test": ([], [], [])}
    for u, tr, v, te in zip(users, train, valid, test):
        if len(tr) >= 2:
            out["train"][0].append(u)
            out["train"][1].append(split_history(tr, v, "train"))
            out["train"][2].append(tr[-1])
        if v is not None:
            out["valid"][0].append(u)
            out["valid"][1].append(split_history(tr, v, "valid"))
            out["valid"][2].append(v)
        if te is not None:
            out["test"][0].append(u)
            out["test"][1].append(split_history(tr, v, "test"))
            out["test"][2].append(te)
    return {s: (np.asarray(u, np.int64), h, np.asarray(t, np.int64)) for s, (u, h, t) in out.items() if u}


def ranking_predictions(
    tools: dict[str, Tool],
    batch: pa.Table,
    k: int,
    candidates: dict[tuple[int, str], np.ndarray] | None = None,
    splits: tuple[str, ...] = ("train", "valid", "test"),
) -> pa.Table:
    """PREDICTIONS rows for every ranking tool x query split in ``batch`` (LOO rows)."""
    candidates = candidates or {}
    cols: dict[str, list] = {f.name: [] for f in PREDICTIONS}
    for split, (users, hists, targets) in loo_queries(batch).items():
        if split not in splits:
            continue
        computed: dict[str, np.ndarray] = {}
        for name, tool in tools.items():
            if "sequential" not in tool.tasks and "direct" not in tool.tasks:
                continue
            if isinstance(tool, Ensemble) and set(tool.ranking_members()) <= computed.keys():
                scores = tool.combine_scores(computed)  # the ensemble: reuse its members' scores
            else:
                scores = np.asarray(tool.score_items(users, hists), dtype=np.float32)
            computed[name] = scores
            kk = min(k, scores.shape[1])
            top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
            ranks = rank_full_catalog(scores, targets)
            ranks_excl = rank_full_catalog(scores, targets, exclude=hists)
            cand_rank = np.full(len(users), -1, np.int64)
            n_cand = np.zeros(len(users), np.int64)
            rows = [i for i, u in enumerate(users) if (int(u), split) in candidates]
            if rows:
                cands = np.stack([candidates[(int(users[i]), split)] for i in rows])
                cscores = np.take_along_axis(scores[rows], cands, axis=1)
                cand_rank[rows] = rank_in_candidates(cscores, cands, targets[rows])
                n_cand[rows] = cands.shape[1]
            cols["user_id"].append(users)
            cols["split"].append(np.full(len(users), split, dtype=object))
            cols["tool"].append(np.full(len(users), name, dtype=object))
            cols["target"].append(targets)
            cols["items"].extend(top.tolist())
            cols["scores"].extend(np.take_along_axis(scores, top, axis=1).tolist())
            cols["confidence"].append(Tool.confidence(scores))
            cols["rank"].append(np.asarray(ranks, np.int64))
            cols["rank_excl"].append(np.asarray(ranks_excl, np.int64))
            cols["cand_rank"].append(cand_rank)
            cols["n_candidates"].append(n_cand)
    if not cols["user_id"]:
        return PREDICTIONS.empty_table()
    data = {c: (v if c in ("items", "scores") else np.concatenate(v)) for c, v in cols.items()}
    return pa.table(data, schema=PREDICTIONS)


def ctr_predictions(
    tools: dict[str, Tool], batch: pa.Table, histories: dict[int, tuple[np.ndarray, int | None]]
) -> pa.Table:
    """CTR_PREDICTIONS rows for every CTR-capable tool on a batch of CTR rows. ``histories``: user ->
    (train items, valid item); a row sees the history of its split (:func:`split_history`: a test
    row also the valid item), as the router's queries do."""
    from reasonrec.data.prepare import split_history

    users = batch.column("user_id").to_numpy()
    items = batch.column("item_id").to_numpy()
    empty = (np.empty(0, np.int64), None)
    hists = [split_history(*histories.get(int(u), empty), s) for u, s in zip(users, batch.column("split").to_pylist())]
    parts, computed = [], {}
    for name, tool in tools.items():
        if "ctr" not in tool.tasks:
            continue
        if isinstance(tool, Ensemble) and set(tool.ctr_members()) <= computed.keys():
            prob = np.asarray(tool.combine_ctr(computed), dtype=np.float32)  # reuse its members' outputs
        else:
            prob = np.asarray(tool.predict_ctr(users, items, hists), dtype=np.float32)
        computed[name] = prob
        parts.append(
            pa.table(
                {
                    "user_id": users,
                    "item_id": items,
                    "split": batch.column("split"),
                    "label": batch.column("label"),
                    "tool": pa.array([name] * len(users), pa.string()),
                    "prob": prob,
                },
                schema=CTR_PREDICTIONS,
            )
        )
    return pa.concat_tables(parts) if parts else CTR_PREDICTIONS.empty_table()
