"""Sequential tools, the shared training loop and tool persistence, on a tiny synthetic dataset
with real sequential structure: items follow a cycle i -> i+1 (mod N) with some noise, so a
sequential model can predict the next item while popularity (near uniform) cannot."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from reasonrec.metrics import rank_full_catalog, ranking_metrics
from reasonrec.tools import ToolData, ToolInputError, tool_class
from reasonrec.tools.ensemble import Ensemble
from reasonrec.tools.persist import load_tool, pack_ragged, save_tool, unpack_ragged
from reasonrec.tools.training import TrainConfig, epoch_batches, train_loop

N_ITEMS, N_USERS = 60, 300
ADJ = [
    "red",
    "blue",
    "green",
    "black",
    "white",
    "golden",
    "silver",
    "pink",
    "purple",
    "orange",
    "yellow",
    "brown",
    "grey",
    "navy",
    "ivory",
]
NOUN = [
    "lipstick",
    "shampoo",
    "perfume",
    "nail polish",
    "sunscreen",
    "mascara",
    "face cream",
    "hair brush",
    "eyeliner",
    "body lotion",
    "soap bar",
    "hair dryer",
    "razor",
    "toothpaste",
    "blush",
]
# Tiny, fast settings so every torch tool trains in a few seconds.
FAST = {
    "hidden": 32,
    "inner": 64,
    "max_len": 12,
    "dropout": 0.1,
    "attn_dropout": 0.1,
    "lr": 5e-3,
    "batch_size": 64,
    "max_epochs": 40,
    "patience": 4,
    "gru_hidden": 64,
}


def make_data(seed: int = 0) -> ToolData:
    rng = np.random.default_rng(seed)
    full = []
    for _ in range(N_USERS):
        seq = [int(rng.integers(N_ITEMS))]
        for _ in range(int(rng.integers(6, 16)) - 1):
            seq.append((seq[-1] + 1) % N_ITEMS if rng.random() < 0.85 else int(rng.integers(N_ITEMS)))
        full.append(np.asarray(seq, dtype=np.int64))
    # Items come in blocks of 4 sharing a description, so text similarity follows the cycle too.
    text = [f"{ADJ[(i // 4) % len(ADJ)]} {NOUN[(i // 4) % len(NOUN)]} number {i}" for i in range(N_ITEMS)]
    return ToolData(
        n_users=N_USERS,
        n_items=N_ITEMS,
        train_seqs=[s[:-2] for s in full],
        valid_item=np.array([s[-2] for s in full]),
        test_item=np.array([s[-1] for s in full]),
        item_text=text,
    )


def hr10(tool, data: ToolData) -> float:
    users = np.arange(data.n_users)
    hist = [np.append(data.train_seqs[u], data.valid_item[u]) for u in users]
    ranks = rank_full_catalog(tool.score_items(users, hist), data.test_item)
    return ranking_metrics(ranks, (10,))["hr@10"]


@pytest.fixture(scope="module")
def data() -> ToolData:
    return make_data()


@pytest.fixture(scope="module")
def trained(data) -> dict:
    torch.set_num_threads(1)  # the test machine is small and shared
    tools = {}
    for name in ("popularity", "sasrec", "lightsans", "gru4rec", "semantic", "transition"):
        tool = tool_class(name)(dict(FAST) if name in ("sasrec", "lightsans", "gru4rec") else {})
        tool.fit(data)
        tools[name] = tool
    tools["ensemble"] = Ensemble(
        {"members": ["sasrec", "gru4rec", "semantic"]}, members={n: tools[n] for n in ("sasrec", "gru4rec", "semantic")}
    )
    return tools


@pytest.mark.parametrize("name", ["sasrec", "lightsans", "gru4rec", "semantic", "ensemble", "transition"])
def test_tool_beats_popularity(trained, data, name):
    pop, hr = hr10(trained["popularity"], data), hr10(trained[name], data)
    assert hr > pop + 0.1, f"{name} HR@10 {hr:.3f} vs popularity {pop:.3f}"


@pytest.mark.parametrize("name", ["sasrec", "lightsans", "gru4rec", "transition"])
def test_a_users_scores_do_not_depend_on_the_batch(trained, data, name):
    """Online (one user) and batch (many users, longer histories padded around it) must answer the
    same: GRU4Rec's state used to move on the padding the batch's longest history added."""
    users = np.arange(12)
    hists = [np.asarray(data.train_seqs[u])[: 2 + u] for u in users]
    together = trained[name].score_items(users, hists)
    for u in users:
        alone = trained[name].score_items(users[u : u + 1], hists[u : u + 1])
        np.testing.assert_allclose(alone[0], together[u], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["sasrec", "lightsans"])
def test_the_traced_forward_is_the_eager_one(trained, name):
    """Inference runs a TorchScript trace of the net (SeqNet.traced): the same logits bit for bit
    for any batch size and length, including lengths and sizes the trace was not built on, and a
    later in-place update of the weights reaches it (it shares the parameters)."""
    import copy
    import pickle

    from reasonrec.tools.sequential import pad_left

    net = copy.deepcopy(trained[name].net).eval()
    rng = np.random.default_rng(3)
    max_len = int(trained[name].hp["max_len"])

    def both(batch: int, longest: int):
        hists = [rng.integers(0, N_ITEMS, int(rng.integers(1, longest + 1))) for _ in range(batch)]
        seqs = torch.from_numpy(pad_left(hists, max_len))
        with torch.inference_mode():
            return net.score_last(seqs), net.last_logits(seqs[:, -max(len(h) for h in hists) :])

    for batch, longest in [(1, 1), (1, max_len), (2, 3), (7, 5), (33, max_len)]:
        traced, eager = both(batch, longest)
        assert torch.equal(traced, eager), (batch, longest)
    assert len(net.__dict__["_traces"]) == 1  # built once, reused for every shape
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    traced, eager = both(4, max_len)
    assert torch.equal(traced, eager)
    assert not any(k.startswith("_") for k in net.state_dict())  # the trace adds no weights
    from torch.utils.flop_counter import FlopCounterMode

    fresh = copy.deepcopy(trained[name].net).eval()  # no trace yet: none may be built under the counter
    seqs = torch.from_numpy(pad_left([np.array([1, 2, 3]), np.array([4, 5])], max_len))
    with FlopCounterMode(display=False) as flops:  # score.count_flops counts the eager ops
        counted = fresh.score_last(seqs)
    assert flops.get_total_flops() > 0 and "_traces" not in fresh.__dict__
    # Under a dispatch mode attention may take another kernel: equal up to float rounding.
    torch.testing.assert_close(counted, fresh.score_last(seqs), rtol=1e-5, atol=1e-5)
    clone = pickle.loads(pickle.dumps(net))  # e.g. a tool sent to a Ray actor: rebuilt on first use
    assert "_traces" not in clone.__dict__
    seqs = torch.from_numpy(pad_left([np.array([1, 2, 3])], max_len))
    assert torch.equal(clone.score_last(seqs), net.score_last(seqs))


def test_validation_ranks_the_whole_catalog(data):
    # full ranking, unlike the BPR tools' sampled lists: metrics.json tells them apart by this
    metrics = tool_class("popularity")().fit(data)
    assert metrics["ranked_among"] == data.n_items and 0 < metrics["hr@10"] < 1


@pytest.mark.parametrize("name", ["sasrec", "lightsans", "gru4rec", "semantic", "ensemble", "popularity", "transition"])
def test_save_load_identical(trained, data, tmp_path, name):
    for n, tool in trained.items():
        if n != "ensemble":
            save_tool(tool, str(tmp_path / n))
    save_tool(trained[name], str(tmp_path / name))
    loaded = load_tool(str(tmp_path / name))  # the ensemble finds its members in sibling folders
    assert type(loaded) is type(trained[name])
    users = np.arange(20)
    hist = [data.train_seqs[u] for u in users[:-1]] + [np.zeros(0, dtype=np.int64)]
    np.testing.assert_array_equal(trained[name].score_items(users, hist), loaded.score_items(users, hist))
    items = np.array([data.valid_item[u] for u in users])
    np.testing.assert_array_equal(trained[name].predict_ctr(users, items, hist), loaded.predict_ctr(users, items, hist))


def test_load_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tool(str(tmp_path / "nothing"))


@pytest.mark.parametrize("name", ["sasrec", "lightsans", "gru4rec", "semantic", "ensemble", "popularity", "transition"])
def test_bad_input(trained, data, name):
    tool = trained[name]
    hist = [data.train_seqs[0], np.zeros(0, dtype=np.int64)]
    users = np.array([0, -1])  # -1: an unknown user
    with pytest.raises(ToolInputError, match="unknown item id 60"):
        tool.score_candidates(users, hist, np.array([[1, 2, 60], [3, 4, 5]]))
    with pytest.raises(ToolInputError, match="duplicate"):
        tool.score_candidates(users, hist, np.array([[1, 2, 2], [3, 4, 5]]))
    with pytest.raises(ToolInputError):
        tool.score_items(users[:1], [np.array([1, -3])])
    scores = tool.score_items(users, hist)
    assert scores.shape == (2, N_ITEMS) and np.isfinite(scores).all()
    # Empty history falls back to popularity: the most popular item is ranked first.
    pop = data.item_popularity
    assert pop[int(np.argmax(scores[1]))] == pop.max()
    cand = tool.score_candidates(users, hist, np.array([[1, 2, 3], [3, 4, 5]]))
    assert cand.shape == (2, 3)
    p = tool.predict_ctr(users, np.array([1, 2]), hist)
    assert p.shape == (2,) and ((p >= 0) & (p <= 1)).all()


def test_transition_counts_learn_the_next_item_chain(trained, data):
    """The world's next item is the last one + 1 with probability 0.85: counting transitions finds
    it for every item seen in training, so HR@10 reaches about that rate (SASRec is below it)."""
    tool = trained["transition"]
    assert tool.alpha in tool.params["alphas"]
    assert hr10(tool, data) >= 0.8
    users = np.arange(3)
    top = tool.score_items(users, [np.array([5]), np.array([7, 59]), np.zeros(0, np.int64)]).argmax(1)
    assert top[0] == 6 and top[1] == 0
    window = tool_class("transition")({"window": 2, "alphas": [1.0]})
    window.fit(data)
    both = window.score_items(users[:1], [np.array([3, 10])])[0]
    assert set(np.argsort(-both)[:2]) == {11, 4}  # the last two items vote, the last one first
    assert both[11] > both[4]


def test_ensemble_averages_rank_normalised(trained, data):
    ens = trained["ensemble"]
    hist = [data.train_seqs[u] for u in range(5)]
    s = ens.score_items(np.arange(5), hist)
    assert s.min() >= 0 and s.max() <= 1
    with pytest.raises(ValueError, match="not given"):
        Ensemble.from_state(*ens.state())


def test_prediction_writer_reuses_member_scores(trained, data):
    """The prediction writer combines the members' already computed scores for the ensemble; the
    rows must equal scoring the ensemble on its own, and only the configured splits are written."""
    import pyarrow as pa

    from reasonrec.tools.predict import ranking_predictions

    users = np.arange(8)
    loo = pa.table(
        {
            "user_id": users,
            "train_items": [data.train_seqs[u].tolist() for u in users],
            "valid_item": data.valid_item[users],
            "test_item": data.test_item[users],
        }
    )
    tools = {n: trained[n] for n in ("sasrec", "gru4rec", "semantic", "ensemble")}
    out = ranking_predictions(tools, loo, k=5, splits=("valid", "test"))
    assert set(out.column("split").to_pylist()) == {"valid", "test"}
    ens = out.filter(pa.compute.equal(out.column("tool"), "ensemble")).to_pylist()
    test_rows = [r for r in ens if r["split"] == "test"]
    alone = trained["ensemble"].score_items(users, [np.append(data.train_seqs[u], data.valid_item[u]) for u in users])
    assert [r["rank"] for r in test_rows] == rank_full_catalog(alone, data.test_item[users]).tolist()
    # Vote ties may order items differently; the top-5 scores must match.
    np.testing.assert_allclose([r["scores"] for r in test_rows], -np.sort(-alone, axis=1)[:, :5], rtol=1e-6)


def test_ragged_roundtrip():
    seqs = [np.array([3, 1]), np.zeros(0, dtype=np.int64), np.array([7])]
    values, offsets = pack_ragged(seqs)
    assert [s.tolist() for s in unpack_ragged(values, offsets)] == [[3, 1], [], [7]]


# ---------------------------------------------------------------------------- training loop


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, x, y):
        return ((self.lin(x)[:, 0] - y) ** 2).mean()


def test_early_stopping_reports_and_keeps_best():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    m = Linear()
    scores = iter([0.1, 0.5, 0.3, 0.2, 0.4, 0.9])  # best at epoch 1, then 3 worse -> stop after 4
    snapshots, reports = {}, []

    def validate():
        snapshots[len(snapshots)] = m.lin.weight.detach().clone()
        return {"ndcg@10": next(scores)}

    res = train_loop(
        m,
        [x, y],
        TrainConfig(max_epochs=20, patience=3, batch_size=16, lr=0.01),
        validate=validate,
        reporter=lambda e, metrics: reports.append((e, metrics)),
    )
    assert res.stopped == "early_stopping" and res.best_epoch == 1 and res.epochs_run == 5
    assert [e for e, _ in reports] == [0, 1, 2, 3, 4]
    assert all({"loss", "ndcg@10", "epoch", "seconds"} <= set(mm) for _, mm in reports)
    assert res.best_metrics["ndcg@10"] == 0.5
    torch.testing.assert_close(m.lin.weight, snapshots[1])  # best weights restored


def test_resume_and_time_budget():
    x, y = torch.randn(32, 3), torch.randn(32)
    m = Linear()
    reports = []
    res = train_loop(
        m,
        [x, y],
        TrainConfig(max_epochs=5, batch_size=8),
        validate=lambda: {"ndcg@10": 0.0},
        reporter=lambda e, _: reports.append(e),
        start_epoch=3,
    )
    # Resuming validates the starting weights first; they stay best since nothing beats them.
    assert reports == [3, 4] and res.best_epoch == 2 and res.last_epoch == 4
    res = train_loop(m, [x, y], TrainConfig(max_epochs=1000, batch_size=8, time_budget_s=0.3))
    assert res.stopped == "time_budget" and res.epochs_run < 1000


def test_epoch_batches_shard_and_bucket():
    lengths = np.random.default_rng(0).integers(1, 50, 103)
    shards = [list(epoch_batches(103, 8, epoch=2, seed=0, rank=r, world=2, lengths=lengths)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])
    rows = np.concatenate([np.concatenate(s) for s in shards])
    assert len(rows) == 102 and len(set(rows.tolist())) == 102  # disjoint, trimmed to a multiple of 2
    spread = np.mean([np.ptp(lengths[b]) for b in shards[0]])
    assert spread < 10  # bucketed: lengths within a batch are close


# --------------------------------------------------------------------- torch.distributed (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = make_data()
        tool = tool_class("sasrec")(dict(FAST, max_epochs=3, patience=10, seed=rank))  # seeds differ on purpose
        reports = []
        tool.fit(data, reporter=lambda e, m: reports.append((e, round(m["loss"], 6), m.get("ndcg@10"))))
        weights = {k: v.numpy() for k, v in tool.net.state_dict().items()}
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), reports=np.array(reports, dtype=np.float64), **weights)
    finally:
        torch.distributed.destroy_process_group()


def test_training_under_torch_distributed(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    # Same reports on both ranks (rank 0 validates and broadcasts), one per epoch.
    np.testing.assert_array_equal(r0["reports"], r1["reports"])
    assert r0["reports"][:, 0].tolist() == [0, 1, 2]
    # DDP keeps the replicas identical even though each rank was seeded differently.
    for k in r0.files:
        if k != "reports":
            np.testing.assert_array_equal(r0[k], r1[k])


def test_hold_out_last_removes_each_users_last_items():
    from reasonrec.tools.data import hold_out_last

    data = ToolData(
        n_users=3,
        n_items=8,
        train_seqs=[np.array([1, 2, 3]), np.array([4]), np.array([5, 6])],
        valid_item=np.array([7, 7, 7]),
        test_item=np.array([0, 0, 0]),
        ctr={"train": (np.array([0]), np.array([1]), np.array([1.0], np.float32))},
    )
    held = hold_out_last(data, 1)
    assert [s.tolist() for s in held.train_seqs] == [[1, 2], [], [5]]
    # The first held-out item is the tools' validation target; nothing is left to test on.
    assert held.valid_item.tolist() == [3, -1, 6] and held.test_item.tolist() == [-1, -1, -1]
    assert held.ctr == {} and held.direct_valid is None
    assert held.item_popularity.tolist() == [0, 1, 1, 0, 0, 1, 0, 0]
    assert [s.tolist() for s in hold_out_last(data, 2).train_seqs] == [[1], [], []]
    assert hold_out_last(data, 2).valid_item.tolist() == [2, -1, -1]  # nothing left to train on: none
    assert [s.tolist() for s in data.train_seqs] == [[1, 2, 3], [4], [5, 6]]  # the input is untouched
    with pytest.raises(ValueError, match="n >= 1"):
        hold_out_last(data, 0)


@pytest.mark.parametrize("name", ["sasrec", "transition"])
def test_ctr_rows_of_one_user_score_the_catalog_once(trained, data, name):
    """A user's CTR rows share a history: ``predict_ctr`` scores the catalog once per distinct
    (user, history) and answers each row as if it had been scored alone."""
    tool = trained[name]
    users = np.repeat(np.arange(6), 5)  # 5 CTR rows per user, as the leave-one-out CTR split has
    hists = [np.asarray(data.train_seqs[u])[: 3 + u] for u in users]
    hists[-1] = hists[-1][:-1]  # the same user with another history is another distinct row
    items = np.arange(len(users)) % data.n_items
    scored: list[int] = []
    real = tool.score_items

    def counting(u, h):
        scored.append(len(h))
        return real(u, h)

    tool.score_items = counting
    try:
        got = tool.predict_ctr(users, items, hists)
    finally:
        del tool.score_items
    assert scored == [7]  # 6 users + the one with a shorter history, in one call
    alone = [tool.predict_ctr(users[i : i + 1], items[i : i + 1], hists[i : i + 1])[0] for i in range(len(users))]
    np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-6)
