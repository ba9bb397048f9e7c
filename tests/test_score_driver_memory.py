"""bench/score_driver_memory.py's helpers: the query-file generator and the driver's own peak RSS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.score_driver_memory import make_query_file, report, run_driver
from reasonrec.data.schemas import QUERIES

REPO = Path(__file__).resolve().parents[1]


def test_query_file_repeats_the_source_renumbered_in_row_groups(tmp_path):
    source = pa.Table.from_pylist(
        [{"query_id": 10**12 + i, "task": "ctr", "user_id": i, "item_id": 100 + i} for i in range(5)], schema=QUERIES
    )
    path = str(tmp_path / "q.parquet")
    assert make_query_file(source, 12, path, row_group_rows=5) == 12
    meta = pq.read_metadata(path)
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [5, 5, 2]
    t = pq.read_table(path)
    assert t.schema.equals(QUERIES) and t.column("query_id").to_pylist() == list(range(12))
    assert t.column("user_id").to_pylist() == [0, 1, 2, 3, 4] * 2 + [0, 1]
    assert t.column("item_id").to_pylist() == [100 + u for u in t.column("user_id").to_pylist()]


def test_driver_peak_rss_is_the_score_processs_own(tmp_path):
    log = tmp_path / "help.log"
    rec = run_driver(REPO, ["--help"], str(log))  # parses its arguments, prints help, exits 0
    assert "--config" in log.read_text()
    # The interpreter with the job's imports: more than a bare Python, far less than a machine.
    assert 0.03 < rec["driver_peak_rss_gib"] < 8 and rec["wall_s"] > 0 and len(rec["load"]) == 2
    table = report([{**rec, "queries": 10000, "code": "after"}])
    assert "| 10,000 | after | " in table.splitlines()[2]


def test_the_drivers_of_the_jobs_do_not_import_torch():
    """The score and fit_planner drivers fit xgboost and move Arrow tables; the tools (torch,
    TorchRec) load in the actors. Importing every tool module with the package made each job's
    driver import torch at start (1-2 s on 2 cores, and memory); the registry imports them on
    first use."""
    code = (
        "import sys, ray_jobs.score, ray_jobs.fit_planner, ray_jobs.evaluate, ray_jobs.shards;"
        "from reasonrec.tools import tool_class;"
        "print(sorted(m for m in ('torch', 'torchrec', 'transformers') if m in sys.modules));"
        "tool_class('sasrec');"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "True"], out  # nothing heavy until a tool class is asked for
