"""Benchmark helpers that decide what a table compares (Ray-free)."""

from __future__ import annotations

import math

import pyarrow as pa

from bench.cold_queries import coldest
from bench.vlm_rerank import rank_hit, reranked, split_queries, table
from bench.vlm_vs_tools import comparison, paired, paired_by_group, stage_hits, text_agreement


def _rec(model, task, metric, k, group, value, protocol="full"):
    return {
        "model": model,
        "task": task,
        "metric": metric,
        "k": k,
        "group": group,
        "value": value,
        "protocol": protocol,
        "n": 10,
    }


def test_vlm_vs_tools_keeps_the_protocol_and_orders_tools():
    tools = [
        _rec("pop", "sequential", "hr", 5, "all", 0.2),
        _rec("sas", "sequential", "hr", 5, "all", 0.4),
        _rec("sas", "sequential", "hr", 5, "all", 0.9, protocol="masked"),  # other protocol: ignored
        _rec("sas", "sequential", "hr", 5, "cs:coldest", 0.5),
        _rec("pop", "direct", "hr", 5, "all", 0.3),
    ]
    vlm = [_rec("VLM", "sequential", "hr", 5, "all", 0.3), _rec("VLM", "sequential", "hr", 5, "cs:coldest", 0.6)]
    rows = comparison(tools, vlm, "full")
    seq = [r for r in rows if r["task"] == "sequential" and r["metric"] == "hr@5"]
    assert [r["model"] for r in seq] == ["VLM", "sas", "pop"]  # VLM first, tools best first
    assert seq[1]["all"] == 0.4 and seq[1]["cs:coldest"] == 0.5 and seq[0]["cs:coldest"] == 0.6
    assert math.isnan(seq[2]["cs:coldest"])  # absent segment: NaN, not 0
    direct = [r for r in rows if r["task"] == "direct"]
    assert [r["model"] for r in direct] == ["VLM", "pop"] and math.isnan(direct[0]["all"])


def test_paired_hits_count_discordant_users_and_test_them():
    vlm = {u: u < 30 for u in range(100)}  # hits users 0-29
    tools = {
        "pop": {u: 10 <= u < 40 for u in range(100)},  # 10-39: 20 shared, 10 each side alone
        "sas": {u: u < 90 for u in range(100)},  # 0-89: 60 tool-only, none VLM-only
        "half": {u: u < 30 for u in range(50)},
    }  # answered for 50 users only
    rows = {r["tool"]: r for r in paired(vlm, tools)}
    assert [r["tool"] for r in paired(vlm, tools)] == ["sas", "half", "pop"]
    assert (rows["pop"]["only_vlm"], rows["pop"]["only_tool"], rows["pop"]["users"]) == (10, 10, 100)
    assert rows["pop"]["p_mcnemar"] == 1.0  # a tie is no evidence
    assert (rows["sas"]["only_vlm"], rows["sas"]["only_tool"]) == (0, 60) and rows["sas"]["p_mcnemar"] < 1e-10
    assert rows["half"]["users"] == 50 and rows["half"]["vlm_hits"] == rows["half"]["tool_hits"] == 30


def test_paired_by_group_adds_the_coldest_users_of_those_evaluated():
    # 40 users; user u has u training items except that users 0-9 have 1 (the coldest of all, but
    # not evaluated): "coldest" = cold-start groups 1-3 of 10 over the 20 evaluated users 10-29 =
    # users 10-15.
    users = pa.table(
        {"user_id": list(range(40)), "n_train": [1] * 10 + list(range(10, 40)), "eh_bucket": ["high"] * 40}
    )
    vlm = {u: u % 2 == 0 for u in range(10, 30)}
    tools = {"t": {u: True for u in range(40)}}
    rows = paired_by_group(vlm, tools, users)
    assert [r["group"] for r in rows] == ["all", "cs:coldest"]
    assert (rows[0]["users"], rows[0]["vlm_hits"], rows[0]["only_tool"]) == (20, 10, 10)
    assert (rows[1]["users"], rows[1]["vlm_hits"], rows[1]["only_tool"]) == (6, 3, 3)


def test_stage_hits_are_per_user_sequential_hits_at_5():
    queries = pa.table({"query_id": [1, 2, 3, 4], "target": [7, 8, 9, 5], "label": [None] * 4, "reference": [None] * 4})
    preds = pa.table(
        {
            "query_id": [2, 1, 3, 4],
            "task": ["sequential", "sequential", "sequential", "direct"],
            "user_id": [20, 10, 30, 40],
            "items": [[1, 2, 3, 4, 5, 8], [7, 1], [], [5]],
        }
    )  # 8 at rank 5: a miss at 5
    assert stage_hits(preds, queries) == {20: False, 10: True, 30: False}  # direct rows left out
    assert stage_hits(preds, queries, k=6)[20] is True


