"""Multi-domain runs without Ray: users keyed by (domain, user key) in prepare, every evaluation
table per domain, and the per-domain drop against single-domain runs (hand-built tables)."""

import math

import numpy as np
import pyarrow as pa
import pytest

from reasonrec.config import CONFIG_DIR, ConfigError, load_config
from reasonrec.data import prepare as P
from reasonrec.data import schemas
from reasonrec.evaluation import (
    DROP_PROTOCOL,
    domain_drop_markdown,
    domain_drop_records,
    domain_group,
    domain_markdown,
    per_domain,
    protocols,
    query_domains,
    split_by_domain,
    split_domain_group,
    tool_records,
)


@pytest.fixture(scope="module")
def cfg():
    return load_config(CONFIG_DIR / "quickstart.yaml")


# Users 0-3 are beauty, 4-7 sports. Beauty's test items rank 0 (a hit at every k), sports' 7 (a
# miss at 5, a hit at 10): overall HR@5 0.5, beauty 1.0, sports 0.0.
USERS = pa.table(
    {
        "user_id": pa.array(range(8), pa.int64()),
        "n_train": pa.array([1, 2, 3, 4, 1, 2, 3, 4], pa.int64()),
        "eh_bucket": ["low", "low", "high", "high", "low", "medium", "medium", "high"],
        "domain": ["beauty"] * 4 + ["sports"] * 4,
    }
)


def _preds():
    uid = list(range(8))
    return pa.table(
        {
            "user_id": pa.array(uid, pa.int64()),
            "tool": ["sasrec"] * 8,
            "rank": pa.array([0] * 4 + [7] * 4, pa.int64()),
            "rank_excl": pa.array([0] * 4 + [7] * 4, pa.int64()),
            "cand_rank": pa.array([0, 0, 1, 1, 9, 9, 9, 9], pa.int64()),
            "n_candidates": pa.array([50] * 8, pa.int64()),
        }
    )


def _ctr():
    # beauty: perfectly ranked (AUC 1); sports: inverted (AUC 0).
    return pa.table(
        {
            "user_id": pa.array([0, 1, 2, 3, 4, 5, 6, 7], pa.int64()),
            "tool": ["dlrm"] * 8,
            "label": pa.array([1, 0, 1, 0, 1, 0, 1, 0], pa.int8()),
            "prob": pa.array([0.9, 0.1, 0.8, 0.2, 0.1, 0.9, 0.2, 0.8], pa.float32()),
        }
    )


def _value(records, task, model, metric, k, group):
    (r,) = [
        r
        for r in records
        if (r["task"], r["model"], r["metric"], r["k"], r["group"]) == (task, model, metric, k, group)
        and "masked" not in r["protocol"]
    ]
    return r


def test_domain_groups_round_trip():
    assert domain_group("beauty", "all") == "domain:beauty"
    assert domain_group("beauty", "eh:low") == "domain:beauty|eh:low"
    assert split_domain_group("domain:beauty|cs:coldest") == ("beauty", "cs:coldest")
    assert split_domain_group("domain:sports") == ("sports", "all")
    assert split_domain_group("eh:low") == (None, "eh:low")


def test_query_domain_is_the_users_and_unknown_users_have_none():
    doms = query_domains(USERS, np.array([5, 0, 9, 3]))
    assert doms.tolist() == ["sports", "beauty", None, "beauty"]


