"""Base of the neural CTR tools (DLRM, DCNv2, xDeepFM) and the TorchRec model-parallel loop.

Single process (tests, one Ray worker) or plain data parallel: the shared epoch loop
:func:`reasonrec.tools.training.train_loop` (AdamW on every parameter, DDP when
torch.distributed is initialised).

TorchRec tools under torch.distributed (e.g. a Ray Train ``TorchTrainer`` with 2 gloo workers):
:func:`train_model_parallel` wraps the module in ``DistributedModelParallel`` with the embedding
tables sharded table-wise over the ranks. It runs the same epoch loop
(:func:`reasonrec.tools.training.run_epochs`) with its own validation, optimizer parameters and
weight snapshots, because
* the sharded embedding forward is a collective (all-to-all), so validation must run on every
  rank over its shard of the rows (rank-0-only validation as in ``train_loop`` would hang);
* the embedding tables are updated by TorchRec's fused optimizer inside backward -- Adagrad with
  ``sparse_lr`` (fbgemm's CPU kernels offer only SGD/Adagrad variants, no Adam) -- and only the
  dense parameters go to AdamW;
* the weights are sharded, so the best weights are gathered into a full state dict (on every
  rank), which a plain unsharded module then loads: after ``fit`` the tool scores locally on any
  rank with no collectives, and saves like in single-process mode.
"""

from __future__ import annotations

import abc
import logging
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reasonrec.metrics import auc, log_loss
from reasonrec.tools.base import Tool, ToolData, ToolInputError
from reasonrec.tools.bpr_common import sample_negatives_for
from reasonrec.tools.ctr_features import DENSE_FEATURES, CTRFeaturizer, check_ctr_input, ctr_rows, histories_for
from reasonrec.tools.training import TrainConfig, TrainResult, dist_info, run_epochs, train_loop

log = logging.getLogger(__name__)


class CTRModule(nn.Module):
    """``logits(dense [B,D], ids [B,F], hist [B,L] (-1 padded; L may be 0)) -> [B]``;
    ``forward`` returns the BCE training loss (the training loop's convention)."""

    @abc.abstractmethod
    def logits(self, dense: torch.Tensor, ids: torch.Tensor, hist: torch.Tensor) -> torch.Tensor: ...

    def forward(self, dense: torch.Tensor, ids: torch.Tensor, hist: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(self.logits(dense, ids, hist), labels)


def _batched_logits(
    fn: Callable[..., torch.Tensor], dense: np.ndarray, ids: np.ndarray, hist: np.ndarray, batch_size: int = 8192
) -> np.ndarray:
    out = []
    with torch.no_grad():
        for s in range(0, len(ids), batch_size):
            sl = slice(s, s + batch_size)
            out.append(fn(torch.from_numpy(dense[sl]), torch.from_numpy(ids[sl]), torch.from_numpy(hist[sl])).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))).astype(np.float32)


