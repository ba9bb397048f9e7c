"""The time-shift split protocol (issue 36 item 3, paper Fig. A1): ``data.split_protocol=timeshift``
makes ``prepare`` derive every per-user table from a time cut-off (history before it, test = the
user's first interaction at or after it), so no table a model trains on holds anything from then on."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import TINY_RUN

from ray_jobs import evaluate as eval_job
from ray_jobs import pipeline
from ray_jobs import prepare as job
from reasonrec.config import CONFIG_DIR, ConfigError, load_config
from reasonrec.data import prepare as P
from reasonrec.evaluation import protocols
from reasonrec.io import open_store

# One week of first timestamps (instead of two years): a global cut-off then falls inside many
# users' activity, as on real data with a time axis.
TINY = [
    "data.sources.0.synthetic.n_users=150",
    "data.sources.0.synthetic.n_items=60",
    "data.sources.0.synthetic.time_span_s=604800",
    "ray.shuffle_partitions=2",
    "data.direct_negatives=20",
    "data.timeshift_quantile=0.5",
    "data.split_protocol=timeshift",
]


def _seqs(rows: list[tuple[list[int], list[int]]]) -> pa.Table:
    n = len(rows)
    return pa.table(
        {
            "user_id": list(range(n)),
            "user_key": [f"u{i}" for i in range(n)],
            "domain": ["d"] * n,
            "items": [r[0] for r in rows],
            "ts": [r[1] for r in rows],
            "ratings": [[4.0] * len(r[0]) for r in rows],
            "reviews": [["ok"] * len(r[0]) for r in rows],
            "n_train": [0] * n,
            "duplicates": [[] for _ in rows],
        },
        schema=P.SEQUENCE_SCHEMA,
    )


def test_timeshift_sequences_feed_leave_one_out_unchanged():
    seqs = _seqs(
        [
            ([1, 2, 3, 4, 5], [1, 2, 10, 11, 12]),  # 2 before, 3 after: tested on item 3
            ([6, 7], [10, 11]),  # nothing before the cut-off
            ([8, 9, 10], [1, 2, 3]),  # nothing after: history only
            ([11, 12, 13, 14], [1, 11, 12, 13]),  # 1 before: history only
            ([15, 16, 17, 18], [3, 5, 9, 10]),  # 3 before, 1 exactly at the cut-off: tested
        ]
    )
    ts = P.timeshift_sequences(seqs, cutoff=10)
    assert ts.column("targets").to_pylist() == [True, False, False, False, True]
    assert ts.column("items").to_pylist() == [[1, 2, 3], [], [8, 9, 10], [11], [15, 16, 17, 18]]
    assert ts.column("n_train").to_pylist() == [1, 0, 3, 1, 2]
    loo = P.loo_table(ts).to_pylist()
    assert [(r["train_items"], r["valid_item"], r["test_item"]) for r in loo] == [
        ([1], 2, 3),
        ([], None, None),
        ([8, 9, 10], None, None),  # three items but no target: leave-one-out would have tested it
        ([11], None, None),
        ([15, 16], 17, 18),
    ]
    assert P.timeshift_counts(ts).to_pylist() == [
        {"users_tested": 2, "users_train_only": 2, "users_without_history": 1}
    ]
    p = P.SplitParams(
        n_items=40,
        seed=1,
        direct_negatives=5,
        ctr_negatives=2,
        ctr_split=(0.8, 0.1, 0.1),
        explanation_split=(0.8, 0.1, 0.1),
        eh_thresholds=(0.3, 0.7),
    )
    direct = P.direct_candidates_table(ts, p).to_pylist()
    assert sorted((r["user_id"], r["split"], r["positive"]) for r in direct) == [
        (0, "test", 3),
        (0, "valid", 2),
        (4, "test", 18),
        (4, "valid", 17),
    ]
    ctr = P.ctr_table(ts, p)
    pos = ctr.filter(pc.equal(ctr.column("label"), 1)).to_pylist()
    test_pos = sorted((r["user_id"], r["item_id"]) for r in pos if r["split"] == "test")
    assert test_pos == [(0, 3), (4, 18)]
    # Nothing from after a user's test item is a positive anywhere: items 4, 5, 6, 7, 12, 13, 14 are gone.
    assert sorted((r["user_id"], r["item_id"]) for r in pos) == [
        (0, 1),
        (0, 2),
        (0, 3),
        (2, 8),
        (2, 9),
        (2, 10),
        (3, 11),
        (4, 15),
        (4, 16),
        (4, 17),
        (4, 18),
    ]


def test_split_protocol_is_validated():
    with pytest.raises(ConfigError, match="data.split_protocol"):
        load_config(CONFIG_DIR / "quickstart.yaml", ["data.split_protocol=random"])


@pytest.fixture(scope="module")
def timeshift_run(ray_local, tmp_path_factory):
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", TINY + [f"output_root={tmp_path_factory.mktemp('runs')}"])
    return cfg, job.run(cfg), open_store(cfg)


def test_prepare_timeshift_has_no_leakage(timeshift_run):
    cfg, s, store = timeshift_run
    cut = s["timeshift_cutoff"]
    inter = store.read_table("prepare", "interactions").sort_by([("user_id", "ascending"), ("ts", "ascending")])
    by_user: dict[int, list[tuple[int, int]]] = {}
    for r in inter.to_pylist():
        by_user.setdefault(r["user_id"], []).append((r["ts"], r["item_id"]))
    loo = store.read_table("prepare", "loo").to_pylist()
    tested = 0
    for r in loo:
        seq = by_user.get(r["user_id"], [])
        before = [i for t, i in seq if t < cut]
        after = [i for t, i in seq if t >= cut]
        assert all(t < cut for t in r["train_ts"])  # every training interaction is before the cut-off
        if r["test_item"] is None:
            assert r["train_items"] == before and not (len(before) >= 2 and after)
            continue
        tested += 1
        assert r["train_items"] + [r["valid_item"]] == before and r["test_item"] == after[0]
    assert tested == s["timeshift_split"]["users_tested"] > 20
    assert s["split_protocol"] == "timeshift" and s["rows"]["interactions"] == inter.num_rows  # the clean data, whole
    # CTR: test positives are the time-shift test items; every train / valid positive is an
    # interaction before the cut-off.
    ctr = store.read_table("prepare", "ctr")
    pos = ctr.filter(pc.equal(ctr.column("label"), 1)).to_pylist()
    tests = {(r["user_id"], r["test_item"]) for r in loo if r["test_item"] is not None}
    assert {(r["user_id"], r["item_id"]) for r in pos if r["split"] == "test"} <= tests
    before_pairs = {(u, i) for u, seq in by_user.items() for t, i in seq if t < cut}
    assert all((r["user_id"], r["item_id"]) in before_pairs for r in pos if r["split"] != "test")
    direct = store.read_table("prepare", "direct_candidates")
    assert {(r["user_id"], r["positive"]) for r in direct.to_pylist() if r["split"] == "test"} <= tests
    users = store.read_table("prepare", "users")
    n_train = dict(zip(users.column("user_id").to_pylist(), users.column("n_train").to_pylist()))
    assert all(n_train[r["user_id"]] == len(r["train_items"]) for r in loo)


def test_report_names_the_time_shift(timeshift_run):
    cfg, _, store = timeshift_run
    assert "time-shift test item" in protocols(cfg)["sequential"]
    assert "time-shift test item" in protocols(cfg)["sequential_masked"]
    line = eval_job.protocol_line(store.require("prepare"))
    assert "time shift (`data.split_protocol=timeshift`" in line and "P5 bundles have no timestamps" in line
    default = load_config(CONFIG_DIR / "quickstart.yaml")
    assert protocols(default)["sequential"] == "full-catalog ranking, leave-one-out test item"


def test_comparison_table_puts_runs_side_by_side():
    from reasonrec.evaluation import comparison_markdown

    def rec(model, value, n, protocol="full-catalog ranking, x"):
        return {"task": "sequential", "model": model, "protocol": protocol, "metric": "hr", "k": 5}, value, n

    def records(values):
        out = []
        for model, v, n in values:
            r, value, n = rec(model, v, n)
            out.append({**r, "group": "all", "value": value, "n": n})
            out.append({**r, "group": "eh:low", "value": 0.99, "n": 1})  # segments stay out
            out.append(
                {
                    **r,
                    "protocol": "full-catalog ranking with history items masked",
                    "group": "all",
                    "value": 0.5,
                    "n": n,
                }
            )
        return out

    text = comparison_markdown(
        [
            ("ts", "time shift", records([("sasrec", 0.25, 40), ("reasonrec", 0.3, 12)])),
            ("loo", "random split", records([("sasrec", 0.125, 80)])),
        ]
    )
    assert "- `ts`: time shift" in text and "- `loo`: random split" in text
    lines = text.splitlines()
    assert next(x for x in lines if x.startswith("| sasrec |")).startswith("| sasrec | 0.2500 |  |  | 40 | 0.1250 |")
    assert next(x for x in lines if x.startswith("| reasonrec |")).startswith("| reasonrec | 0.3000 |")
    assert lines.index(next(x for x in lines if x.startswith("| reasonrec |"))) < lines.index(
        next(x for x in lines if x.startswith("| sasrec |"))
    )


def _row(report: str, heading: str, model: str) -> list[str]:
    """The cells of ``model``'s row in the comparison table under ``### heading``."""
    part = report.split("## Split protocols side by side", 1)[1].split(f"### {heading}\n", 1)[1]
    line = next(x for x in part.splitlines() if x.startswith(f"| {model} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_pipeline_puts_the_time_shift_run_next_to_the_random_split(tiny_run, tmp_path):
    """pipeline.timeshift_comparison (on in the quickstart preset): the pipeline adds a tools-only
    time-shift run of the same world (no instructions, no fine-tune) and the main report shows its
    tools' and its tools-mode system's numbers next to the random split's; a re-run redoes nothing."""
    cfg, store = tiny_run
    root = tmp_path / "runs"
    # A copy of the session's tiny run (its report stays as the other tests read it): every main
    # stage is up to date, so the pipeline runs just the time-shift run and the main evaluate.
    shutil.copytree(store.path(), root / cfg.run_name)
    overrides = [*TINY_RUN, f"output_root={root}", "pipeline.timeshift_tools=[popularity,xgb_ctr]"]
    argv = ["--config", str(CONFIG_DIR / "quickstart.yaml"), *overrides]
    assert pipeline.main(argv) == 0
    main_cfg = load_config(CONFIG_DIR / "quickstart.yaml", overrides)
    assert main_cfg.pipeline.timeshift_comparison and main_cfg.pipeline.timeshift_quantile == 0.5
    main, ts_cfg = open_store(main_cfg), pipeline.timeshift_config(main_cfg)
    ts = open_store(ts_cfg)
    assert ts_cfg.run_name == f"{cfg.run_name}-timeshift" and ts_cfg.score.mode == "tools"
    prep = ts.require("prepare").metrics
    assert prep["split_protocol"] == "timeshift" and prep["timeshift_split"]["users_tested"] >= 10
    assert ts.manifest("instructions") is None and ts.manifest("finetune") is None
    summary = ts.read_json("score", "summary.json")
    assert summary["mode"] == "tools" and summary["vlm_calls"] == 0 and summary["predictions"] > 0
    report = main.fs.cat(main.path("report", "report.md")).decode()
    assert f"- `{cfg.run_name}`: random split (`data.split_protocol=loo`)" in report
    line = next(x for x in report.splitlines() if x.startswith(f"- `{ts_cfg.run_name}`: "))
    assert "time shift (`data.split_protocol=timeshift`" in line and "P5 bundles have no timestamps" in line
    trained = ts.read_json("train_tools", "metrics.json")["tools"]
    assert {"popularity", "xgb_ctr"} <= set(trained) and "sasrec" not in trained  # the named subset
    assert "`score.mode=tools`" in line and f"tools trained: {', '.join(trained)} (not this run's set)" in line
    # Time-shift rows with numbers: each compared cell is the time-shift run's own record.
    ts_records = [json.loads(x) for x in ts.fs.cat(ts.path("report", "metrics.jsonl")).decode().splitlines()]
    for task, model, metric, k in (
        ("sequential", "reasonrec", "hr", 5),
        ("sequential", "popularity", "hr", 5),
        ("direct", "reasonrec", "hr", 5),
        ("ctr", "reasonrec", "auc", None),
        ("ctr", "xgb_ctr", "auc", None),
    ):
        n_cols = {"sequential": 4, "direct": 3, "ctr": 2}[task]  # metrics + n, per run
        cells = _row(report, task, model)
        random_split, time_shift = cells[:n_cols], cells[n_cols : 2 * n_cols]
        (rec,) = [
            r
            for r in ts_records
            if (r["task"], r["model"], r["metric"], r["k"], r["group"]) == (task, model, metric, k, "all")
            and "masked" not in r["protocol"]
            and not r["protocol"].startswith(("routing", "calibration"))
        ]
        assert time_shift[0] == f"{rec['value']:.4f}" and time_shift[-1] == str(rec["n"]), (task, model)
        if model in ("reasonrec", "popularity"):  # both runs have these (an AUC may be undefined on 12 rows)
            assert int(random_split[-1]) > 0
    # A re-run finds every stage of both runs committed: nothing is written again.
    stages = ("prepare", "train_tools", "planner", "score", "report")
    stamps = [s.manifest(stage).created_at for s in (main, ts) for stage in stages]
    assert pipeline.main(argv) == 0
    assert stamps == [s.manifest(stage).created_at for s in (main, ts) for stage in stages]
