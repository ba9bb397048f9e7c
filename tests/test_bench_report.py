"""Benchmark helpers that decide what a table compares (Ray-free)."""
from __future__ import annotations

import math

import pyarrow as pa

from bench.vlm_vs_tools import comparison, paired, paired_by_group, stage_hits


def _rec(model, task, metric, k, group, value, protocol="full"):
    return {"model": model, "task": task, "metric": metric, "k": k, "group": group, "value": value,
            "protocol": protocol, "n": 10}


def test_vlm_vs_tools_keeps_the_protocol_and_orders_tools():
    tools = [_rec("pop", "sequential", "hr", 5, "all", 0.2), _rec("sas", "sequential", "hr", 5, "all", 0.4),
             _rec("sas", "sequential", "hr", 5, "all", 0.9, protocol="masked"),   # other protocol: ignored
             _rec("sas", "sequential", "hr", 5, "cs:coldest", 0.5), _rec("pop", "direct", "hr", 5, "all", 0.3)]
    vlm = [_rec("VLM", "sequential", "hr", 5, "all", 0.3), _rec("VLM", "sequential", "hr", 5, "cs:coldest", 0.6)]
    rows = comparison(tools, vlm, "full")
    seq = [r for r in rows if r["task"] == "sequential" and r["metric"] == "hr@5"]
    assert [r["model"] for r in seq] == ["VLM", "sas", "pop"]            # VLM first, tools best first
    assert seq[1]["all"] == 0.4 and seq[1]["cs:coldest"] == 0.5 and seq[0]["cs:coldest"] == 0.6
    assert math.isnan(seq[2]["cs:coldest"])                              # absent segment: NaN, not 0
    direct = [r for r in rows if r["task"] == "direct"]
    assert [r["model"] for r in direct] == ["VLM", "pop"] and math.isnan(direct[0]["all"])


def test_paired_hits_count_discordant_users_and_test_them():
    vlm = {u: u < 30 for u in range(100)}                  # hits users 0-29
    tools = {"pop": {u: 10 <= u < 40 for u in range(100)},   # 10-39: 20 shared, 10 each side alone
             "sas": {u: u < 90 for u in range(100)},         # 0-89: 60 tool-only, none VLM-only
             "half": {u: u < 30 for u in range(50)}}         # answered for 50 users only
    rows = {r["tool"]: r for r in paired(vlm, tools)}
    assert [r["tool"] for r in paired(vlm, tools)] == ["sas", "half", "pop"]
    assert (rows["pop"]["only_vlm"], rows["pop"]["only_tool"], rows["pop"]["users"]) == (10, 10, 100)
    assert rows["pop"]["p_mcnemar"] == 1.0                  # a tie is no evidence
    assert (rows["sas"]["only_vlm"], rows["sas"]["only_tool"]) == (0, 60) and rows["sas"]["p_mcnemar"] < 1e-10
    assert rows["half"]["users"] == 50 and rows["half"]["vlm_hits"] == rows["half"]["tool_hits"] == 30


def test_paired_by_group_adds_the_coldest_users_of_those_evaluated():
    # 40 users; user u has u training items except that users 0-9 have 1 (the coldest of all, but
    # not evaluated): "coldest" = cold-start groups 1-3 of 10 over the 20 evaluated users 10-29 =
    # users 10-15.
    users = pa.table({"user_id": list(range(40)), "n_train": [1] * 10 + list(range(10, 40)),
                      "eh_bucket": ["high"] * 40})
    vlm = {u: u % 2 == 0 for u in range(10, 30)}
    tools = {"t": {u: True for u in range(40)}}
    rows = paired_by_group(vlm, tools, users)
    assert [r["group"] for r in rows] == ["all", "cs:coldest"]
    assert (rows[0]["users"], rows[0]["vlm_hits"], rows[0]["only_tool"]) == (20, 10, 10)
    assert (rows[1]["users"], rows[1]["vlm_hits"], rows[1]["only_tool"]) == (6, 3, 3)


def test_stage_hits_are_per_user_sequential_hits_at_5():
    queries = pa.table({"query_id": [1, 2, 3, 4], "target": [7, 8, 9, 5], "label": [None] * 4,
                        "reference": [None] * 4})
    preds = pa.table({"query_id": [2, 1, 3, 4], "task": ["sequential", "sequential", "sequential", "direct"],
                      "user_id": [20, 10, 30, 40],
                      "items": [[1, 2, 3, 4, 5, 8], [7, 1], [], [5]]})       # 8 at rank 5: a miss at 5
    assert stage_hits(preds, queries) == {20: False, 10: True, 30: False}  # direct rows left out
    assert stage_hits(preds, queries, k=6)[20] is True
