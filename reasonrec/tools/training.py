"""The shared epoch loop for torch tools: AdamW, shuffled mini-batches, per-epoch validation,
early stopping with patience, best weights kept, a per-epoch ``reporter`` callback, resume from
``start_epoch``, a time budget and progress logging.

Data-parallel aware without importing Ray: when ``torch.distributed`` is initialised (as inside a
Ray Train ``TorchTrainer`` worker, gloo on CPU) the module is wrapped in
``DistributedDataParallel`` and every epoch's shuffled rows are sharded by rank. All ranks draw
the same permutation (seeded by ``seed`` and the epoch), so they take the same number of steps.
Rank 0 runs validation; its decision (improved / stop) and metrics are broadcast, so every rank
keeps the same best weights and calls ``reporter`` with the same metrics (Ray Train's
``report`` must be called by every worker).

Convention: the module's ``forward(*batch)`` returns the scalar training loss, so that DDP's
gradient hooks see the whole computation. Inference uses other methods of the module.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

Reporter = Callable[[int, dict], None]
Validator = Callable[[], Mapping[str, float]]


@dataclass
class TrainConfig:
    """Loop settings; :meth:`from_params` reads them from a tool's ``params`` dict."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    max_epochs: int = 50
    patience: int = 5  # epochs without improvement of ``key`` before stopping
    time_budget_s: float = 0.0  # 0: no budget; otherwise stop before an epoch would overrun it
    key: str = "ndcg@10"  # validation metric, higher is better
    grad_clip: float = 0.0  # 0: no clipping
    seed: int = 0
    min_delta: float = 0.0  # an improvement must exceed this to reset patience
    find_unused_parameters: bool = False  # DDP option for modules with branches

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None, **defaults: Any) -> TrainConfig:
        """``defaults`` are the tool's own defaults; ``params`` (user config) override them.
        ``epochs`` is accepted as an alias of ``max_epochs``."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in defaults.items() if k in names}
        params = dict(params or {})
        if "epochs" in params and "max_epochs" not in params:
            params["max_epochs"] = params["epochs"]
        values.update({k: v for k, v in params.items() if k in names})
        return cls(**values)


@dataclass
class TrainResult:
    best_metrics: dict[str, float]
    best_epoch: int  # -1 when no validation ran
    epochs_run: int
    last_epoch: int  # index of the last completed epoch (start_epoch - 1 if none)
    stopped: str  # "early_stopping" | "time_budget" | "max_epochs"
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def dist_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def epoch_batches(
    n_rows: int,
    batch_size: int,
    epoch: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    lengths: np.ndarray | None = None,
    bucket_batches: int = 50,
) -> Iterable[np.ndarray]:
    """Row indices of this rank's batches for one epoch. The permutation depends only on
    (seed, epoch), so every rank agrees; it is trimmed to a multiple of ``world`` and each global
    batch (``batch_size * world`` rows) is dealt out across ranks, so every rank takes the same
    number of steps (DDP all-reduces once per step).

    With ``lengths`` (e.g. sequence lengths), rows are sorted by length inside chunks of
    ``bucket_batches`` global batches and the batch order is shuffled again: batches then hold
    similar lengths, so padding can be trimmed per batch, while the data order stays random."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n_rows)
    perm = perm[: len(perm) - len(perm) % world]
    gbs = batch_size * world
    if lengths is None:
        batches = [perm[i : i + gbs] for i in range(0, len(perm), gbs)]
    else:
        batches = []
        chunk = gbs * bucket_batches
        for start in range(0, len(perm), chunk):
            part = perm[start : start + chunk]
            part = part[np.argsort(lengths[part], kind="stable")]
            batches.extend(part[i : i + gbs] for i in range(0, len(part), gbs))
        batches = [batches[i] for i in rng.permutation(len(batches))]
    for b in batches:
        yield b[rank::world]