def test_every_tool_table_per_domain(cfg):
    overall = tool_records(_preds(), _ctr(), USERS, cfg)
    by = per_domain(lambda p, c: tool_records(p, c, USERS, cfg), USERS, _preds(), _ctr())
    assert _value(overall, "sequential", "sasrec", "hr", 5, "all")["value"] == 0.5
    b = _value(by, "sequential", "sasrec", "hr", 5, "domain:beauty")
    s = _value(by, "sequential", "sasrec", "hr", 5, "domain:sports")
    assert (b["value"], b["n"], s["value"], s["n"]) == (1.0, 4, 0.0, 4)
    assert _value(by, "sequential", "sasrec", "hr", 10, "domain:sports")["value"] == 1.0
    assert _value(by, "direct", "sasrec", "hr", 5, "domain:sports")["value"] == 0.0
    assert _value(by, "ctr", "dlrm", "auc", None, "domain:beauty")["value"] == 1.0
    assert _value(by, "ctr", "dlrm", "auc", None, "domain:sports")["value"] == 0.0
    # The segments are the domain's own: eh:medium exists only in sports.
    assert _value(by, "sequential", "sasrec", "hr", 5, "domain:sports|eh:medium")["n"] == 2
    assert not [r for r in by if r["group"] == "domain:beauty|eh:medium" and r["n"]]
    # A domain's records are exactly the records of that domain's rows alone.
    sports = tool_records(
        _preds().filter(pa.array([u >= 4 for u in range(8)])),
        _ctr().filter(pa.array([u >= 4 for u in range(8)])),
        USERS,
        cfg,
    )
    _, split = split_by_domain(by)
    key = lambda r: (r["task"], r["model"], r["protocol"], r["metric"], r["k"], r["group"])  # noqa: E731
    assert sorted(map(key, split["sports"])) == sorted(map(key, sports))
    same = {key(r): r["value"] for r in sports}
    assert all(
        same[key(r)] == r["value"] or (math.isnan(r["value"]) and math.isnan(same[key(r)])) for r in split["sports"]
    )


def test_a_single_domain_run_has_no_per_domain_records(cfg):
    users = USERS.set_column(3, "domain", pa.array(["beauty"] * 8))
    assert per_domain(lambda p, c: tool_records(p, c, users, cfg), users, _preds(), _ctr()) == []


def test_drop_is_multi_minus_single_absolute_and_relative(cfg):
    by = per_domain(lambda p, c: tool_records(p, c, USERS, cfg), USERS, _preds(), _ctr())
    # Single-domain beauty run: HR@5 0.8 (n 10), AUC 0.5; no sports baseline named.
    seq = protocols(cfg)["sequential"]
    single = [
        {"task": task, "model": model, "protocol": proto, "metric": m, "k": k, "group": "all", "value": v, "n": n}
        for task, model, proto, m, k, v, n in (
            ("sequential", "sasrec", seq, "hr", 5, 0.8, 10),
            ("sequential", "sasrec", seq, "ndcg", 5, 0.0, 10),
            ("sequential", "sasrec", seq, "hr", 10, 1.0, 10),
            ("ctr", "dlrm", protocols(cfg)["ctr"], "auc", None, 0.5, 6),
        )
    ]
    drops = domain_drop_records(by, {"beauty": ("beauty", single)})
    d = {(r["task"], r["metric"], r["k"]): r for r in drops}
    hr = d[("sequential", "hr", 5)]
    assert hr["group"] == "domain:beauty" and hr["baseline"] == "beauty" and hr["protocol"].startswith(DROP_PROTOCOL)
    assert (hr["multi"], hr["single"], hr["n"], hr["n_single"]) == (1.0, 0.8, 4, 10)
    assert hr["value"] == pytest.approx(0.2) and hr["relative"] == pytest.approx(0.25)
    assert d[("ctr", "auc", None)]["value"] == pytest.approx(0.5)
    assert math.isnan(d[("sequential", "ndcg", 5)]["relative"])  # single is 0
    assert ("sequential", "hr", 20) not in d  # not a headline metric
    md = domain_drop_markdown(drops, "beauty_sports", {"sports": "sports"})
    assert "| beauty | `beauty` | sequential | sasrec | HR@5 | 1.0000 | 4 | 0.8000 | 10 | +0.2000 | +25.0% |" in md
    assert "Domain `sports`: its single-domain run `sports` has no report" in md
    assert "no single-domain run named" in domain_drop_markdown([], "x", {"sports": None})
    # Drop records never leak into the per-domain tables.
    _, split = split_by_domain(by + drops)
    assert not [r for r in split["beauty"] if r["protocol"].startswith(DROP_PROTOCOL)]