def test_text_agreement_compares_the_vlm_and_the_first_tool_by_item_text():
    text = ["red bag", "red bag", "blue mug", "green cap", "pink hat", "gray sock"]  # items 0 and 1 share a text
    queries = pa.table({"query_id": [1, 2, 3, 4], "target": [1, 3, 4, 2], "label": [None] * 4, "reference": [None] * 4})
    preds = pa.table(
        {
            "query_id": [1, 2, 3, 4],
            "task": ["sequential"] * 3 + ["direct"],
            "items": [[0, 2], [0, 5], [4, 2], [2]],
            "tool_items": [[1, 3], [3, 0], None, [2]],
        }
    )  # query 3: no tool answer kept
    out = text_agreement(preds, queries, text, k=1)
    # query 1: top-1 texts {red bag} vs {red bag}: 1 shared; truth 1 ("red bag") is the tool's
    # top 1, the VLM ranked item 0 of that text instead: text hit but item miss, tool-only hit
    # (its text is in the VLM's top 2). Query 2: {red bag} vs {green cap}: 0 shared; tool-only hit
    # (3) and "green cap" is not in the VLM's top 2 (items 0, 5).
    assert out == {
        "queries": 2,
        "mean_shared_texts": 0.5,
        "text_hit_item_miss": 1,
        "only_tool": 2,
        "only_tool_text_not_in_top_2k": 1,
    }
    two = text_agreement(preds, queries, text, k=2)  # "red bag" shared by both queries' top 2
    assert two["mean_shared_texts"] == 1.0 and two["text_hit_item_miss"] == 1 and two["only_tool"] == 2


def test_cold_queries_keep_the_coldest_users_of_each_task():
    # 20 users; user u has 20 - u training items: the highest ids are the coldest
    users = pa.table({"user_id": list(range(20)), "n_train": [20 - u for u in range(20)], "eh_bucket": ["high"] * 20})
    seq = list(range(20))  # every user: groups of 2, groups 1-3 = the 6 coldest
    direct = list(range(0, 20, 2))  # 10 users: groups of 1, computed over these users only
    q = pa.table({"query_id": list(range(30)), "task": ["sequential"] * 20 + ["direct"] * 10, "user_id": seq + direct})
    out = coldest(q, users)
    got = {(t, u) for t, u in zip(out.column("task").to_pylist(), out.column("user_id").to_pylist())}
    assert got == {("sequential", u) for u in range(14, 20)} | {("direct", u) for u in (14, 16, 18)}


def test_vlm_rerank_scores_the_tools_list_in_the_vlms_order_against_the_tools_own():
    assert rank_hit([4, 7, 9, 1, 2, 3], 9) == (True, 0.5)  # third: 1 / log2(4)
    assert rank_hit([4, 7, 9, 1, 2, 3], 3) == (False, 0.0)  # sixth: outside the top 5
    tool = list(range(10, 30))
    # user 1: the truth is the tool's 7th item and the VLM likes it best; user 2: the tool's 1st,
    # which the VLM puts last (5th of the tool's top 5, out of the top 5 of its top 10)
    lp1 = [0.0] * 20
    lp1[6] = 5.0
    lp2 = [-float(i) for i in range(20)]
    lp2[0] = -100.0
    recs = [
        {"user_id": 1, "target": 16, "tool_items": tool, "vlm_logprob": lp1},
        {"user_id": 2, "target": 10, "tool_items": tool, "vlm_logprob": lp2},
    ]
    assert reranked(recs[0], 10)[0] == 16 and reranked(recs[0], 5) == tool[:5]  # ties keep the tool's order
    assert reranked(recs[1], 5) == [11, 12, 13, 14, 10]
    rows = {r["model"]: r for r in table(recs, "sas", 20, {"ref": {1: [16], 2: []}})}
    assert list(rows) == [
        "sas (its own order)",
        "VLM reranks sas's top 5",
        "VLM reranks sas's top 10",
        "VLM reranks sas's top 20",
        "ref",
    ]
    own = rows["sas (its own order)"]
    assert (own["hits"], own["hr@5"], own["ndcg@5"]) == (1, 0.5, 0.5) and own["only_it"] == own["only_sas"] == 0
    top5 = rows["VLM reranks sas's top 5"]
    assert top5["hits"] == 1 and top5["ndcg@5"] == round(1 / math.log2(6) / 2, 4)  # user 2's truth fell to 5th
    top10 = rows["VLM reranks sas's top 10"]
    assert (top10["hits"], top10["only_it"], top10["only_sas"]) == (1, 1, 1)  # wins user 1, loses user 2
    assert (rows["ref"]["hits"], rows["ref"]["only_it"], rows["ref"]["only_sas"]) == (1, 1, 1)


def test_vlm_rerank_queries_take_the_splits_item_as_their_target():
    q = pa.table(
        {
            "query_id": [1, 2, 3, 4],
            "task": ["sequential", "sequential", "direct", "sequential"],
            "user_id": [7, 8, 7, 9],
            "target": [70, 80, 70, 90],
        }
    )
    loo = {
        7: {"valid_item": 5, "test_item": 70},
        8: {"valid_item": None, "test_item": 80},
        9: {"valid_item": 6, "test_item": 90},
    }
    v = split_queries(q, loo, "valid")
    assert v.column("query_id").to_pylist() == [1, 4] and v.column("target").to_pylist() == [5, 6]
    assert split_queries(q, loo, "test").column("target").to_pylist() == [70, 80, 90]