def train_loop(
    module: nn.Module,
    tensors: Sequence[torch.Tensor],
    cfg: TrainConfig,
    validate: Validator | None = None,
    reporter: Reporter | None = None,
    start_epoch: int = 0,
    name: str = "tool",
    on_epoch_start: Callable[[int], None] | None = None,
    lengths: np.ndarray | None = None,
) -> TrainResult:
    """Train ``module`` in place on rows of ``tensors`` (all share dim 0), one batch =
    ``module(*[t[idx] for t in tensors])`` -> loss. After each epoch ``validate()`` (rank 0,
    ``module.eval()``, no grad) returns metrics; the best ``cfg.key`` weights are restored at the
    end. ``reporter(epoch, metrics)`` is called on every rank after each epoch. ``start_epoch``
    resumes the epoch count (the module holds the weights to continue from; the optimizer starts
    fresh). ``on_epoch_start(epoch)`` lets a tool resample per-epoch data (e.g. negatives).
    ``lengths`` (per row) turns on length-bucketed batches (see :func:`epoch_batches`). Under
    torch.distributed ``cfg.batch_size`` is per rank."""
    rank, world = dist_info()
    if any(int(t.shape[0]) != int(tensors[0].shape[0]) for t in tensors):
        raise ValueError("all training tensors must have the same number of rows")
    model: nn.Module = module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's initial weights, so ranks start identical even if seeded apart.
        model = DistributedDataParallel(module, find_unused_parameters=cfg.find_unused_parameters)
    params = [p for p in module.parameters() if p.requires_grad]

    def run_validation() -> dict[str, float]:
        metrics: dict[str, float] = {}
        if rank == 0:
            module.eval()
            with torch.no_grad():
                metrics = {k: float(v) for k, v in validate().items()}
            module.train()
        return _broadcast(metrics, world)

    best_state, result = run_epochs(
        model,
        module,
        tensors,
        params,
        cfg,
        run_validation if validate is not None else None,
        lambda: copy.deepcopy(module.state_dict()),
        reporter=reporter,
        start_epoch=start_epoch,
        name=name,
        on_epoch_start=on_epoch_start,
        lengths=lengths,
    )
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return result


