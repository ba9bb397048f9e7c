"""Direct (BPR-MF, BPR-MLP, LightGCN) and CTR (DLRM, DCNv2, xDeepFM, xgboost) tools on small data
with real structure: every user has a taste cluster and most positives come from it."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch

from reasonrec.metrics import auc, rank_in_candidates, ranking_metrics
from reasonrec.tools import ToolData, ToolInputError, tool_class
from reasonrec.tools.bpr_common import validation_candidates
from reasonrec.tools.persist import load_tool, save_tool

DIRECT = ("bpr_mf", "bpr_mlp", "lightgcn")
CTR = ("dlrm", "dcnv2", "xdeepfm", "xgb_ctr")
# small and fast: the data is easy, a few epochs separate the tools from popularity
PARAMS = {
    "bpr_mf": {"max_epochs": 15, "batch_size": 256, "lr": 5e-3},
    "bpr_mlp": {"max_epochs": 12, "batch_size": 256, "lr": 5e-3, "hidden": [64], "dim": 32},
    "lightgcn": {"max_epochs": 15, "batch_size": 256, "lr": 5e-3, "n_layers": 2},
    "dlrm": {"max_epochs": 10, "batch_size": 256, "lr": 3e-3},
    "dcnv2": {"max_epochs": 10, "batch_size": 256, "lr": 3e-3, "dcn_layers": 2, "dcn_rank": 8},
    "xdeepfm": {"max_epochs": 8, "batch_size": 256, "lr": 3e-3, "cin_layers": [16], "dnn": [32]},
    "xgb_ctr": {"num_boost_round": 150, "max_depth": 2, "min_child_weight": 5},
}


def make_data(n_users=150, n_items=60, n_clusters=4, seed=0, ctr_neg=4):
    """Users of 4 taste clusters, 8-12 distinct items each (90% from their cluster, skewed
    popularity inside it); leave-one-out targets; CTR rows split 8:1:1 per user with 1:4
    never-interacted negatives; category = cluster for 70% of items. The last user has no
    training interactions at all (the empty-history case)."""
    rng = np.random.default_rng(seed)
    cluster_items = np.array_split(rng.permutation(n_items), n_clusters)
    user_cluster = rng.integers(0, n_clusters, n_users)
    seqs = []
    for u in range(n_users):
        items = cluster_items[user_cluster[u]]
        w = 1.0 / np.arange(1, len(items) + 1) ** 0.7
        n = int(rng.integers(8, 13))
        n_in = int(round(n * 0.9))
        own = rng.choice(items, size=n_in, replace=False, p=w / w.sum())
        other = rng.choice(np.setdiff1d(np.arange(n_items), items), size=n - n_in, replace=False)
        seqs.append(rng.permutation(np.concatenate([own, other])).astype(np.int64))
    train = [s[:-2] for s in seqs]
    valid = np.array([s[-2] for s in seqs], np.int64)
    test = np.array([s[-1] for s in seqs], np.int64)
    train[-1] = np.zeros(0, np.int64)
    valid[-1] = test[-1] = -1
    cat = np.empty(n_items, np.int64)
    for c, items in enumerate(cluster_items):
        cat[items] = c
    noisy = rng.random(n_items) < 0.3
    cat[noisy] = rng.integers(0, n_clusters, int(noisy.sum()))
    data = ToolData(
        n_users=n_users,
        n_items=n_items,
        train_seqs=train,
        valid_item=valid,
        test_item=test,
        item_category=cat,
        item_brand=rng.integers(0, 6, n_items),
    )
    rows = {k: ([], [], []) for k in ("train", "valid", "test")}
    for u, s in enumerate(seqs[:-1]):
        pos = rng.permutation(np.unique(s))
        n_v = max(1, round(0.1 * len(pos)))
        parts = {"valid": pos[:n_v], "test": pos[n_v : 2 * n_v], "train": pos[2 * n_v :]}
        pool = np.setdiff1d(np.arange(n_items), s)
        for split, p in parts.items():
            negs = rng.choice(pool, size=len(p) * ctr_neg, replace=True)
            rows[split][0].append(np.full(len(p) + len(negs), u))
            rows[split][1].append(np.concatenate([p, negs]))
            rows[split][2].append(np.concatenate([np.ones(len(p)), np.zeros(len(negs))]))
    data.ctr = {
        k: (
            np.concatenate(v[0]).astype(np.int64),
            np.concatenate(v[1]).astype(np.int64),
            np.concatenate(v[2]).astype(np.float32),
        )
        for k, v in rows.items()
    }
    # CTR tools see the CTR-train positives as histories (no valid/test positive in them)
    ctr_data = ToolData(
        n_users=n_users,
        n_items=n_items,
        valid_item=valid,
        test_item=test,
        item_category=data.item_category,
        item_brand=data.item_brand,
        ctr=data.ctr,
        train_seqs=[np.zeros(0, np.int64)] * n_users,
    )
    tu, ti, ty = data.ctr["train"]
    ctr_data.train_seqs = [ti[(tu == u) & (ty == 1)] for u in range(n_users)]
    return data, ctr_data, seqs


def candidates_for_test(data: ToolData, seqs, n_neg=30, seed=5):
    rng = np.random.default_rng(seed)
    users = np.array([u for u in range(data.n_users) if data.test_item[u] >= 0])
    cands = np.stack(
        [
            rng.permutation(
                np.concatenate(
                    [
                        [data.test_item[u]],
                        rng.choice(np.setdiff1d(np.arange(data.n_items), seqs[u]), n_neg, replace=False),
                    ]
                )
            )
            for u in users
        ]
    )
    return users, cands, data.test_item[users]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # 2 shared cores: intra-op threads only add contention for these tiny models
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world():
    data, ctr_data, seqs = make_data()
    return data, ctr_data, seqs


@pytest.fixture(scope="module")
def trained(world):
    data, ctr_data, _ = world
    tools, metrics, reports = {}, {}, {}
    for name in DIRECT + CTR:
        tool = tool_class(name)(PARAMS[name])
        reports[name] = []
        metrics[name] = tool.fit(
            ctr_data if name in CTR else data, reporter=lambda e, m, n=name: reports[n].append((e, m))
        )
        tools[name] = tool
    return tools, metrics, reports


def test_registry_and_tasks():
    for name in DIRECT:
        assert set(tool_class(name).tasks) == {"direct", "sequential", "ctr"}
    for name in CTR:
        assert tool_class(name).tasks == ("ctr",)


@pytest.mark.parametrize("name", DIRECT)
def test_direct_tool_beats_popularity(name, world, trained):
    data, _, seqs = world
    tool = trained[0][name]
    users, cands, pos = candidates_for_test(data, seqs)
    hist = [data.train_seqs[u] for u in users]
    pop = ranking_metrics(rank_in_candidates(data.item_popularity[cands], cands, pos), (5,))
    got = ranking_metrics(rank_in_candidates(tool.score_candidates(users, hist, cands), cands, pos), (5,))
    assert got["hr@5"] > pop["hr@5"] + 0.2, (got, pop)
    assert trained[1][name]["ndcg@5"] > 0.2  # validation metric returned by fit
    # ... on the sampled protocol (1 positive + never-seen negatives), which the metrics name
    assert trained[1][name]["ranked_among"] == validation_candidates(data)[1].shape[1] < data.n_items
    epochs = [e for e, _ in trained[2][name]]
    assert epochs == list(range(len(epochs))) and len(epochs) >= 1  # reporter(epoch, metrics) per epoch
    # full-catalog path and CTR-by-sigmoid path
    items, scores = tool.recommend(users[:5], hist[:5], k=5)
    assert items.shape == (5, 5) and not np.isin(items[0], hist[0]).any()
    p = tool.predict_ctr(users[:5], pos[:5], hist[:5])
    assert p.shape == (5,) and ((p > 0) & (p < 1)).all()


@pytest.mark.parametrize("name", CTR)
def test_ctr_tool_beats_popularity(name, world, trained):
    _, ctr_data, _ = world
    tool = trained[0][name]
    u, i, y = ctr_data.ctr["test"]
    p = tool.predict_ctr(u, i, [ctr_data.train_seqs[x] for x in u])
    assert p.shape == y.shape and np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    pop_auc = auc(y, ctr_data.item_popularity[i])
    assert auc(y, p) > max(pop_auc + 0.15, 0.8), (auc(y, p), pop_auc)
    assert trained[1][name]["auc"] > 0.8


@pytest.mark.parametrize("name", DIRECT + CTR)
def test_save_load_round_trip(name, world, trained, tmp_path):
    data, ctr_data, _ = world
    tool = trained[0][name]
    save_tool(tool, str(tmp_path / name))
    assert sorted(os.listdir(tmp_path / name)) == ["config.json", "weights.safetensors"]
    json.loads((tmp_path / name / "config.json").read_text())
    loaded = load_tool(str(tmp_path / name))
    assert type(loaded) is type(tool)
    if name in DIRECT:
        users = np.arange(20)
        hist = [data.train_seqs[u] for u in users]
        np.testing.assert_array_equal(loaded.score_items(users, hist), tool.score_items(users, hist))
    else:
        u, i, _ = ctr_data.ctr["test"]
        hist = [ctr_data.train_seqs[x] for x in u]
        np.testing.assert_array_equal(loaded.predict_ctr(u, i, hist), tool.predict_ctr(u, i, hist))


@pytest.mark.parametrize("name", DIRECT)
def test_direct_bad_input_and_fallbacks(name, world, trained):
    data, _, _ = world
    tool = trained[0][name]
    hist = [data.train_seqs[0]]
    with pytest.raises(ToolInputError, match="unknown item id 60"):
        tool.score_candidates(np.array([0]), hist, np.array([[1, 2, 60]]))
    with pytest.raises(ToolInputError, match="unknown item id -3"):
        tool.score_items(np.array([0]), [np.array([1, -3])])
    with pytest.raises(ToolInputError, match="duplicate"):
        tool.score_candidates(np.array([0]), hist, np.array([[1, 2, 2]]))
    # unknown users and the user without training data get popularity scores
    pop = np.log1p(data.item_popularity).astype(np.float32)
    empty_user = data.n_users - 1
    s = tool.score_items(np.array([-1, data.n_users + 5, empty_user]), [np.zeros(0, np.int64)] * 3)
    for row in s:
        np.testing.assert_allclose(row, pop)


@pytest.mark.parametrize("name", CTR)
def test_ctr_bad_input_and_fallbacks(name, world, trained):
    _, ctr_data, _ = world
    tool = trained[0][name]
    with pytest.raises(ToolInputError, match="unknown item id 60"):
        tool.predict_ctr(np.array([0, 1]), np.array([3, 60]), [np.zeros(0, np.int64)] * 2)
    with pytest.raises(ToolInputError, match="unknown item id 99"):
        tool.predict_ctr(np.array([0]), np.array([3]), [np.array([1, 99])])
    with pytest.raises(ToolInputError):
        tool.predict_ctr(np.array([0, 1]), np.array([3, 4]), [np.zeros(0, np.int64)])
    # unknown users (any out-of-range id) share the cold-user path; empty histories are fine
    p = tool.predict_ctr(np.array([-1, 10_000, -1]), np.array([3, 3, 5]), [np.zeros(0, np.int64)] * 3)
    assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    assert p[0] == pytest.approx(p[1], abs=1e-6)


def test_resume_continues_epoch_count(world):
    data, _, _ = world
    tool = tool_class("bpr_mf")({"max_epochs": 4, "batch_size": 256, "lr": 5e-3, "patience": 100})
    seen = []
    tool.fit(data, reporter=lambda e, m: seen.append(e))
    first = tool.score_items(np.arange(3), [data.train_seqs[u] for u in range(3)])
    tool.params["max_epochs"] = 6
    tool.fit(data, reporter=lambda e, m: seen.append(e), start_epoch=4)
    assert seen == [0, 1, 2, 3, 4, 5]
    assert tool.train_info["epochs_run"] == 2
    assert tool.score_items(np.arange(3), [data.train_seqs[u] for u in range(3)]).shape == first.shape


# ------------------------------------------------------------------ TorchRec model parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dmp_worker(rank: int, world_size: int, port: int, name: str, out_dir: str) -> None:
    import torch.distributed as dist

    from reasonrec.tools.ctr_torch import dmp_logits, shard_model

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        _, ctr_data, _ = make_data(n_users=80)
        tool = tool_class(name)({"max_epochs": 2, "batch_size": 128, "lr": 3e-3})
        reports = []

        def reporter(epoch, m):
            reports.append(m)
            if rank == 0:  # mid-fit checkpoint from one rank only, as Ray Train's report does
                save_tool(tool, os.path.join(out_dir, f"ckpt{epoch}"))

        metrics = tool.fit(ctr_data, reporter=reporter)
        u, i, y = ctr_data.ctr["test"]
        hist = [ctr_data.train_seqs[x] for x in u]
        p = tool.predict_ctr(u, i, hist)  # local, unsharded model gathered after training
        # the gathered weights, sharded again, give the same logits as the plain model
        dense, ids = tool.feat.dense(u, i, hist), tool.feat.sparse(u, i)
        hm = tool.feat.history_matrix(i, hist, int(tool.p("history_len")))
        again = tool.build_module()
        again.load_state_dict(tool.model.state_dict())
        sharded = dmp_logits(shard_model(again, 0.05), dense, ids, hm)
        with torch.no_grad():
            plain = tool.model.logits(torch.from_numpy(dense), torch.from_numpy(ids), torch.from_numpy(hm)).numpy()
        np.save(os.path.join(out_dir, f"p{rank}.npy"), p)
        with open(os.path.join(out_dir, f"r{rank}.json"), "w") as f:
            json.dump(
                {
                    "losses": [m["loss"] for m in reports],
                    "metrics": metrics,
                    "world": tool.train_info["world"],
                    "sharded_vs_plain": float(np.abs(sharded - plain).max()),
                    "n": int(len(y)),
                },
                f,
            )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["dlrm"])
def test_torchrec_model_parallel_two_processes(name, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dmp_worker, args=(2, _free_port(), name, str(tmp_path)), nprocs=2, join=True)
    r = [json.loads((tmp_path / f"r{k}.json").read_text()) for k in range(2)]
    p = [np.load(tmp_path / f"p{k}.npy") for k in range(2)]
    for res in r:
        assert res["world"] == 2
        assert len(res["losses"]) == 2 and all(np.isfinite(res["losses"]))
        assert 0.0 <= res["metrics"]["auc"] <= 1.0
        assert res["sharded_vs_plain"] < 1e-4
    assert r[0]["losses"] == r[1]["losses"]  # loss is all-reduced: every rank reports the same
    assert p[0].shape == (r[0]["n"],) and ((p[0] > 0) & (p[0] < 1)).all()
    np.testing.assert_array_equal(p[0], p[1])  # every rank ends with the same full weights
    mid = load_tool(str(tmp_path / "ckpt1"))  # saved from the reporter while the model was sharded
    assert mid.model is not None and mid.feat is not None


# ------------------------------------------------------------------------------- features


def test_ctr_features_by_hand_leave_self_out_and_out_of_fold():
    from reasonrec.tools.ctr_features import DENSE_FEATURES, CTRFeaturizer

    train = [np.array([0, 1, 2]), np.array([1, 2]), np.array([2, 3]), np.array([0, 2, 3])]
    users = np.concatenate([np.full(len(s), u) for u, s in enumerate(train)])
    items = np.concatenate(train)
    cat = np.array([0, 0, 1, 1, 0])
    f = CTRFeaturizer(4, 5, cat, None, users, items, DENSE_FEATURES, n_folds=2)
    col = {n: k for k, n in enumerate(DENSE_FEATURES)}
    # user 1 (history [1, 2]) and item 3: pop 2; C[3,1] = 0, C[3,2] = 2 (users 2 and 3);
    # cos = 2 / sqrt(2 * 4); category 1 shared with item 2 -> 1/2; no brand data -> 0
    x = f.dense_raw(np.array([1]), np.array([3]), [train[1]])[0]
    assert x[col["log_hist_len"]] == pytest.approx(np.log1p(2))
    assert x[col["log_item_pop"]] == pytest.approx(np.log1p(2))
    assert x[col["log_cooc_sum"]] == pytest.approx(np.log1p(2)) and x[col["log_cooc_max"]] == pytest.approx(np.log1p(2))
    assert x[col["cos_sum"]] == pytest.approx(2 / np.sqrt(8), rel=1e-6)
    assert x[col["cat_affinity"]] == pytest.approx(0.5) and x[col["brand_affinity"]] == 0.0
    # inference on a training pair looks exactly like a featurizer that never saw that pair
    keep = ~((users == 0) & (items == 2))
    g = CTRFeaturizer(4, 5, cat, None, users[keep], items[keep], DENSE_FEATURES, n_folds=2)
    np.testing.assert_allclose(
        f.dense_raw(np.array([0]), np.array([2]), [train[0]]),
        g.dense_raw(np.array([0]), np.array([2]), [train[0]]),
        rtol=1e-6,
    )
    # out-of-fold (training rows): counts from the other fold only, x K/(K-1) = x2 here
    fold = f.fold_of(np.array([0]), np.array([2]))[0]
    other = f.fold_of(users, items) != fold
    pop2_other = float(((items == 2) & other).sum())
    x = f.dense_raw(np.array([0]), np.array([2]), [train[0]], oof=True)[0]
    assert x[col["log_item_pop"]] == pytest.approx(np.log1p(2 * pop2_other))


def test_lightgcn_inference_cache_follows_the_weights(trained):
    """LightGCN keeps its propagated embeddings between inference calls; an in-place weight update
    (an optimizer step, load_state_dict) must invalidate them, and with autograd on nothing is kept."""
    import copy

    m = copy.deepcopy(trained[0]["lightgcn"].model)
    u = torch.arange(5)

    def fresh():
        allx = m.propagate()
        return allx[u] @ allx[m.n_users :].T

    with torch.no_grad():
        first = m.user_scores(u)
        assert torch.equal(first, fresh()) and m._prop is not None
        m.emb.weight.mul_(1.5)  # in place, as an optimizer step
        after = m.user_scores(u)
        assert not torch.equal(after, first) and torch.equal(after, fresh())
    assert m.user_scores(u).requires_grad  # training path: recomputed with autograd


def test_two_tower_item_vectors_follow_the_weights(trained):
    """BPR-MLP keeps the item tower's output for every item between inference calls (not the
    tower over the catalog per call); an in-place update of any item-side weight invalidates it,
    and in training (autograd on, or train mode with its dropout) nothing is kept."""
    import copy

    m = copy.deepcopy(trained[0]["bpr_mlp"].model).eval()
    u = torch.arange(5)

    def fresh():
        return m.user_tower(m.user(u)) @ m.item_tower(m.item.weight).T

    with torch.no_grad():
        first = m.user_scores(u)
        assert torch.equal(first, fresh()) and m.__dict__["_items"] is not None
        assert m.item_vectors() is m.item_vectors()  # kept
        for p in (m.item.weight, next(m.item_tower.parameters())):
            p.mul_(1.5)  # in place, as an optimizer step
            after = m.user_scores(u)
            assert not torch.equal(after, first) and torch.equal(after, fresh())
            first = after
    assert m.user_scores(u).requires_grad  # training path: recomputed with autograd
    assert not any("_items" in k for k in m.state_dict())
