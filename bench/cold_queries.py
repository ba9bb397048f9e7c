"""Write a run's test queries of its coldest users (cold-start groups 1-3 over all test users of
the task: the rule of ``ray_jobs.evaluate``) to a Parquet query file, so that a costly scoring
variant can be measured on exactly the users item 9 asks about (``score.queries_path=OUT``):

    python -m bench.cold_queries --config configs/quickstart.yaml --out OUT score.max_queries_per_task=0 [k=v ...]

(``score.max_queries_per_task`` applies first, as in scoring: left at its default it keeps the
coldest of a hash sample of the test queries, and the line printed says so.)

``bench.vlm_vs_tools --stage <that variant's stage>`` then pairs those users against every tool
in its ``all`` rows (its ``cs:coldest`` rows are the coldest *of* them).
"""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_jobs.score import score_queries
from reasonrec import evaluation
from reasonrec.config import load_config
from reasonrec.io import open_store
from reasonrec.metrics import COLD_START_AGGREGATES


def coldest(queries: pa.Table, users: pa.Table) -> pa.Table:
    """The queries of the coldest users, task by task (groups are computed per task)."""
    parts = []
    for task in sorted(set(queries.column("task").to_pylist())):
        q = queries.filter(pc.equal(queries.column("task"), task))
        _, groups = evaluation.segments(users, np.array(q.column("user_id").to_pylist(), np.int64))
        parts.append(q.filter(pa.array(np.isin(groups, COLD_START_AGGREGATES["coldest"]))))
    return pa.concat_tables(parts)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--out", required=True, help="Parquet query file to write (local path)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(a.config, list(a.overrides))
    store = open_store(cfg)
    users = store.read_table("prepare", "users", columns=["user_id", "n_train", "eh_bucket"])
    queries = score_queries(cfg, store)
    out = coldest(queries, users)
    pq.write_table(out, a.out)
    cap = cfg.score.max_queries_per_task
    sampled = (
        f", a hash sample of at most score.max_queries_per_task={cap} per task"
        if cap and not cfg.score.queries_path
        else ""
    )
    print(f"wrote {out.num_rows} of {queries.num_rows} queries (the coldest users' of each task{sampled}) to {a.out}")


if __name__ == "__main__":
    main()