def test_domain_markdown_has_every_table_per_domain(cfg):
    by = per_domain(lambda p, c: tool_records(p, c, USERS, cfg), USERS, _preds(), _ctr())
    md = domain_markdown(by, protocols(cfg))
    beauty, sports = md.split("## Domain `beauty`")[1].split("## Domain `sports`")
    for part, hr5 in ((beauty, "1.0000"), (sports, "0.0000")):
        assert part.count("### sequential") == 2 and "### direct" in part and "### ctr" in part
        assert f"| sasrec | 4 | {hr5} |" in part
    assert domain_markdown([], protocols(cfg)) == ""


def test_baselines_must_name_a_domain_and_another_run():
    ok = load_config(CONFIG_DIR / "quickstart.yaml", ["evaluate.domain_baselines={synthetic: single}"])
    assert ok.evaluate.domain_baselines == {"synthetic": "single"}
    with pytest.raises(ConfigError, match="'evaluate.domain_baselines.sports'"):
        load_config(CONFIG_DIR / "quickstart.yaml", ["evaluate.domain_baselines={sports: sports}"])
    with pytest.raises(ConfigError, match="'evaluate.domain_baselines.synthetic'"):
        load_config(CONFIG_DIR / "quickstart.yaml", ["evaluate.domain_baselines={synthetic: quickstart}"])


def test_prepare_keys_users_by_domain():
    # Two P5 bundles both number their users from "1": two users, one domain each, own histories.
    raw = schemas.conform(
        pa.table(
            {
                "user_key": ["1", "1", "1", "1", "2"],
                "item_key": ["a", "b", "a", "c", "a"],
                "ts": pa.array([0, 1, 0, 1, 0], pa.int64()),
                "domain": ["beauty", "beauty", "sports", "sports", "sports"],
            }
        ),
        schemas.RAW_INTERACTIONS,
    ).append_column("_order", pa.array(np.arange(5, dtype=np.int64)))
    ulook = pa.compute.unique(P.user_lookup_key(raw.column("domain"), raw.column("user_key"))).sort()
    ilook = pa.compute.unique(P.item_lookup_key(raw.column("domain"), raw.column("item_key"))).sort()
    seqs = P.build_sequences(P.remap_interactions(raw, ulook, ilook)).to_pylist()
    by = {(r["domain"], r["user_key"]): r["items"] for r in seqs}
    assert len(seqs) == 3 and set(by) == {("beauty", "1"), ("sports", "1"), ("sports", "2")}
    # Items are per domain too: beauty's "a" and sports' "a" are different ids.
    assert len(by[("beauty", "1")]) == len(by[("sports", "1")]) == 2
    assert by[("beauty", "1")][0] != by[("sports", "1")][0] == by[("sports", "2")][0]
    # One domain: the ids are those of the plain user keys' sorted order (unchanged by the namespacing).
    one = raw.filter(pa.compute.equal(raw.column("domain"), "sports"))
    ulook1 = pa.compute.unique(P.user_lookup_key(one.column("domain"), one.column("user_key"))).sort()
    ids = P.remap_interactions(one, ulook1, ilook).column("user_id").to_pylist()
    assert ids == [0, 0, 1]


def test_system_tables_per_domain(cfg):
    from reasonrec.evaluation import system_records_by_domain

    # Sequential queries of users 0-7: beauty's answer lists hold the target first, sports' miss it.
    queries = schemas.conform(
        pa.table({"query_id": pa.array(range(8), pa.int64()), "target": pa.array([100 + q for q in range(8)])}),
        schemas.QUERIES,
    )
    preds = schemas.conform(
        pa.table(
            {
                "query_id": pa.array(range(8), pa.int64()),
                "user_id": pa.array(range(8), pa.int64()),
                "task": ["sequential"] * 8,
                "route": ["low", "low", "medium", "high"] * 2,
                "tools_used": [["sasrec"]] * 8,
                "items": [[100 + q, 1] if q < 4 else [1, 2] for q in range(8)],
                "latency_ms": pa.array([1.0] * 8, pa.float32()),
                "vlm_called": [False, False, True, True] * 2,
                "tool_items": [[1]] * 8,
            }
        ),
        schemas.PREDICTIONS,
    )
    by = system_records_by_domain(preds, queries, USERS, cfg)
    assert _value(by, "sequential", "reasonrec", "hr", 5, "domain:beauty")["value"] == 1.0
    assert _value(by, "sequential", "reasonrec", "hr", 5, "domain:sports")["value"] == 0.0
    assert _value(by, "sequential", "reasonrec", "hr", 5, "domain:sports|tier:high")["n"] == 1
    md = domain_markdown(by, protocols(cfg))
    assert "### System (ReasonRec routed scoring), domain `beauty`" in md
    assert "| tier:medium | 1 | 1.0000 |" in md.split("## Domain `sports`")[0]