def run_epochs(
    model: nn.Module,
    module: nn.Module,
    tensors: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    cfg: TrainConfig,
    validate: Validator | None,
    snapshot: Callable[[], dict[str, torch.Tensor]],
    reporter: Reporter | None = None,
    start_epoch: int = 0,
    name: str = "tool",
    on_epoch_start: Callable[[int], None] | None = None,
    lengths: np.ndarray | None = None,
    on_snapshot: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> tuple[dict[str, torch.Tensor] | None, TrainResult]:
    """The epoch loop both :func:`train_loop` (one module, DDP) and the TorchRec CTR tools' model
    parallel loop run: AdamW on ``params``, ``model(*batch)`` -> loss (``module`` is what train()
    switches), the time budget, per-epoch validation, patience, best weights and the reporter.
    ``validate()`` must return the same metrics on every rank and ``snapshot()`` the full weights
    (every rank calls both, so they may be collective). ``on_snapshot(weights)`` runs on every rank
    after each epoch. Returns the best weights (None: no validation improved on the start, or no
    validation at all) and the result."""
    rank, world = dist_info()
    n_rows = int(tensors[0].shape[0])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    t_start = time.time()
    best_metrics: dict[str, float] = {}
    best_value, best_epoch = -math.inf, -1
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = []
    if validate is not None and start_epoch > 0:
        # Resuming: the weights we continue from are the best so far until beaten.
        best_metrics = validate()
        best_value, best_epoch = best_metrics.get(cfg.key, -math.inf), start_epoch - 1
        best_state = snapshot()

    stopped, bad_epochs, last_epoch, epoch_seconds = "max_epochs", 0, start_epoch - 1, 0.0
    for epoch in range(start_epoch, cfg.max_epochs):
        if cfg.time_budget_s and (time.time() - t_start) + epoch_seconds > cfg.time_budget_s:
            stopped = "time_budget"
            break
        t0 = time.time()
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        module.train()
        total, steps, rows = 0.0, 0, 0
        for idx in epoch_batches(n_rows, cfg.batch_size, epoch, cfg.seed, rank, world, lengths):
            idx_t = torch.from_numpy(idx)
            loss = model(*[t[idx_t] for t in tensors])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            total += float(loss.detach())
            steps += 1
            rows += len(idx)
        train_seconds = time.time() - t0
        metrics = dict(validate()) if validate is not None else {}
        metrics["loss"] = total / max(steps, 1)
        if world > 1:  # mean loss over ranks, so every rank reports the same number
            lt = torch.tensor([metrics["loss"]], dtype=torch.float64)
            torch.distributed.all_reduce(lt)
            metrics["loss"] = float(lt) / world
        epoch_seconds = time.time() - t0
        # every rank takes equally many rows (epoch_batches), so the global rate is rows * world
        metrics.update(
            epoch=epoch,
            seconds=epoch_seconds,
            train_seconds=train_seconds,
            examples_per_s=rows * world / max(train_seconds, 1e-9),
        )
        last_epoch = epoch

        value = metrics.get(cfg.key)
        improved = validate is not None and value is not None and value > best_value + cfg.min_delta
        current = snapshot() if (improved or on_snapshot is not None) else None
        if on_snapshot is not None:
            on_snapshot(current)
        if validate is None:
            best_metrics, best_epoch = dict(metrics), epoch
        elif improved:
            best_value, best_metrics, best_epoch, best_state = value, dict(metrics), epoch, current
            bad_epochs = 0
        else:
            bad_epochs += 1
        metrics["best_" + cfg.key] = float(best_value) if best_epoch >= 0 and validate is not None else float("nan")
        history.append(metrics)
        if rank == 0:
            log.info(
                "%s epoch %d: loss %.4f %s %s (best %.4f @%d) %.1fs (train %.1fs)",
                name,
                epoch,
                metrics["loss"],
                cfg.key,
                f"{value:.4f}" if value is not None else "-",
                best_value,
                best_epoch,
                epoch_seconds,
                train_seconds,
            )
        if reporter is not None:
            reporter(epoch, dict(metrics))
        if validate is not None and bad_epochs >= cfg.patience:
            stopped = "early_stopping"
            break
    return best_state, TrainResult(
        best_metrics=best_metrics,
        best_epoch=best_epoch,
        epochs_run=last_epoch - start_epoch + 1,
        last_epoch=last_epoch,
        stopped=stopped,
        seconds=time.time() - t_start,
        history=history,
    )


# ------------------------------------------------------------------------------- validation


def ranking_validator(
    score_fn: Callable[[np.ndarray, list[np.ndarray]], np.ndarray],
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    ks: Sequence[int] = (5, 10),
    max_users: int | None = None,
    batch_size: int = 512,
    seed: int = 0,
) -> Validator:
    """A ``validate`` callable: full-catalog ranking of ``targets[u]`` from ``histories[u]``
    (users with target -1 or an empty history are skipped); returns ``{"hr@10": ..., ...}``.
    ``max_users`` subsamples users once (fixed seed) to keep validation cheap on big data.
    All items are ranked, history included (the RecBole protocol); ``ranked_among`` says how many
    (candidate-list validators give their list width there, so metrics.json names its protocol)."""
    from reasonrec.metrics import rank_full_catalog, ranking_metrics

    targets = np.asarray(targets, dtype=np.int64)
    users = np.array([u for u in range(len(targets)) if targets[u] >= 0 and len(histories[u])], dtype=np.int64)
    if max_users is not None and len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))

    def validate() -> dict[str, float]:
        ranks, width = [], 0
        for start in range(0, len(users), batch_size):
            ub = users[start : start + batch_size]
            scores = np.asarray(score_fn(ub, [histories[u] for u in ub]))
            ranks.append(rank_full_catalog(scores, targets[ub]))
            width = scores.shape[1]
        return {**ranking_metrics(np.concatenate(ranks) if ranks else np.zeros(0), ks), "ranked_among": float(width)}

    return validate
