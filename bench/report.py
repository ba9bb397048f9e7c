"""Shared helpers of the scoring benchmarks: one system metric out of evaluate's records, and the
Markdown table every benchmark prints, and the variant benchmarks' command line."""

from __future__ import annotations

import argparse
import logging


def system_metric(records: list[dict], task: str, metric: str, k: int | None = None, group: str = "all") -> float:
    """The value of one metric from ``reasonrec.evaluation.system_records`` output (NaN if absent)."""
    for r in records:
        if r["task"] == task and r["metric"] == metric and r["k"] == k and r["group"] == group:
            return r["value"]
    return float("nan")


def markdown_table(rows: list[dict], cols: list[str], raw: tuple[str, ...] = ()) -> str:
    """Rows as a Markdown table; floats to 4 decimals except the columns in ``raw`` (already rounded)."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append(
            "| "
            + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) and c not in raw else str(r[c]) for c in cols)
            + " |"
        )
    return "\n".join(lines)


def variant_args(variants: dict[str, list[str]]) -> argparse.Namespace:
    """The command line of a variant benchmark: ``--config``, ``--variants a,b`` (default: all of
    ``variants``) and ``key=value`` overrides applied to every variant."""
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--variants", default=",".join(variants))
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    unknown = [v for v in a.variants.split(",") if v not in variants]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {sorted(variants)}")
    return a