def _fake_run(root, name: str, users: pa.Table, preds: pa.Table, ctr: pa.Table):
    """A run with ``prepare`` and ``train_tools`` outputs written by hand (no Ray)."""
    from reasonrec.io import open_store

    c = load_config(CONFIG_DIR / "quickstart.yaml", [f"output_root={root}", f"run_name={name}"])
    store = open_store(c)
    with store.stage_writer("prepare", "p", {}) as w:
        w.write_table("users", users)
    with store.stage_writer("train_tools", "t", {"prepare": store.manifest("prepare").fingerprint}) as w:
        w.write_table("predictions/part-0.parquet", preds.append_column("split", pa.array(["test"] * preds.num_rows)))
        w.write_table("ctr_predictions/part-0.parquet", ctr.append_column("split", pa.array(["test"] * ctr.num_rows)))
        w.write_json("metrics.json", {"tools": ["sasrec", "dlrm"]})
    return c, store


def test_evaluate_stage_reports_per_domain_and_the_drop(tmp_path, monkeypatch):
    import json

    from ray_jobs import evaluate as job

    monkeypatch.setattr(job, "init_ray", lambda *_: None)
    beauty = pa.array([u < 4 for u in range(8)])
    # The single-domain beauty run: two of its four test items at rank 9 (HR@5 0.5).
    single, _ = _fake_run(
        tmp_path,
        "beauty",
        USERS.filter(beauty),
        _preds().filter(beauty).set_column(2, "rank", pa.array([0, 0, 9, 9], pa.int64())),
        _ctr().filter(beauty),
    )
    job.run(single)
    multi, store = _fake_run(tmp_path, "both", USERS, _preds(), _ctr())
    # Set after loading: the config's one source is domain synthetic, the hand-built users are not.
    multi.evaluate.domain_baselines = {"beauty": "beauty", "sports": "sports"}  # sports: not run yet
    s = job.run(multi)
    assert s["domains"] == ["beauty", "sports"]
    with store.fs.open(store.path("report", "metrics.jsonl")) as f:
        recs = [json.loads(x) for x in f.read().decode().splitlines()]
    assert _value(recs, "sequential", "sasrec", "hr", 5, "all")["value"] == 0.5
    assert _value(recs, "sequential", "sasrec", "hr", 5, "domain:sports")["value"] == 0.0
    (drop,) = [
        r
        for r in recs
        if r["protocol"].startswith(DROP_PROTOCOL) and (r["task"], r["metric"], r["k"]) == ("sequential", "hr", 5)
    ]
    assert (drop["group"], drop["multi"], drop["single"], drop["value"], drop["relative"]) == (
        "domain:beauty",
        1.0,
        0.5,
        0.5,
        1.0,
    )
    with store.fs.open(store.path("report", "tools.md")) as f:
        md = f.read().decode()
    assert "## Per-domain drop" in md and "| +0.5000 | +100.0% |" in md
    assert "Domain `sports`: its single-domain run `sports` has no report" in md
    assert "## Domain `beauty`" in md and "## Domain `sports`" in md
    # Once the sports run is evaluated, evaluate re-runs (its report is an input) and adds it.
    sports = pa.array([u >= 4 for u in range(8)])
    job.run(_fake_run(tmp_path, "sports", USERS.filter(sports), _preds().filter(sports), _ctr().filter(sports))[0])
    s = job.run(multi)
    assert not s.get("skipped")
    with store.fs.open(store.path("report", "tools.md")) as f:
        md = f.read().decode()
    assert "has no report" not in md and "| sports | `sports` | sequential | sasrec | HR@5 | 0.0000 | 4 |" in md
    assert job.run(multi)["skipped"]
