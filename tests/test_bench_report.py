"""Benchmark helpers that decide what a table compares (Ray-free)."""
from __future__ import annotations

import math

from bench.vlm_vs_tools import comparison


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
