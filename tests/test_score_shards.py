"""The scoring job's query shards (ray_jobs/shards.py) on a real local Ray: cut and checked by Ray
tasks, never by the driver, reused by a re-run; a query file's checks across row groups; the
committed multi-file output; the exactly-once check on query ids alone."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import TINY_RUN, score_until_commit

from ray_jobs import score, shards
from reasonrec.config import CONFIG_DIR, ConfigError, load_config
from reasonrec.data.queries import QueryFileError, load_query_file
from reasonrec.data.schemas import PREDICTIONS, QUERIES
from reasonrec.io import TMP_DIR
from reasonrec.scoring import summarize


def _config(cfg, *extra):
    return load_config(CONFIG_DIR / "quickstart.yaml", TINY_RUN + [f"output_root={cfg.output_root}", *extra])


def _no_driver_work(monkeypatch):
    """Make the driver process unable to check or build queries itself: what still works ran on
    the cluster's workers (which import the real modules)."""

    def refuse(*a, **kw):
        raise AssertionError("the driver cut the queries itself")

    monkeypatch.setattr(shards, "check_query_rows", refuse)
    monkeypatch.setattr("reasonrec.data.queries.score_split_queries", refuse)
    monkeypatch.setattr("reasonrec.data.queries.check_query_rows", refuse)


def test_query_shards_are_cut_by_ray_tasks_and_reused_by_a_rerun(tiny_run, tmp_path, monkeypatch):
    import ray

    cfg, store = tiny_run
    queries = store.read_table("score", "queries")  # the session run's 48 prepared queries
    path = str(tmp_path / "queries.parquet")
    pq.write_table(queries, path, row_group_size=7)  # runs of row groups, 10-row shards below
    c = _config(cfg, f"score.queries_path={path}", "score.shard_rows=10", "score.stage_name=shards_file")
    stage_dir = score.staging_name(c, store)
    _no_driver_work(monkeypatch)
    got = shards.query_shards(c, store, stage_dir)
    # Row groups of 7 gathered into runs of at least 10 rows (14), each cut into 10-row shards.
    assert got.rows == [10, 4] * 3 + [6] and got.n == 48
    assert got.folder == store.path(TMP_DIR, stage_dir, "queries")
    cut = pq.read_table(got.folder, filesystem=store.arrow_fs)
    assert cut.schema.equals(QUERIES) and cut.equals(queries)  # in the file's order, whole
    assert sorted(store.fs.ls(got.folder, detail=False)) == sorted(got.files())
    stamps = {f: store.fs.info(f)["mtime"] for f in got.files()}

    # A re-run finds the index and starts no task at all.
    def no_tasks(*a, **kw):
        raise AssertionError("a re-run cut the queries again")

    monkeypatch.setattr(ray, "remote", no_tasks)
    again = shards.query_shards(c, store, stage_dir)
    assert again == got and {f: store.fs.info(f)["mtime"] for f in got.files()} == stamps
    monkeypatch.undo()
    # The prepared queries: one task builds them, the same table the driver would have built.
    p = _config(cfg, "score.shard_rows=20", "score.stage_name=shards_prepared")
    _no_driver_work(monkeypatch)
    prepared = shards.query_shards(p, store, score.staging_name(p, store))
    monkeypatch.undo()
    assert prepared.rows == [20, 20, 8]
    assert pq.read_table(prepared.folder, filesystem=store.arrow_fs).equals(score.score_queries(p, store))


def test_query_file_problems_are_found_across_row_groups(tiny_run, tmp_path):
    cfg, store = tiny_run

    def cut(name, table, row_group_size=3):
        path = str(tmp_path / f"{name}.parquet")
        pq.write_table(table, path, row_group_size=row_group_size)
        c = _config(cfg, f"score.queries_path={path}", "score.shard_rows=3", f"score.stage_name={name}")
        stage_dir = score.staging_name(c, store)
        try:
            return shards.query_shards(c, store, stage_dir), path
        except QueryFileError as exc:
            # The whole file's check in one process says the same; no shard or index is kept.
            with pytest.raises(QueryFileError) as whole:
                load_query_file(path, store)
            assert str(whole.value) == str(exc)
            assert not store.fs.exists(store.path(TMP_DIR, stage_dir, "queries"))
            assert not store.fs.exists(store.path(TMP_DIR, stage_dir, shards.INDEX))
            return exc, path

    def rows(ids, users=None):
        n = len(ids)
        return pa.table({"query_id": ids, "task": ["ctr"] * n, "user_id": users or [0] * n, "item_id": [1] * n})

    # Sorted ids repeated in two row groups far apart (each part's ids are unique): its range overlaps.
    err, path = cut("dup_far", rows([1, 2, 3, 4, 5, 6, 7, 8, 2]))
    assert str(err) == f"query file {path}: query_id 2 is not unique (rows [1, 8])"
    # Unsorted ids, two repeated ids: the smallest one is named, with its first three rows.
    err, path = cut("dup_two", rows([9, 7, 8, 4, 9, 6, 7, 1, 7, 3, 9, 7]))
    assert str(err) == f"query file {path}: query_id 7 is not unique (rows [1, 6, 8])"
    # A null in a later row group: its row in the whole file.
    err, path = cut("null_user", rows(list(range(8)), users=[0, 1, 2, 3, 4, 5, None, 7]))
    assert str(err) == f"query file {path}: row 6 has a null 'user_id'"
    # Shuffled but unique ids (overlapping ranges): the hash-partitioned check finds nothing.
    ids = np.random.default_rng(0).permutation(30).tolist()
    ok, _ = cut("shuffled", rows(ids), row_group_size=4)
    assert ok.n == 30 and ok.rows == [3, 1] * 7 + [2]
    assert pq.read_table(ok.folder, filesystem=store.arrow_fs).column("query_id").to_pylist() == ids


