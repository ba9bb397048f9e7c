"""The prepare job end to end on a real local Ray: synthetic world (local root) and a corrupt
multi-source input (RecBole fixture + synthetic, k-core) written to S3 (moto on 127.0.0.1)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ray_jobs import keyed
from ray_jobs import prepare as job
from reasonrec.config import CONFIG_DIR, load_config
from reasonrec.data import prepare as P
from reasonrec.io import open_store

TINY = [
    "data.sources.0.synthetic.n_users=150",
    "data.sources.0.synthetic.n_items=60",
    "ray.shuffle_partitions=2",
    "data.direct_negatives=20",
]


@pytest.fixture(scope="module")
def synthetic_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", TINY + [f"output_root={root}"])
    summary = job.run(cfg)
    return cfg, summary, open_store(cfg)


def _tables(store, *names):
    return [store.read_table("prepare", n) for n in names]


def test_summary_and_row_accounting(synthetic_run):
    cfg, s, store = synthetic_run
    assert s["input_rows"]["interactions"] == s["rows"]["interactions"] + sum(
        v for k, v in s["quarantine_by_reason"].items()
    )
    assert s["n_users"] == 150 and s["rows"]["users"] == 150
    assert sum(s["users_per_bucket"].values()) == 150
    assert set(s["bucket_shares_by_normalizer"]) == {"max", "quantile", "rank", "log"}
    text = job.format_summary(s)
    assert "users per EH bucket (max)" in text and "quarantined rows by reason: none" in text
    m = store.manifest("prepare")
    assert m.rows["interactions"] == s["rows"]["interactions"] and m.inputs


def test_leave_one_out_is_the_time_ordered_sequence(synthetic_run):
    _, _, store = synthetic_run
    inter, loo = _tables(store, "interactions", "loo")
    seqs = {}
    for r in inter.sort_by([("user_id", "ascending"), ("ts", "ascending")]).to_pylist():
        seqs.setdefault(r["user_id"], []).append(r["item_id"])
    for r in loo.to_pylist():
        full = seqs[r["user_id"]]
        if len(full) >= 3:
            assert r["train_items"] + [r["valid_item"], r["test_item"]] == full
            assert r["train_ts"] == sorted(r["train_ts"])
        else:
            assert r["train_items"] == full and r["valid_item"] is None and r["test_item"] is None


def test_evidence_horizon_matches_the_paper_formula(synthetic_run):
    _, s, store = synthetic_run
    (users,) = _tables(store, "users")
    n = users.column("n_train").to_numpy()
    eh = users.column("evidence_horizon").to_numpy()
    np.testing.assert_allclose(eh, 1 - n / n.max(), atol=1e-6)
    b = users.column("eh_bucket").to_numpy(zero_copy_only=False)
    assert set(b[eh < 0.3]) <= {"low"} and set(b[eh > 0.7]) <= {"high"}
    assert s["eh_max_count"] == n.max()


def test_negatives_are_never_positives(synthetic_run):
    _, _, store = synthetic_run
    inter, direct, ctr = _tables(store, "interactions", "direct_candidates", "ctr")
    pos = {}
    for r in inter.to_pylist():
        pos.setdefault(r["user_id"], set()).add(r["item_id"])
    assert direct.num_rows > 0
    for r in direct.to_pylist():
        cands = r["candidates"]
        assert len(cands) == 21 and len(set(cands)) == 21 and r["positive"] in cands
        assert not (set(cands) - {r["positive"]}) & pos[r["user_id"]]
    n_items = store.read_table("prepare", "items").num_rows
    negs = {}
    for r in ctr.filter(pc.equal(ctr.column("label"), 0)).to_pylist():
        assert r["item_id"] not in pos[r["user_id"]]
        negs.setdefault(r["user_id"], set()).add(r["item_id"])
    for u, p in pos.items():  # 1:4, or every remaining item when the catalog is too small
        assert len(negs.get(u, ())) == min(4 * len(p), n_items - len(p))


def test_ctr_test_positives_are_never_in_a_leave_one_out_history(synthetic_run):
    _, _, store = synthetic_run
    ctr, loo = _tables(store, "ctr", "loo")
    hist = {r["user_id"]: set(r["train_items"]) for r in loo.to_pylist()}
    valid = {r["user_id"]: r["valid_item"] for r in loo.to_pylist()}
    test = {r["user_id"]: r["test_item"] for r in loo.to_pylist()}
    pos = ctr.filter(pc.equal(ctr.column("label"), 1)).to_pylist()
    tests = [r for r in pos if r["split"] == "test"]
    assert len(tests) >= 20  # not vacuous (the fixture world has ~40 users with a new test item)
    for r in tests:  # the leave-one-out test item, held by neither the training nor the test history
        u = r["user_id"]
        assert r["item_id"] == test[u] and r["item_id"] not in hist[u] and r["item_id"] != valid[u]
    for r in pos:
        if r["split"] == "valid":
            assert r["item_id"] == valid[r["user_id"]] and r["item_id"] not in hist[r["user_id"]]
    # every user whose test item is new to them has exactly that test positive
    fresh = {u for u in test if test[u] is not None and test[u] not in hist[u] and test[u] != valid[u]}
    assert {r["user_id"] for r in tests} == fresh


def test_explanation_and_timeshift_splits(synthetic_run):
    _, s, store = synthetic_run
    expl, ts = _tables(store, "explanation", "timeshift")
    assert expl.num_rows == s["rows"]["interactions"]  # every synthetic interaction has a review
    assert set(expl.column("split").to_pylist()) == {"train", "valid", "test"}
    cut = s["timeshift_cutoff"]
    t = ts.to_pydict()
    assert all((x < cut) == (sp == "train") for x, sp in zip(t["ts"], t["split"]))
    assert abs(np.mean(np.asarray(t["ts"]) < cut) - 0.9) < 0.03  # the 0.9 quantile of time


def test_items_have_dense_ids_and_images(synthetic_run):
    _, _, store = synthetic_run
    (items,) = _tables(store, "items")
    assert sorted(items.column("item_id").to_pylist()) == list(range(items.num_rows))
    assert items.column("image").null_count == 0


def test_ids_are_dense_sorted_and_consistent_between_tables(synthetic_run):
    _, s, store = synthetic_run
    users, items, inter, loo, direct, ctr = _tables(
        store, "users", "items", "interactions", "loo", "direct_candidates", "ctr"
    )
    # ids are the ranks of the sorted source keys (items: domain + separator + key)
    by_uid = dict(zip(users.column("user_id").to_pylist(), users.column("user_key").to_pylist()))
    assert sorted(by_uid) == list(range(s["n_users"])) and [by_uid[i] for i in range(len(by_uid))] == sorted(
        by_uid.values()
    )
    ikeys = P.item_lookup_key(items.column("domain"), items.column("item_key")).to_pylist()
    by_iid = dict(zip(items.column("item_id").to_pylist(), ikeys))
    assert sorted(by_iid) == list(range(s["n_items"])) and [by_iid[i] for i in range(len(by_iid))] == sorted(ikeys)
    for t in (inter, loo, direct, ctr):
        assert set(t.column("user_id").to_pylist()) <= set(by_uid)
    for col in (inter.column("item_id"), ctr.column("item_id"), pc.list_flatten(direct.column("candidates"))):
        assert set(col.to_pylist()) <= set(by_iid)


@pytest.fixture(scope="module")
def synthetic_rerun(ray_local, tmp_path_factory):
    """The same world read and shuffled with other block counts, item ids joined by hash
    partition instead of broadcast."""
    root = tmp_path_factory.mktemp("rerun")
    cfg = load_config(
        CONFIG_DIR / "quickstart.yaml",
        TINY + [f"output_root={root}", "ray.shuffle_partitions=5", "data.sources.0.synthetic.n_user_shards=3"],
    )
    broadcast_max = job.BROADCAST_MAX_KEYS
    job.BROADCAST_MAX_KEYS = 0
    try:
        job.run(cfg)
    finally:
        job.BROADCAST_MAX_KEYS = broadcast_max
    return open_store(cfg)


@pytest.mark.parametrize(
    "table,key",
    [
        ("users", ["user_id"]),
        ("items", ["item_id"]),
        ("loo", ["user_id"]),
        ("direct_candidates", ["user_id", "split"]),
        ("ctr", ["user_id", "label", "item_id"]),
        ("explanation", ["user_id", "item_id"]),
    ],
)
def test_outputs_do_not_depend_on_partitioning(synthetic_run, synthetic_rerun, table, key):
    _, _, store = synthetic_run
    a, b = store.read_table("prepare", table), synthetic_rerun.read_table("prepare", table)
    order = [(k, "ascending") for k in key]
    assert a.num_rows > 0 and a.sort_by(order).equals(b.sort_by(order))


def test_dense_ids_across_block_counts(ray_local):
    rng = np.random.default_rng(3)
    keys = [f"k{i}" for i in rng.integers(0, 500, 4000)] + ["é", "Z", "k 1"]  # repeats, non-ASCII, space
    expected = {k: i for i, k in enumerate(sorted(set(keys)))}
    flags = rng.integers(0, 2, len(keys))
    flag_max = {}
    for k, f in zip(keys, flags):
        flag_max[k] = max(flag_max.get(k, 0), int(f))
    for blocks in (1, 3, 17):
        ds = ray_local.data.from_arrow(pa.table({"key": keys, "flag": flags})).repartition(blocks)
        ids, n = keyed.dense_ids(ray_local, ds, "key", "id", flag="flag")
        rows = ids.take_all()
        assert n == len(expected) == len(rows)
        assert {r["key"]: r["id"] for r in rows} == expected
        assert {r["key"]: r["flag"] for r in rows} == flag_max


def test_exact_quantile_is_numpys_and_does_not_depend_on_blocks(ray_local):
    """The time-shift cut-off: exact (numpy's inverted-CDF quantile), the same for any block count
    and order (Ray's ApproximateQuantile sketch gave a different cut-off per run)."""
    rng = np.random.default_rng(5)
    ts = np.concatenate([1_300_000_000 + rng.integers(0, 10**9, 5000), [1_300_000_000] * 7, [2**40]])
    for q in (0.0, 0.1, 0.5, 0.9, 0.999, 1.0):
        want = int(np.quantile(ts, q, method="inverted_cdf"))
        got = {
            keyed.exact_quantile(
                ray_local.data.from_arrow(pa.table({"ts": rng.permutation(ts)})).repartition(b), "ts", q
            )
            for b in (1, 4, 13)
        }
        assert got == {want}, (q, got, want)
    tiny = ray_local.data.from_arrow(pa.table({"ts": np.array([5, 5, 5, 9], np.int64)}))
    assert [keyed.exact_quantile(tiny, "ts", q) for q in (0.5, 0.75, 0.76, 1.0)] == [5, 5, 9, 9]


@pytest.mark.parametrize("strategy", ["sort_shuffle_pull_based", "shuffle_v2"])
def test_per_key_partitions_hold_every_row_of_a_key_under_either_shuffle_strategy(ray_local, strategy):
    """ray.shuffle_strategy: a sort (the default, tasks) or a hash shuffle (Ray's default, actors)
    puts all rows of a key in one block, which every per-user step of prepare relies on."""
    from ray.data.context import DataContext, ShuffleStrategy

    rng = np.random.default_rng(5)
    keys = rng.integers(0, 300, 3000)

    def per_block(t: pa.Table) -> pa.Table:
        vc = pc.value_counts(t.column("key").combine_chunks())
        return pa.table({"key": vc.field("values"), "rows": vc.field("counts")})

    ctx = DataContext.get_current()
    before = ctx.shuffle_strategy
    ctx.shuffle_strategy = ShuffleStrategy(strategy)
    try:
        ds = ray_local.data.from_arrow(pa.table({"key": keys})).repartition(7)
        rows = keyed.per_key_partition(ds, "key", per_block, partitions=3).take_all()
    finally:
        ctx.shuffle_strategy = before
    got = [r["key"] for r in rows]
    assert len(got) == len(set(got)) == len(set(keys.tolist()))  # each key counted in one block only
    assert {r["key"]: r["rows"] for r in rows} == dict(zip(*np.unique(keys, return_counts=True)))


def test_rerun_is_skipped_and_force_reruns(synthetic_run):
    cfg, _, store = synthetic_run
    before = store.manifest("prepare").created_at
    assert job.run(cfg)["skipped"] is True
    assert store.manifest("prepare").created_at == before


# ---------------------------------------------------------- task tables, one block (no Ray)
def _seqs(n_users: int, n_items: int, seed: int = 0) -> pa.Table:
    """Sequence rows as ``build_sequences`` makes them: long-tailed lengths, repeats, a few heavy
    users, blank and missing reviews, NaN ratings."""
    rng = np.random.default_rng(seed)
    lens = np.minimum(np.maximum(1, rng.geometric(0.2, n_users)), n_items)
    lens[:3] = n_items  # heavy users: the catalog nearly runs out for them
    items = rng.integers(0, n_items, lens.sum())
    off = pa.array(np.r_[0, np.cumsum(lens)].astype(np.int32))
    reviews = rng.choice(np.array(["good", " ", None], dtype=object), lens.sum(), p=[0.7, 0.15, 0.15])
    ratings = rng.random(lens.sum()).astype(np.float32)
    ratings[::5] = np.nan
    return pa.table(
        {
            "user_id": pa.array(np.arange(n_users) * 7 + 11, pa.int64()),
            "items": pa.ListArray.from_arrays(off, pa.array(items)),
            "ts": pa.ListArray.from_arrays(off, pa.array(np.arange(lens.sum()))),
            "ratings": pa.ListArray.from_arrays(off, pa.array(ratings)),
            "reviews": pa.ListArray.from_arrays(off, pa.array(reviews, pa.string())),
        }
    )


def _params(n_items: int, k: int, seed: int = 1) -> P.SplitParams:
    return P.SplitParams(
        n_items=n_items,
        seed=seed,
        direct_negatives=k,
        ctr_negatives=4,
        ctr_split=(0.8, 0.1, 0.1),
        explanation_split=(0.8, 0.1, 0.1),
        eh_thresholds=(0.3, 0.7),
    )


# 60 items: most lists take the dense path (rank the whole complement); 5000: rejection sampling.
@pytest.mark.parametrize("n_items,k", [(60, 20), (5000, 99), (5000, 0)])
def test_vectorised_negatives(n_items, k):
    seqs, p = _seqs(400, n_items), _params(n_items, k)
    hist = {u: set(x) for u, x in zip(seqs.column("user_id").to_pylist(), seqs.column("items").to_pylist())}
    lens = {u: len(x) for u, x in zip(seqs.column("user_id").to_pylist(), seqs.column("items").to_pylist())}
    direct = P.direct_candidates_table(seqs, p)
    expect = [u for u in hist if lens[u] >= 3 and n_items - len(hist[u]) >= k]
    assert direct.column("user_id").to_pylist() == [u for u in expect for _ in (0, 1)]
    assert direct.column("split").to_pylist() == ["valid", "test"] * len(expect)
    for r in direct.to_pylist():
        cands = r["candidates"]
        assert len(cands) == k + 1 and len(set(cands)) == k + 1 and r["positive"] in cands
        assert not (set(cands) - {r["positive"]}) & hist[r["user_id"]]
    items_of = dict(zip(seqs.column("user_id").to_pylist(), seqs.column("items").to_pylist()))
    rand = P.ctr_table(seqs, dataclasses.replace(p, ctr_protocol="random"))
    rsplits = {}
    for r in rand.filter(pc.equal(rand.column("label"), 1)).to_pylist():
        rsplits.setdefault(r["user_id"], []).append(r["split"])
    for u, h in hist.items():  # the random protocol: every user with >= 3 items in every split
        if len(h) >= 3:
            assert set(rsplits[u]) == {"train", "valid", "test"}
    ctr = P.ctr_table(seqs, p)
    rows = {}
    for r in ctr.to_pylist():
        rows.setdefault(r["user_id"], {0: [], 1: []})[r["label"]].append((r["item_id"], r["split"]))
    for u, h in hist.items():
        pos, neg = rows[u][1], rows[u][0]
        assert sorted(i for i, _ in pos) == sorted(h)
        negs = [i for i, _ in neg]
        assert len(negs) == len(set(negs)) == min(4 * len(h), n_items - len(h)) and not set(negs) & h
        splits = [sp for _, sp in pos]
        seq = items_of[u]
        if len(seq) >= 3:  # the loo protocol: test / valid = the last two items, unless already seen
            train, v, t = set(seq[:-2]), seq[-2], seq[-1]
            expect = {i: "train" for i in h}
            if v not in train:
                expect[v] = "valid"
            if t not in train and t != v:
                expect[t] = "test"
            assert dict(pos) == expect
        else:
            assert set(splits) == {"train"}
        if 4 * len(h) <= n_items - len(h):  # uncapped: 4 negatives per positive, in its split
            assert all([sp for _, sp in neg].count(x) == 4 * splits.count(x) for x in set(splits))


@pytest.mark.parametrize("table", ["direct_candidates_table", "ctr_table", "explanation_table"])
def test_task_tables_are_deterministic_and_block_independent(table):
    seqs, p = _seqs(300, 80), _params(80, 20)
    fn = getattr(P, table)
    whole = fn(seqs, p)
    assert whole.equals(fn(seqs, p))
    assert whole.equals(pa.concat_tables([fn(seqs.slice(lo, 37), p) for lo in range(0, seqs.num_rows, 37)]))
    assert not whole.equals(fn(seqs, _params(80, 20, seed=2)))


def test_explanation_rows_and_split_sizes():
    seqs, p = _seqs(300, 80), _params(80, 20)
    expl = P.explanation_table(seqs, p)
    reviews = pc.list_flatten(seqs.column("reviews")).to_pylist()
    assert expl.num_rows == sum(1 for r in reviews if r is not None and r.strip())
    assert expl.column("review").to_pylist() == [r for r in reviews if r is not None and r.strip()]
    ratings = expl.column("rating")
    assert ratings.null_count > 0 and not pc.any(pc.is_nan(ratings)).as_py()
    codes = P.split_labels(0, 3, np.arange(4), np.array([1, 2, 3, 20]), (0.8, 0.1, 0.1))
    assert codes[:3].tolist() == [0, 0, 0]
    assert sorted(codes[3:6].tolist()) == [0, 1, 2]
    assert np.bincount(codes[6:], minlength=3).tolist() == [16, 2, 2]


def _shifted(seqs: pa.Table, item_offset: int, user_offset: int) -> pa.Table:
    """``seqs`` with every item id moved up by ``item_offset`` (another domain's id range)."""
    items = seqs.column("items").combine_chunks()
    moved = pa.ListArray.from_arrays(items.offsets, pc.add(items.flatten(), item_offset))
    seqs = seqs.set_column(seqs.schema.get_field_index("items"), "items", moved)
    return seqs.set_column(0, "user_id", pc.add(seqs.column("user_id"), user_offset))


@pytest.mark.parametrize("n_b,k", [(80, 20), (3000, 99)])  # dense path / rejection sampling
def test_negatives_come_from_the_users_own_domain(n_b, k):
    # Two domains as prepare numbers them: items 0..59 (a), then 60..60+n_b-1 (b).
    n_a = 60
    seqs = pa.concat_tables([_seqs(200, n_a, seed=1), _shifted(_seqs(200, n_b, seed=2), n_a, 10_000)])
    p = dataclasses.replace(_params(n_a + n_b, k), domain_starts=(0, n_a))
    hist = {u: set(x) for u, x in zip(seqs.column("user_id").to_pylist(), seqs.column("items").to_pylist())}
    lens = {u: len(x) for u, x in zip(seqs.column("user_id").to_pylist(), seqs.column("items").to_pylist())}

    def domain(u):
        return range(0, n_a) if u < 10_000 else range(n_a, n_a + n_b)

    direct = P.direct_candidates_table(seqs, p)
    expect = [u for u in hist if lens[u] >= 3 and len(domain(u)) - len(hist[u]) >= k]
    assert direct.column("user_id").to_pylist() == [u for u in expect for _ in (0, 1)]
    for r in direct.to_pylist():
        cands = r["candidates"]
        assert len(set(cands)) == k + 1 and r["positive"] in cands
        assert all(i in domain(r["user_id"]) for i in cands) and not (set(cands) - {r["positive"]}) & hist[r["user_id"]]
    ctr = P.ctr_table(seqs, p).to_pylist()
    negs = {}
    for r in ctr:
        assert r["item_id"] in domain(r["user_id"])
        if not r["label"]:
            negs.setdefault(r["user_id"], []).append(r["item_id"])
    for u, h in hist.items():
        assert len(negs.get(u, [])) == min(4 * len(h), len(domain(u)) - len(h))
    # Without domain ranges (one domain) the draws are the joint catalog's, as before: some
    # negatives of domain a's users are domain b's items.
    joint = P.direct_candidates_table(seqs, _params(n_a + n_b, k)).to_pylist()
    assert any(i >= n_a for r in joint if r["user_id"] < 10_000 for i in r["candidates"])
    one = dataclasses.replace(_params(n_a + n_b, k), domain_starts=(0,))
    assert P.direct_candidates_table(seqs, one).equals(P.direct_candidates_table(seqs, _params(n_a + n_b, k)))


def test_domain_starts_from_numbered_keys():
    def block(pairs):
        return P.domain_id_ranges(
            pa.table({"_ikey": [f"{d}{P.KEY_SEP}{k}" for d, k, _ in pairs], "item_id": [i for *_, i in pairs]})
        )

    blocks = [block([("beauty", "1", 0), ("sports", "1", 3)]), block([("beauty", "2", 1), ("beauty", "3", 2)])]
    blocks.append(block([("sports", "2", 4)]))
    assert P.domain_starts(pa.concat_tables(blocks), 5) == (0, 3)
    assert P.domain_starts(block([("one", "a", 0), ("one", "b", 1)]), 2) == (0,)
    with pytest.raises(ValueError, match="contiguous"):  # interleaved ids
        P.domain_starts(block([("a", "1", 0), ("b", "1", 1), ("a", "2", 2)]), 3)


# ------------------------------------------------------------------ corrupt, multi-source, S3
INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
alice\tsku-1\t5\t100
alice\tsku-2\t4\t200
alice\tsku-2\t4\t200
alice\tsku-3\t3\t300
bob\tsku-1\t5\t100
bob\tsku-3\t2\t150
bob\tsku-2\t1\t170
\tsku-1\t5\t100
carol\tsku-9\tNaN\t100
dave\tsku-1\t5
erin\tsku-4\t5\t-7
"""
ITEM = """item_id:token\ttitle:token_seq\tbrand:token\tprice:float
sku-1\tred lipstick\tAcme\t9.5
sku-2\tblue shampoo\tAcme\t4.0
sku-2\tblue shampoo again\tAcme\t4.0
sku-3\tgreen soap\tSoapCo\t-1
sku-4\tmirror\tGlassCo\t12
"""


@pytest.fixture(scope="module")
def s3_multi_run(ray_local, s3_endpoint, tmp_path_factory):
    import s3fs

    src = tmp_path_factory.mktemp("recbole")
    (src / "mini.inter").write_text(INTER)
    (src / "mini.item").write_text(ITEM)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("multi")
    fs.put(str(src) + "/", "multi/src/", recursive=True)
    overrides = [
        # Two synthetic worlds: both name their users u000000, ... (as two P5 bundles both have a user "1").
        "data.sources=[{kind: recbole, domain: shop, path: 's3://multi/src'}, {kind: synthetic, domain: syn}, "
        "{kind: synthetic, domain: syn2}]",
        "data.sources.1.synthetic.n_users=80",
        "data.sources.1.synthetic.n_items=40",
        "data.sources.2.synthetic.n_users=30",
        "data.sources.2.synthetic.n_items=20",
        "data.sources.2.synthetic.seed=7",
        "ray.shuffle_partitions=2",
        "data.direct_negatives=5",
        "data.kcore=2",
        f"storage.s3_endpoint_url={s3_endpoint}",
        "output_root=s3://multi/runs",
        "run_name=multi",
    ]
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", overrides)
    s = job.run(cfg)
    return cfg, s, open_store(cfg)


def test_corrupt_rows_are_quarantined_with_reasons(s3_multi_run):
    _, s, store = s3_multi_run
    (q,) = _tables(store, "quarantine")
    reasons = s["quarantine_by_reason"]
    assert reasons["missing user key"] == 1
    assert reasons["duplicate interaction"] == 1
    assert reasons["rating not a finite number >= 0"] == 1
    assert reasons["negative timestamp"] == 1
    assert reasons["duplicate item row"] == 1
    assert reasons["negative price"] == 1
    assert any(r.startswith("parse error") for r in reasons)  # dave's short line
    assert any("k-core" in r for r in reasons)
    # Nothing silently dropped: every input row is kept or quarantined.
    assert s["input_rows"]["interactions"] == s["rows"]["interactions"] + sum(
        n for r, n in reasons.items() if r not in ("duplicate item row", "negative price")
    )
    rec = [
        json.loads(x)
        for x, r in zip(q.column("record").to_pylist(), q.column("reason").to_pylist())
        if r == "duplicate interaction"
    ]
    assert rec == [{"user_key": "alice", "item_key": "sku-2", "ts": 200}]


def test_kcore_and_multi_domain_merge(s3_multi_run):
    _, s, store = s3_multi_run
    inter, items, users = _tables(store, "interactions", "items", "users")
    u_counts = np.bincount(inter.column("user_id").to_numpy())
    i_counts = np.bincount(inter.column("item_id").to_numpy(), minlength=items.num_rows)
    assert u_counts[u_counts > 0].min() >= 2
    used = np.unique(inter.column("item_id").to_numpy())
    assert i_counts[used].min() >= 2
    # ids are dense over both domains, keys keep their source spelling, domains are recorded
    assert sorted(items.column("item_id").to_pylist()) == list(range(items.num_rows))
    doms = set(items.column("domain").to_pylist())
    assert doms == {"shop", "syn", "syn2"}
    keys = dict(zip(users.column("user_key").to_pylist(), users.column("domain").to_pylist()))
    assert keys.get("alice") == "shop" and keys.get("bob") == "shop"
    assert store.url("prepare").startswith("s3://")


def test_users_are_keyed_by_domain(s3_multi_run):
    # syn and syn2 both have a user "u000000": two users, each with its own domain's history.
    _, s, store = s3_multi_run
    inter, items, users = _tables(store, "interactions", "items", "users")
    pairs = list(zip(users.column("domain").to_pylist(), users.column("user_key").to_pylist()))
    assert len(set(pairs)) == len(pairs) == s["n_users"]
    assert set(users.column("domain").to_pylist()) == {"shop", "syn", "syn2"}  # no "syn+syn2" user
    shared = {k for d, k in pairs if d == "syn"} & {k for d, k in pairs if d == "syn2"}
    assert shared, "the fixture's two synthetic worlds should share user keys"
    user_dom = dict(zip(users.column("user_id").to_pylist(), users.column("domain").to_pylist()))
    item_dom = dict(zip(items.column("item_id").to_pylist(), items.column("domain").to_pylist()))
    assert all(
        user_dom[u] == item_dom[i]
        for u, i in zip(inter.column("user_id").to_pylist(), inter.column("item_id").to_pylist())
    )
    # direct and CTR negatives come from the user's own domain (SplitParams.domain_starts)
    assert len(s["domain_item_starts"]) == 3
    direct, ctr = _tables(store, "direct_candidates", "ctr")
    for u, cands in zip(direct.column("user_id").to_pylist(), direct.column("candidates").to_pylist()):
        assert {item_dom[i] for i in cands} == {user_dom[u]}
    assert all(
        user_dom[u] == item_dom[i] for u, i in zip(ctr.column("user_id").to_pylist(), ctr.column("item_id").to_pylist())
    )
    # ... and so do the training split's direct lists (the VLM's instruction examples)
    from reasonrec.data.queries import prepared_queries

    tables = dict(zip(("loo", "direct_candidates"), _tables(store, "loo", "direct_candidates")))
    k = 5
    train = prepared_queries(tables, "direct", "train", items.num_rows, k, domain_starts=s["domain_item_starts"])
    assert train.num_rows > 0
    for u, t, cands in zip(*(train.column(c).to_pylist() for c in ("user_id", "target", "candidates"))):
        assert t in cands and len(cands) == k + 1 and {item_dom[i] for i in cands} == {user_dom[u]}
    joint = prepared_queries(tables, "direct", "train", items.num_rows, k)  # without: the joint catalog
    assert any(
        {item_dom[i] for i in c} != {user_dom[u]}
        for u, c in zip(joint["user_id"].to_pylist(), joint["candidates"].to_pylist())
    )
