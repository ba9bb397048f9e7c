"""The report's calibration section (issue 36 item 5): ECE and reliability tables of the VLM's
verbalised and token-probability confidences and of the planner's P(tool right), per task and EH
bucket, checked against values computed here independently from a predictions table."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pytest

from reasonrec.config import CONFIG_DIR, load_config
from reasonrec.data.schemas import PREDICTIONS, QUERIES, conform
from reasonrec.evaluation import (
    CALIBRATION_COLUMNS,
    CALIBRATION_FALLBACKS,
    CALIBRATION_NAMES,
    CALIBRATION_NONE,
    CALIBRATION_SOURCES,
    TOKEN_CONFIDENCE_GAP,
    calibration_markdown,
    calibration_records,
    reliability_plot,
    reliability_series,
)

BUCKETS = ("low", "medium", "high")
RECORDED = ("conf_verbal", "conf_token", "tool_confidence")  # the confidences scoring records


def test_predictions_record_both_vlm_confidences_and_the_planners():
    assert all(PREDICTIONS.field(c).type == pa.float32() and PREDICTIONS.field(c).nullable for c in RECORDED)
    assert CALIBRATION_COLUMNS == dict(zip(CALIBRATION_SOURCES, RECORDED))


def _tables(n: int = 240, seed: int = 0, extra_columns: bool = False):
    """Random predictions (sequential, direct, ctr, explanation; VLM- and tool-answered rows, thoughts
    with and without a stated confidence) and their queries with truth."""
    rng = np.random.default_rng(seed)
    tasks = rng.choice(["sequential", "direct", "ctr", "explanation"], n)
    vlm = rng.random(n) < 0.6
    verbal = np.round(rng.random(n), 2)
    has_verbal = rng.random(n) < 0.7
    token = rng.random(n)
    tool_conf = rng.random(n)
    target = rng.integers(0, 30, n)
    label = rng.integers(0, 2, n)
    prob = rng.random(n)
    preds, queries = [], []
    for i in range(n):
        # The target sits in the answer at a random position (or not at all).
        items = rng.permutation(30)[:10].tolist()
        pos = rng.integers(0, 14)
        if pos < 10 and target[i] not in items:
            items[pos] = int(target[i])
        thought = None
        if vlm[i]:
            thought = "EH: high (0.90); Tools: none" + (f"; Confidence: {verbal[i]:.2f}" if has_verbal[i] else "")
        conf = (verbal[i] if has_verbal[i] else token[i]) if vlm[i] else tool_conf[i]
        row = {
            "query_id": i,
            "user_id": i,
            "task": str(tasks[i]),
            "route": "high" if vlm[i] else "low",
            "confidence": float(conf),
            "items": items if tasks[i] in ("sequential", "direct") else None,
            "prob": float(prob[i]) if tasks[i] == "ctr" else None,
            "eh_bucket": str(BUCKETS[i % 3]),
            "vlm_called": bool(vlm[i]),
            "tool_items": rng.permutation(30)[:10].tolist() if tasks[i] in ("sequential", "direct") else None,
            "tool_prob": float(rng.random()) if tasks[i] == "ctr" else None,
            "thought": thought,
        }
        if extra_columns:
            row |= {
                "conf_verbal": float(verbal[i]) if vlm[i] and has_verbal[i] else None,
                "conf_token": float(token[i]) if vlm[i] else None,
                "tool_confidence": float(tool_conf[i]),
            }
        preds.append(row)
        queries.append(
            {
                "query_id": i,
                "task": str(tasks[i]),
                "user_id": i,
                "target": int(target[i]) if tasks[i] in ("sequential", "direct") else None,
                "label": int(label[i]) if tasks[i] == "ctr" else None,
            }
        )
    p = conform(pa.Table.from_pylist(preds), PREDICTIONS)
    if not extra_columns:  # a run scored before PREDICTIONS recorded both confidences
        p = p.drop_columns(list(RECORDED))
    return p, conform(pa.Table.from_pylist(queries), QUERIES)


def _stated(thought: str | None) -> float | None:
    """The confidence a thought states, by the format's rules (``Confidence: 0.53``; ``53%`` or a
    value above 1 is a percentage; clipped to [0, 1]), or None."""
    m = re.search(r"Confidence\s*[:=]\s*([-+]?\d*\.?\d+)(\s*%)?", thought or "", re.I)
    if not m:
        return None
    v = float(m.group(1))
    return min(max(v / 100 if m.group(2) or v > 1 else v, 0.0), 1.0)


def _ece(conf: np.ndarray, right: np.ndarray, bins: int = 10) -> tuple[float, dict[int, tuple[float, float, int]]]:
    """ECE and per-bin (mean confidence, accuracy, count), written out here on purpose."""
    table, ece = {}, 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        sel = (conf >= lo) & ((conf < hi) if b < bins - 1 else (conf <= hi))
        if sel.any():
            table[b] = (conf[sel].mean(), right[sel].mean(), int(sel.sum()))
            ece += sel.sum() / len(conf) * abs(right[sel].mean() - conf[sel].mean())
    return ece, table


def _expected(preds: pa.Table, queries: pa.Table, cfg, extra: bool) -> dict[tuple[str, str, str], tuple]:
    """(source, task, group) -> (ECE, bins), from the rows alone."""
    p, q = preds.to_pylist(), {r["query_id"]: r for r in queries.to_pylist()}
    out = {}
    for source in CALIBRATION_SOURCES:
        for task in ("sequential", "direct", "ctr"):
            for group in ("all", "eh:low", "eh:medium", "eh:high"):
                conf, right = [], []
                for r in p:
                    if r["task"] != task or (group != "all" and f"eh:{r['eh_bucket']}" != group):
                        continue
                    truth = q[r["query_id"]]
                    if source == "vlm_verbal":
                        c = _stated(r["thought"])
                        if not r["vlm_called"] or c is None:
                            continue
                        k, answer = cfg.instructions.usable_k, (r["items"], r["prob"])
                    elif source == "vlm_token":
                        if not r["vlm_called"]:
                            continue
                        if extra:
                            c = r["conf_token"]
                        elif _stated(r["thought"]) is not None:
                            continue  # scoring kept the verbalised one: no token confidence stored
                        else:
                            c = r["confidence"]
                        k, answer = 1, (r["items"], r["prob"])
                    else:
                        if extra:
                            c = r["tool_confidence"]
                            answer = (r["tool_items"], r["tool_prob"]) if r["vlm_called"] else (r["items"], r["prob"])
                        elif r["vlm_called"]:
                            continue
                        else:
                            c, answer = r["confidence"], (r["items"], r["prob"])
                        k = cfg.planner.correct_k
                    if task == "ctr":
                        ok = (answer[1] >= 0.5) == (truth["label"] == 1)
                    else:
                        ok = truth["target"] in answer[0][:k]
                    conf.append(c)
                    right.append(float(ok))
                if conf:
                    out[(source, task, group)] = _ece(np.asarray(conf, np.float64), np.asarray(right))
    return out


@pytest.mark.parametrize("extra", [False, True], ids=["columns-today", "conf-columns-recorded"])
def test_calibration_records_match_an_independent_computation(extra):
    cfg = load_config(CONFIG_DIR / "quickstart.yaml")
    preds, queries = _tables(extra_columns=extra)
    records = calibration_records(preds, queries, cfg)
    expected = _expected(preds, queries, cfg, extra)
    got = {(r["model"], r["task"], r["group"]): r for r in records if r["metric"] == "ece"}
    assert set(got) == set(expected) and len(expected) == 3 * 3 * 4  # every source, task and bucket
    for key, (ece, bins) in expected.items():
        assert got[key]["value"] == pytest.approx(ece, abs=1e-6), key
        assert got[key]["n"] == sum(b[2] for b in bins.values())
        rb = {
            (r["metric"], r["k"]): r
            for r in records
            if (r["model"], r["task"], r["group"]) == key and r["metric"].startswith("bin_")
        }
        assert {k for _, k in rb} == set(bins), key
        for b, (mc, acc, cnt) in bins.items():
            assert rb[("bin_confidence", b)]["value"] == pytest.approx(mc, abs=1e-6)
            assert rb[("bin_accuracy", b)]["value"] == pytest.approx(acc, abs=1e-9)
            assert rb[("bin_confidence", b)]["n"] == cnt
    # Explanations have no right / wrong: no calibration rows for them.
    assert not any(r["task"] == "explanation" for r in records)


def test_calibration_markdown_lists_every_source_and_bucket():
    cfg = load_config(CONFIG_DIR / "quickstart.yaml")
    preds, queries = _tables()
    records = calibration_records(preds, queries, cfg)
    text = calibration_markdown(records, preds.column_names)
    ece = {(r["model"], r["task"], r["group"]): r for r in records if r["metric"] == "ece"}
    row = next(line for line in text.splitlines() if line.startswith("| VLM verbalised confidence | direct |"))
    for g in ("all", "eh:low", "eh:medium", "eh:high"):
        r = ece[("vlm_verbal", "direct", g)]
        assert f"{r['value']:.4f} (n={r['n']})" in row
    assert "| planner P(tool right) | ctr |" in text and "| VLM token-probability confidence | sequential |" in text
    assert "Reliability tables" in text and TOKEN_CONFIDENCE_GAP in text
    # The text says where each confidence came from: an old run's fallbacks ...
    assert "VLM verbalised confidence (parsed from the thought (this run predates the `conf_verbal`" in text
    assert "planner P(tool right) (`confidence` of the tool answers (this run predates" in text
    assert "recorded `" not in text
    # ... and with both confidences recorded per answer, the columns (and the gap note goes away).
    preds2, queries2 = _tables(extra_columns=True)
    text2 = calibration_markdown(calibration_records(preds2, queries2, cfg), preds2.column_names)
    assert TOKEN_CONFIDENCE_GAP not in text2 and "predates" not in text2
    for source, col in CALIBRATION_COLUMNS.items():
        assert f"- calibration (10 equal-width bins): {CALIBRATION_NAMES[source]} (recorded `{col}`);" in text2


class _Files:
    def __init__(self):
        self.files: dict[str, bytes] = {}

    def write_bytes(self, name: str, data: bytes) -> None:
        self.files[name] = data


def test_reliability_plot_draws_every_bin_of_every_source_task_and_bucket():
    cfg = load_config(CONFIG_DIR / "quickstart.yaml")
    preds, queries = _tables(extra_columns=True)
    records = calibration_records(preds, queries, cfg)
    expected = _expected(preds, queries, cfg, extra=True)
    series = reliability_series(records)
    assert {(t, g, s) for (t, g), by in series.items() for s in by} == {(t, g, s) for s, t, g in expected}
    for (source, task, group), (_, bins) in expected.items():
        pts = series[(task, group)][source]
        assert pts["n"] == [bins[b][2] for b in sorted(bins)]  # one point per non-empty bin, in bin order
        assert pts["confidence"] == pytest.approx([bins[b][0] for b in sorted(bins)], abs=1e-6)
        assert pts["accuracy"] == pytest.approx([bins[b][1] for b in sorted(bins)], abs=1e-9)
    out = _Files()
    assert reliability_plot(records, out) == ["reliability.png"]
    assert out.files["reliability.png"].startswith(b"\x89PNG") and len(out.files["reliability.png"]) > 10_000
    assert reliability_plot([r for r in records if r["metric"] == "ece"], _Files()) == []  # no bins, no plot


def test_tiny_run_report_has_the_calibration_section(tiny_run):
    """The evaluate stage of a whole (tiny) routed run writes the section, and its ECE rows are the
    ones computed independently from that run's predictions and queries."""
    cfg, store = tiny_run
    preds, queries = store.read_table("score", "predictions"), store.read_table("score", "queries")
    with store.fs.open(store.path("report", "metrics.jsonl"), "r") as f:
        records = [json.loads(line) for line in f]
    report = store.fs.open(store.path("report", "report.md"), "r").read()
    assert "### Calibration (ECE over 10 equal-width bins" in report
    assert "![reliability.png](reliability.png)" in report  # the reliability diagrams, next to the report
    assert store.fs.open(store.path("report", "reliability.png"), "rb").read(4) == b"\x89PNG"
    assert "Split protocol: random split (`data.split_protocol=loo`)" in report
    # Scoring records both VLM confidences and the planner's (the report reads those columns).
    assert set(RECORDED) <= set(preds.column_names)
    assert all(f"recorded `{c}`" in report for c in RECORDED) and TOKEN_CONFIDENCE_GAP not in report
    expected = _expected(preds, queries, cfg, extra=True)
    got = {(r["model"], r["task"], r["group"]): r for r in records if r["metric"] == "ece"}
    assert expected and set(got) == set(expected)
    for key, (ece, _) in expected.items():
        assert got[key]["value"] == pytest.approx(ece, abs=1e-6), key
    # The verbalised confidence is the one the thought states (the tiny run's 6-step VLM may state
    # none), scoring's `confidence` is it where stated and the token one elsewhere, and every VLM
    # answer has its token confidence: all of them are in the token rows.
    vlm = [r for r in preds.to_pylist() if r["vlm_called"] and r["task"] != "explanation"]
    for r in vlm:
        stated = _stated(r["thought"])
        assert r["conf_verbal"] == (None if stated is None else pytest.approx(stated, abs=1e-6)), r["query_id"]
        assert r["conf_token"] is not None and 0.0 <= r["conf_token"] <= 1.0
        assert r["confidence"] == pytest.approx(r["conf_token"] if stated is None else stated, abs=1e-6)
    n_token = sum(got[k]["n"] for k in got if k[0] == "vlm_token" and k[2] == "all")
    assert vlm and n_token == len(vlm)
    # The planner's P(tool right) on every ranking / CTR answer, the VLM's or the tools'.
    n_planner = sum(got[k]["n"] for k in got if k[0] == "planner" and k[2] == "all")
    assert n_planner == sum(r["task"] != "explanation" for r in preds.to_pylist())


def test_calibration_markdown_says_which_confidence_has_no_rows():
    """A run whose tools answered every ranking / CTR query (the quickstart preset routes them all
    there) still gets the section: the planner's rows, and a line per VLM confidence saying why not."""
    cfg = load_config(CONFIG_DIR / "quickstart.yaml")
    preds, queries = _tables()
    preds = preds.set_column(
        preds.schema.get_field_index("vlm_called"), "vlm_called", pa.array([False] * preds.num_rows)
    )
    records = calibration_records(preds, queries, cfg)
    assert {r["model"] for r in records} == {"planner"}
    text = calibration_markdown(records, preds.column_names)
    for source in ("vlm_verbal", "vlm_token"):
        where = CALIBRATION_FALLBACKS[source]  # this run predates the recorded columns
        assert f"- {CALIBRATION_NAMES[source]} ({where}): {CALIBRATION_NONE[source]}" in text
    assert "| planner P(tool right) | sequential |" in text
