"""Tool repository speed on one machine, each part measured in one run (issue: tool benchmarks).

    python -m bench.tools --config configs/beauty.yaml output_root=/tmp/beauty3/runs [--users 4000]

Needs the run's ``prepare`` stage (training part) and ``train_tools`` stage (inference part).

* **training**: every torch tool trains ``--epochs`` epochs on the first ``--users`` users of the
  prepared data (full catalog; dense user ids are in key order, so this is an unbiased subset)
  inside a Ray Train ``TorchTrainer`` for each worker layout in ``--layouts`` (``WxC`` = W
  workers with C CPUs each; ``1x1`` vs ``2x1`` is the 1 -> 2 worker speed-up, ``1x2`` one worker
  using both CPUs through intra-op threads). Rate = training rows per second of the last epoch's
  training phase (validation excluded), as reported by the tools' own loops; rows are users for
  the sequential tools, (user, item) pairs for BPR / LightGCN, CTR rows for the CTR models.
  ``xgb_ctr`` reports rows x boosting rounds per second of its whole ``fit`` (features included).
* **inference**: each trained ranking tool scores ``--batch`` users' test histories against the
  whole catalog and takes the top ``--k`` (``score_items`` + ``argpartition``, the path
  ``train_tools`` predictions and the planner use), against the practical limit on the same
  batch: a bare ``[B, d] @ [d, n_items]`` matrix product plus ``torch.topk`` (d = ``--dim``).
  Best of ``--repeats``, with torch using all CPUs of the process.

Prints Markdown tables and writes ``{run}/bench_tools.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np

from reasonrec.config import load_config
from reasonrec.io import ArtifactStore, open_store
from reasonrec.runtime import init_ray

TRAIN_TOOLS = ["sasrec", "lightsans", "gru4rec", "bpr_mf", "bpr_mlp", "lightgcn", "dlrm", "dcnv2", "xdeepfm", "xgb_ctr"]


def _subset_tool_data(store, n_users: int):
    import pyarrow.compute as pc

    from reasonrec.tools.data import tool_data_from_tables

    def first(table):
        return table.filter(pc.less(table.column("user_id"), n_users))

    items = store.read_table("prepare", "items", columns=["item_id", "item_key", "title", "brand", "categories"])
    return tool_data_from_tables(
        items,
        first(store.read_table("prepare", "loo")),
        first(store.read_table("prepare", "ctr")),
        first(store.read_table("prepare", "direct_candidates")),
    )


def _train_worker(config: dict) -> None:
    """Ray Train loop: each tool trains ``epochs`` epochs; rank 0 writes the rates to ``out``
    (Ray Train v2 keeps reported metrics only with a checkpoint; a local file is simpler)."""
    import ray.train

    from reasonrec.config import StorageConfig
    from reasonrec.tools import tool_class

    store = ArtifactStore(config["output_root"], config["run_name"], StorageConfig(**config["storage"]))
    data = _subset_tool_data(store, config["users"])
    rates = {}
    for name in config["tools"]:
        params = dict(config["params"].get(name) or {})
        if name == "xgb_ctr":
            # all rounds run (no early stop); threads = this worker's CPUs
            params.update(
                num_boost_round=config["xgb_rounds"],
                early_stopping_rounds=config["xgb_rounds"] + 1,
                nthread=config["cpus"],
            )
            t0 = time.time()
            tool_class(name)(params).fit(data)
            rates[name] = len(data.ctr["train"][2]) * config["xgb_rounds"] / (time.time() - t0)
            continue
        params.update(max_epochs=config["epochs"], time_budget_s=0.0, patience=config["epochs"] + 1)
        seen: list[float] = []
        tool_class(name)(params).fit(
            data, reporter=lambda epoch, m, seen=seen: seen.append(m.get("examples_per_s", float("nan")))
        )
        rates[name] = seen[-1]
    if ray.train.get_context().get_world_rank() == 0:
        with open(config["out"], "w") as f:
            json.dump(rates, f)


def bench_training(
    cfg, store, layouts: list[str], tools: list[str], users: int, epochs: int, xgb_rounds: int
) -> dict[str, dict[str, float]]:
    import tempfile

    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    out = {}
    for layout in layouts:
        rates_path = tempfile.mktemp(prefix="bench-tools-", suffix=".json")
        workers, cpus = (int(x) for x in layout.split("x"))
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={
                "output_root": cfg.output_root,
                "run_name": cfg.run_name,
                "storage": {"s3_endpoint_url": cfg.storage.s3_endpoint_url, "s3_anon": cfg.storage.s3_anon},
                "tools": tools,
                "users": users,
                "cpus": cpus,
                "epochs": epochs,
                "xgb_rounds": xgb_rounds,
                "out": rates_path,
                "params": {n: dict(cfg.tools.params.get(n, {})) for n in tools},
            },
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus}),
            run_config=TrainRunConfig(
                name=f"bench-tools-{layout}-{int(time.time())}", storage_path="/tmp/reasonrec-bench-tools"
            ),
        )
        t0 = time.time()
        trainer.fit()
        with open(rates_path) as f:
            out[layout] = json.load(f)
        logging.warning("layout %s: %.0fs %s", layout, time.time() - t0, out[layout])
    return out


def bench_inference(cfg, store, batch: int, k: int, dim: int, repeats: int) -> dict[str, dict[str, float]]:
    import torch

    from reasonrec.tools.persist import load_tool

    loo = store.read_table("prepare", "loo").slice(0, batch)
    hists = [
        np.append(np.asarray(t, np.int64), v)
        for t, v in zip(loo.column("train_items").to_pylist(), loo.column("valid_item").fill_null(0).to_pylist())
    ]
    users = loo.column("user_id").to_numpy()
    man = store.manifest("train_tools")
    tools_url = store.url("train_tools", "tools")
    loaded: dict = {}
    for name in man.metrics["tools"]:
        loaded[name] = load_tool(f"{tools_url}/{name}", cfg.storage, members=loaded)
    n_items = next(iter(loaded.values())).n_items

    def best_of(fn) -> float:
        fn()  # warm-up (allocations, lazy init)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    g = torch.Generator().manual_seed(0)
    u_emb, i_emb = torch.randn(len(users), dim, generator=g), torch.randn(dim, n_items, generator=g)
    with torch.no_grad():
        base = best_of(lambda: torch.topk(u_emb @ i_emb, k, dim=1))
    out = {"matmul+topk": {"seconds": base, "users_per_s": len(users) / base, "x_limit": 1.0}}
    for name, tool in loaded.items():
        if "sequential" not in tool.tasks and "direct" not in tool.tasks:
            continue

        def run(tool=tool):
            s = np.asarray(tool.score_items(users, hists), dtype=np.float32)
            np.argpartition(-s, k - 1, axis=1)[:, :k]

        with torch.no_grad():
            sec = best_of(run)
        out[name] = {"seconds": sec, "users_per_s": len(users) / sec, "x_limit": sec / base}
    return out


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/beauty.yaml")
    p.add_argument("--parts", default="training,inference")
    p.add_argument("--layouts", default="1x1,2x1,1x2")
    p.add_argument("--tools", default=",".join(TRAIN_TOOLS))
    p.add_argument("--users", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--xgb-rounds", type=int, default=50)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    store = open_store(cfg)
    report: dict = {"args": vars(a)}
    parts = a.parts.split(",")
    if "training" in parts:
        init_ray(cfg.ray)
        layouts = a.layouts.split(",")
        train = bench_training(cfg, store, layouts, a.tools.split(","), a.users, a.epochs, a.xgb_rounds)
        report["training"] = train
        print(f"\n### Training rows/s ({a.users} users, epoch {a.epochs} of {a.epochs})\n")
        print(
            "| tool | "
            + " | ".join(f"{lay} rows/s" for lay in layouts)
            + " | "
            + " | ".join(f"{lay} / {layouts[0]}" for lay in layouts[1:])
            + " |"
        )
        print("|---" * (2 * len(layouts)) + "|")
        for tool in a.tools.split(","):
            r = [train[lay][tool] for lay in layouts]
            print(
                f"| {tool} | "
                + " | ".join(f"{x:,.0f}" for x in r)
                + " | "
                + " | ".join(f"{x / r[0]:.2f}x" for x in r[1:])
                + " |"
            )
    if "inference" in parts:
        inf = bench_inference(cfg, store, a.batch, a.k, a.dim, a.repeats)
        report["inference"] = inf
        print(f"\n### Top-{a.k} inference over the full catalog, batch {a.batch} users\n")
        print("| tool | seconds | users/s | time vs matmul+topk |\n|---|---|---|---|")
        for name, r in inf.items():
            print(f"| {name} | {r['seconds']:.3f} | {r['users_per_s']:,.0f} | {r['x_limit']:.1f}x |")
    with store.fs.open(store.path("bench_tools.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