def test_committed_output_is_one_file_per_shard_and_holds_the_input(tiny_run):
    cfg, store = tiny_run
    s = store.read_json("score", "summary.json")
    for name in ("predictions", "queries"):
        files = sorted(store.fs.ls(store.path("score", name), detail=False))
        assert [f.rsplit("/", 1)[1] for f in files] == [f"shard-{i:05d}.parquet" for i in range(s["shards"])]
    # The committed queries are the job's input (the table score_queries builds in one process), in order.
    assert store.read_table("score", "queries").equals(score.score_queries(cfg, store))
    preds = store.read_table("score", "predictions")
    assert preds.schema.equals(PREDICTIONS) and store.manifest("score").rows["predictions"] == preds.num_rows
    # The summary, counted per shard in the check's tasks, is the one of the whole output at once.
    rejected = store.read_table("score", "rejected")
    whole = summarize(preds, rejected, s["queries"], s["shards"], 0, 1.0, s["mode"], {})
    keys = ("predictions", "rejected", "routes", "vlm_calls", "vlm_skipped", "bypass_rate", "cold_users")
    assert {k: s[k] for k in keys} == {k: whole[k] for k in keys}
    pairs = list(zip(preds.column("task").to_pylist(), preds.column("route").to_pylist()))
    tiers = ("low", "medium", "high")
    assert whole["routes"] == {t: {r: pairs.count((t, r)) for r in tiers} for t in dict.fromkeys(t for t, _ in pairs)}


def test_commit_rewrites_a_shard_written_under_an_older_schema(tiny_run, tmp_path):
    from reasonrec.io import ArtifactStore

    full = tiny_run[1].read_table("score", "predictions").slice(0, 5)
    store = ArtifactStore(str(tmp_path / "runs"), "commit")
    folder = store.path(TMP_DIR, "staged")
    old = full.drop_columns(["conf_verbal", "conf_token"])  # a shard from before those columns
    shards.write_shard_file(store.fs, store.arrow_fs, folder, 0, full)
    shards.write_shard_file(store.fs, store.arrow_fs, folder, 1, old)
    with store.stage_writer("commit_check", "h", {}) as w:
        assert shards.commit_shards(store, w, "predictions", folder, [0, 1], PREDICTIONS) == 10
    got = store.read_table("commit_check", "predictions")
    assert got.schema.equals(PREDICTIONS) and got.num_rows == 10
    assert got.slice(0, 5).equals(full) and got.slice(5).column("conf_token").null_count == 5
    assert store.manifest("commit_check").rows["predictions"] == 10


def test_a_query_answered_twice_is_refused_before_commit(tiny_run, monkeypatch):
    """The exactly-once check compares query ids alone: a staged shard that repeats another
    shard's query (and so lacks one of its own) stops the commit."""
    cfg, store = tiny_run
    c = _config(cfg, "score.mode=tools", "score.tasks=[sequential,direct,ctr]", "score.stage_name=score_twice")

    score_until_commit(c, monkeypatch)  # every shard written, then the job dies before it commits
    staged = store.path(TMP_DIR, score.staging_name(c, store), "predictions")
    first, second = (pq.read_table(f"{staged}/shard-0000{s}.parquet", filesystem=store.arrow_fs) for s in (0, 1))
    other = second.column("query_id")[0]
    ids = pc.if_else(pc.equal(pa.array(range(first.num_rows)), 0), other, first.column("query_id"))
    first = first.set_column(first.schema.get_field_index("query_id"), "query_id", ids)
    pq.write_table(first, f"{staged}/shard-00000.parquet", filesystem=store.arrow_fs)
    with pytest.raises(RuntimeError, match="refusing to commit"):
        score.run(c)
    assert store.manifest("score_twice") is None


def test_router_pool_size_auto_grows_with_the_shards_as_the_cpus_allow():
    from ray_jobs.score import AUTO_SHARDS_PER_ROUTER, router_actors

    assert AUTO_SHARDS_PER_ROUTER == 100
    assert router_actors(3, 5, 2, 1.0) == 3  # set by the user: kept
    assert [router_actors(0, n, 2, 1.0) for n in (1, 51, 100, 101, 157, 10_000)] == [1, 1, 1, 2, 2, 2]
    assert router_actors(0, 1_000, 64, 1.0) == 10 and router_actors(0, 1_000, 64, 8.0) == 8
    assert router_actors(0, 157, 2, 1.0, reserved_cpus=1.0) == 1  # a VLM pool beside the routers
    assert router_actors(0, 157, 2, 1.0, reserved_cpus=2.0) == 1  # never below one
    assert router_actors(0, 500, 2, 0.5) == 4  # fractional actors: more fit
    with pytest.raises(ConfigError, match="score.tool_actors"):
        load_config(CONFIG_DIR / "quickstart.yaml", ["score.tool_actors=-1"])