class NeuralCTRTool(Tool):
    """CTR tool over :class:`CTRFeaturizer` features; subclasses build the module."""

    tasks = ("ctr",)
    uses_torchrec = False
    train_defaults: dict[str, Any] = dict(
        lr=1e-3, weight_decay=1e-6, batch_size=2048, max_epochs=30, patience=3, key="auc"
    )
    # sharding / sparse_lr: only for TorchRec tools under DistributedModelParallel
    # user_id False: no per-user embedding (the history bag stands for the user), against
    # memorising each training user's positives
    model_defaults: dict[str, Any] = dict(
        dim=16,
        dense_features=list(DENSE_FEATURES),
        n_folds=5,
        history_len=20,
        user_id=True,
        user_dropout=0.02,
        resample_negatives=False,
        sharding="table_wise",
        sparse_lr=0.05,
    )

    def __init__(self, params: dict[str, Any] | None = None):
        super().__init__(params)
        self.model: CTRModule | None = None
        self.feat: CTRFeaturizer | None = None
        self.train_info: dict[str, Any] = {}
        self._snapshot: dict[str, torch.Tensor] | None = None  # full weights while training sharded

    def p(self, key: str) -> Any:
        return self.params.get(key, self.model_defaults.get(key))

    def _sparse(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        ids = self.feat.sparse(users, items)
        if not self.p("user_id"):
            ids[:, 0] = self.n_users  # everyone is the "unknown" user
        return ids

    @abc.abstractmethod
    def build_module(self) -> CTRModule:
        """The module for ``self.feat`` (sparse names/sizes, number of dense features)."""

    # ----------------------------------------------------------------------------- training
    def fit(self, data: ToolData, reporter=None, start_epoch: int = 0) -> dict[str, float]:
        cfg = TrainConfig.from_params(self.params, **self.train_defaults)
        rank, world = dist_info()
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.n_users, self.n_items = data.n_users, data.n_items
        u, i, y = ctr_rows(data, "train")
        if len(y) == 0:
            raise ToolInputError(f"{self.name}: empty CTR train split")
        resume = self.model is not None and start_epoch > 0
        if not resume:
            self.feat = CTRFeaturizer.from_data(data, self.p("dense_features"), int(self.p("n_folds")))
        raw = self.feat.dense_raw(u, i, histories_for(data, u), oof=True)  # out-of-fold: no label leak
        if not resume:
            self.feat.fit_scaler(raw)
            self.model = self.build_module()
        dense_t = torch.from_numpy((raw - self.feat.mean) / self.feat.std)
        ids0 = self._sparse(u, i)
        ids_t = torch.from_numpy(ids0.copy())
        hist_len = int(self.p("history_len"))
        hist_t = torch.from_numpy(self.feat.history_matrix(i, histories_for(data, u), hist_len))
        y_t = torch.from_numpy(y)
        p_drop = float(self.p("user_dropout"))
        neg_rows = np.flatnonzero(y == 0) if self.p("resample_negatives") else np.zeros(0, np.int64)

        def on_epoch_start(epoch: int) -> None:
            if len(neg_rows) and epoch > 0:
                # fresh negatives each epoch (never training positives of the user), so the model
                # cannot memorise a fixed negative set; epoch 0 uses the given rows
                rng = np.random.default_rng([cfg.seed, 13, epoch])
                nu = u[neg_rows]
                ni = sample_negatives_for(nu, self.feat.pair_keys, self.n_items, rng)
                nh = histories_for(data, nu)
                ids0[neg_rows] = self._sparse(nu, ni)
                dense_t[neg_rows] = torch.from_numpy(self.feat.dense(nu, ni, nh, oof=True))
                hist_t[neg_rows] = torch.from_numpy(self.feat.history_matrix(ni, nh, hist_len))
            # a fresh share of rows per epoch sees the unknown-user row (cold-start embedding)
            rng = np.random.default_rng([cfg.seed, 11, epoch])
            col = np.where(rng.random(len(ids0)) < p_drop, self.n_users, ids0[:, 0])
            ids_t.copy_(torch.from_numpy(ids0))
            ids_t[:, 0] = torch.from_numpy(col)

        validate = None
        valid = None
        if "valid" in data.ctr and len(data.ctr["valid"][2]):
            vu, vi, vy = ctr_rows(data, "valid")
            vh = histories_for(data, vu)
            valid = (self.feat.dense(vu, vi, vh), self._sparse(vu, vi), self.feat.history_matrix(vi, vh, hist_len), vy)

            def validate() -> dict[str, float]:
                logits = _batched_logits(self.model.logits, *valid[:3])
                return {"auc": auc(valid[3], logits), "logloss": log_loss(valid[3], _sigmoid(logits))}

        tensors = [dense_t, ids_t, hist_t, y_t]
        if world > 1 and self.uses_torchrec:

            def snapshot(full: dict[str, torch.Tensor]) -> None:
                self._snapshot = full  # what state() saves while self.model is sharded

            try:
                state, result = train_model_parallel(
                    self.model,
                    tensors,
                    cfg,
                    valid,
                    reporter=reporter,
                    start_epoch=start_epoch,
                    name=self.name,
                    on_epoch_start=on_epoch_start,
                    sharding=str(self.p("sharding")),
                    sparse_lr=float(self.p("sparse_lr")),
                    on_snapshot=snapshot,
                )
            finally:
                self._snapshot = None
            self.model = self.build_module()  # plain, unsharded, no in-backward optimizer hooks
            self.model.load_state_dict(state)
        else:
            result = train_loop(
                self.model,
                tensors,
                cfg,
                validate=validate,
                reporter=reporter,
                start_epoch=start_epoch,
                name=self.name,
                on_epoch_start=on_epoch_start,
            )
        self.model.eval()
        self.train_info = {
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "stopped": result.stopped,
            "seconds": round(result.seconds, 2),
            "world": world,
        }
        return dict(result.best_metrics)

    # ---------------------------------------------------------------------------- inference
    def predict_ctr(self, users: np.ndarray, items: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        if self.model is None:
            raise RuntimeError(f"{self.name}: not trained")
        users = np.asarray(users, np.int64).reshape(-1)
        items = np.asarray(items, np.int64).reshape(-1)
        check_ctr_input(self.n_items, users, items, histories)
        if self.model.training:  # eval() walks every submodule: only when a fit left it training
            self.model.eval()
        logits = _batched_logits(
            self.model.logits,
            self.feat.dense(users, items, histories),
            self._sparse(users, items),
            self.feat.history_matrix(items, histories, int(self.p("history_len"))),
        )
        return _sigmoid(logits)

    # ---------------------------------------------------------------------------- save/load
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self.model is None:
            raise RuntimeError(f"{self.name}: not trained")
        fcfg, farr = self.feat.state()
        weights = self._snapshot if self._snapshot is not None else self.model.state_dict()
        arrays = {f"model.{k}": v.detach().cpu().numpy() for k, v in weights.items()}
        arrays.update(farr)
        return {
            "params": self.params,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "features": fcfg,
            "train_info": self.train_info,
        }, arrays

    @classmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> NeuralCTRTool:
        tool = cls(config["params"])
        tool.n_users, tool.n_items = int(config["n_users"]), int(config["n_items"])
        tool.train_info = dict(config.get("train_info", {}))
        tool.feat = CTRFeaturizer.from_state(config["features"], arrays)
        tool.model = tool.build_module()
        tool.model.load_state_dict(
            {k[len("model.") :]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("model.")}
        )
        tool.model.eval()
        return tool


# ------------------------------------------------------------------ TorchRec model parallel


def _gather_full_state(dmp: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) copy of a DMP state dict on every rank (collective)."""
    import torch.distributed as dist
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    rank, _ = dist_info()
    out: dict[str, torch.Tensor] = {}
    for k, v in dmp.state_dict().items():
        if isinstance(v, ShardedTensor):
            full = torch.empty(v.size(), dtype=v.dtype) if rank == 0 else None
            v.gather(dst=0, out=full)
            if rank != 0:
                full = torch.empty(v.size(), dtype=v.dtype)
            dist.broadcast(full, src=0)
            out[k] = full
        else:
            out[k] = v.detach().clone()
    return out


def _load_full_state(dmp: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy a full state dict into a DMP model: each rank writes its local shards (the state
    dict tensors alias the live weights, fused tables included)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    with torch.no_grad():
        for k, v in dmp.state_dict().items():
            src = full[k]
            if isinstance(v, ShardedTensor):
                for shard in v.local_shards():
                    sl = tuple(
                        slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)
                    )
                    shard.tensor.copy_(src[sl])
            else:
                v.copy_(src)


def shard_model(module: nn.Module, sparse_lr: float, sharding: str = "table_wise") -> nn.Module:
    """``DistributedModelParallel`` over the process group, every embedding table sharded with
    ``sharding`` and a fused Adagrad (lr ``sparse_lr``) applied in backward; starts from
    ``module``'s current weights (collective)."""
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    _, world = dist_info()
    start = {k: v.detach().clone() for k, v in module.state_dict().items()}
    ebcs = [m for m in module.modules() if isinstance(m, EmbeddingBagCollection)]
    apply_optimizer_in_backward(torch.optim.Adagrad, [p for e in ebcs for p in e.parameters()], {"lr": sparse_lr})
    tables = [c.name for e in ebcs for c in e.embedding_bag_configs()]
    constraints = {t: ParameterConstraints(sharding_types=[sharding], compute_kernels=["fused"]) for t in tables}
    sharders = [EmbeddingBagCollectionSharder()]
    # fixed reservation: the heuristical default is deprecated and over-estimates on CPU
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"),
        constraints=constraints,
        debug=False,
        storage_reservation=FixedPercentageStorageReservation(0.15),
    )
    plan = planner.collective_plan(module, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module, device=torch.device("cpu"), plan=plan, sharders=sharders)
    _load_full_state(dmp, start)
    return dmp


def _dense_parameters(dmp: nn.Module) -> list[nn.Parameter]:
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

    sharded = {id(p) for m in dmp.modules() if isinstance(m, ShardedEmbeddingBagCollection) for p in m.parameters()}
    return [p for p in dmp.parameters() if p.requires_grad and id(p) not in sharded]


def dmp_logits(
    dmp: nn.Module, dense: np.ndarray, ids: np.ndarray, hist: np.ndarray, batch_size: int = 4096
) -> np.ndarray:
    """Logits for all rows on every rank: each rank scores an equal, padded slice (the sharded
    forward is collective, so all ranks must run the same number of equal batches)."""
    import torch.distributed as dist

    rank, world = dist_info()
    n = len(ids)
    per = max(1, math.ceil(n / world))
    idx = np.arange(rank * per, (rank + 1) * per)
    idx = np.where(idx < n, idx, 0)  # pad with row 0; padded outputs are dropped below
    inner = dmp.module
    inner.eval()
    parts = []
    with torch.no_grad():
        for s in range(0, per, batch_size):
            b = idx[s : s + batch_size]
            parts.append(inner.logits(torch.from_numpy(dense[b]), torch.from_numpy(ids[b]), torch.from_numpy(hist[b])))
    mine = torch.cat(parts)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    inner.train()
    return torch.cat(gathered)[:n].numpy()


def train_model_parallel(
    module: CTRModule,
    tensors: Sequence[torch.Tensor],
    cfg: TrainConfig,
    valid: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None,
    reporter=None,
    start_epoch: int = 0,
    name: str = "tool",
    on_epoch_start: Callable[[int], None] | None = None,
    sharding: str = "table_wise",
    sparse_lr: float = 0.05,
    on_snapshot: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """Train ``module`` (a TorchRec CTR module) under DMP; returns the best full state dict (on
    every rank) and the result. ``valid`` = (dense, ids, hist, labels) rows, metric ``cfg.key``.
    ``on_snapshot(full_state)`` runs on every rank after each epoch, before ``reporter``, with the
    current weights gathered (``module`` itself is sharded in place meanwhile, so a checkpoint
    taken from the reporter must use this snapshot)."""
    _, world = dist_info()
    dmp = shard_model(module, sparse_lr, sharding)
    # The dense parameters only: the embedding tables step inside backward (fused optimizer).
    dense_params = _dense_parameters(dmp)

    def run_validation() -> dict[str, float]:  # identical on every rank (all-gathered logits)
        logits = dmp_logits(dmp, *valid[:3])
        return {"auc": auc(valid[3], logits), "logloss": log_loss(valid[3], _sigmoid(logits))}

    best_state, result = run_epochs(
        dmp,
        dmp,
        tensors,
        dense_params,
        cfg,
        run_validation if valid is not None else None,
        lambda: _gather_full_state(dmp),
        reporter=reporter,
        start_epoch=start_epoch,
        name=f"{name} (DMP x{world})",
        on_epoch_start=on_epoch_start,
        on_snapshot=on_snapshot,
    )
    return (best_state if best_state is not None else _gather_full_state(dmp)), result
