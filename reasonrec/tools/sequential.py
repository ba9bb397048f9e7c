"""Common machinery of the sequential torch tools (SASRec, LightSANs, GRU4Rec).

Each tool supplies a network with ``encode(seqs[B, L]) -> hidden[B, L, d]`` and an
``item_emb`` (``n_items + 1`` rows, row 0 = padding) shared with the output layer. Sequences are
*left*-padded with 0 (ids shifted by +1) so the most recent item is always the last column.

Training: every user's training history is cut into windows of ``max_len + 1`` items (from the
end, so the latest items come first); each window predicts items 2..n from their prefixes, with
full-softmax cross-entropy over the whole catalog at every non-padded position.

Inference: ``score_items`` encodes the last ``max_len`` items of each history and returns logits
over all items; rows with an empty history fall back to (normalised) training popularity.
"""

from __future__ import annotations

import abc
import warnings
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reasonrec.tools.base import Tool, ToolData
from reasonrec.tools.training import TrainConfig, TrainResult, ranking_validator, train_loop
from reasonrec.vocab import TOOL_TASKS

COMMON_DEFAULTS: dict[str, Any] = {
    "hidden": 64,
    "max_len": 50,
    "dropout": 0.5,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "batch_size": 128,
    "max_epochs": 200,
    "patience": 10,
    "time_budget_s": 0.0,
    "key": "ndcg@10",
    "seed": 0,
    "grad_clip": 5.0,
    "valid_users": None,  # subsample validation users (None: all)
    "score_batch": 1024,  # rows per forward pass at inference
}


def popularity_scores(counts: np.ndarray) -> np.ndarray:
    """Popularity as scores in [0, 1] (the fallback for empty histories)."""
    counts = np.asarray(counts, dtype=np.float32)
    return counts / max(float(counts.max(initial=0.0)), 1.0)


def pad_left(histories: list[np.ndarray], max_len: int) -> np.ndarray:
    """Last ``max_len`` items of each history, ids + 1, left-padded with 0 -> int64 [B, max_len]."""
    out = np.zeros((len(histories), max_len), dtype=np.int64)
    for row, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)[-max_len:]
        if len(h):
            out[row, max_len - len(h) :] = h + 1
    return out


def training_windows(seqs: list[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), both [N, max_len] left-padded (ids + 1, 0 = ignore), one row per window."""
    inputs, targets = [], []
    for seq in seqs:
        seq = np.asarray(seq, dtype=np.int64) + 1
        end = len(seq)
        while end >= 2:
            start = max(0, end - max_len - 1)
            win = seq[start:end]
            inputs.append(win[:-1])
            targets.append(win[1:])
            end = start + 1  # the next window's last target is this window's first input
            if start == 0:
                break
    n = len(inputs)
    x = np.zeros((n, max_len), dtype=np.int64)
    y = np.zeros((n, max_len), dtype=np.int64)
    for i, (a, b) in enumerate(zip(inputs, targets)):
        x[i, max_len - len(a) :] = a
        y[i, max_len - len(b) :] = b
    return x, y


def trim_padding(*tensors: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop leading all-padding columns of a batch (saves attention / GRU work on short data)."""
    nonpad = (ref > 0).any(dim=0)
    first = int(nonpad.float().argmax()) if bool(nonpad.any()) else ref.shape[1] - 1
    return tuple(t[:, first:] for t in tensors)


class SeqNet(nn.Module):
    """Base network: subclasses implement ``encode``; ``forward`` is the training loss."""

    def __init__(self, n_items: int, hidden: int):
        super().__init__()
        self.n_items = n_items
        self.item_emb = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @abc.abstractmethod
    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded ids -> [B, L, d]; position t may only see positions <= t."""

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.item_emb.weight[1:].T

    def forward(self, seqs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seqs, targets = trim_padding(seqs, targets, ref=seqs)
        h = self.encode(seqs)
        mask = targets > 0
        # Logits only where there is a target: full-softmax CE over all items.
        return F.cross_entropy(self.logits(h[mask]), targets[mask] - 1)

    def last_logits(self, seqs: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded ids -> logits [B, n_items] of the next item after each sequence."""
        return self.logits(self.encode(seqs)[:, -1])

    @torch.inference_mode()
    def score_last(self, seqs: torch.Tensor) -> torch.Tensor:
        (seqs,) = trim_padding(seqs, ref=seqs)
        # Eager while training, and under a torch dispatch mode (the FLOP counter of
        # ``score.count_flops``): a trace cannot be built inside one (aten::equal fails), and the
        # counts stay those of the eager ops. (torch has no public "is a dispatch mode active".)
        if self.training or torch._C._len_torch_dispatch_stack() > 0:
            return self.last_logits(seqs)
        return self.traced(seqs.device)(seqs)

    def traced(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`last_logits` as a TorchScript trace, for inference (one per device, built on first
        use). A module of many small layers spends most of a one-row forward in Python (``Module``
        calls, eval-mode dropout): the trace runs the same ops from C++ (one quickstart row, one
        thread: SASRec 0.87 -> 0.52 ms, LightSANs 1.55 -> 0.77 ms; the router's one-row call 8.1 ->
        6.8 ms). It shares the net's parameters (an in-place update, e.g. a training step or
        ``load_state_dict``, reaches it) and gives the eager forward's values bit for bit for any
        batch size and length (a test checks), so batch and online answers are as before.
        ``torch.jit.trace`` is deprecated in favour of
        ``torch.compile`` / ``torch.export``: on CPU the first needs a C++ toolchain at run time and
        seconds of compilation per shape, the second's dynamic-length export of these nets fails
        (a guard at ``L == max_len``) and its graph module ran slower than eager."""
        key = (device.type, device.index)
        cache = self.__dict__.setdefault("_traces", {})  # not a registered submodule: no state_dict keys
        if key not in cache:
            # A generic example (2 rows, 3 items): a size-1 dimension could be specialised by the trace.
            example = torch.arange(1, 7, device=device).remainder(self.n_items).add(1).view(2, 3)
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")  # the deprecation notice and TracerWarnings (see the test)
                cache[key] = torch.jit.trace(_LastLogits(self), example, check_trace=False)
        return cache[key]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_traces", None)  # a trace cannot be pickled; it is rebuilt on first use
        return state


class _LastLogits(nn.Module):
    """What :meth:`SeqNet.traced` traces (``torch.jit.trace`` traces a module's ``forward``)."""

    def __init__(self, net: SeqNet):
        super().__init__()
        self.net = net

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.net.last_logits(seqs)


class SequentialTorchTool(Tool):
    """A sequential recommender trained with :func:`train_loop`; subclasses set ``defaults`` and
    implement ``build_net``."""

    tasks = TOOL_TASKS
    defaults: dict[str, Any] = COMMON_DEFAULTS

    def __init__(self, params: dict[str, Any] | None = None):
        super().__init__(params)
        self.hp = {**COMMON_DEFAULTS, **type(self).defaults, **self.params}
        self.net: SeqNet | None = None
        self.popularity = np.zeros(0, dtype=np.float32)
        self.epochs_trained = 0
        self.result: TrainResult | None = None

    @abc.abstractmethod
    def build_net(self) -> SeqNet:
        """The network for ``self.n_items`` and ``self.hp``."""

    # ----------------------------------------------------------------------------- training
    def fit(
        self, data: ToolData, reporter: Callable[[int, dict], None] | None = None, start_epoch: int = 0
    ) -> dict[str, float]:
        if self.net is None or self.n_items != data.n_items:
            self.n_items, self.n_users = data.n_items, data.n_users
            torch.manual_seed(int(self.hp["seed"]))
            self.net = self.build_net()
        self.popularity = data.item_popularity.astype(np.float32)
        x, y = training_windows(data.train_seqs, int(self.hp["max_len"]))
        validate = ranking_validator(
            self.score_items,
            data.train_seqs,
            data.valid_item,
            max_users=self.hp["valid_users"],
            seed=int(self.hp["seed"]),
        )
        cfg = TrainConfig.from_params(self.hp)
        self.result = train_loop(
            self.net,
            [torch.from_numpy(x), torch.from_numpy(y)],
            cfg,
            validate=validate,
            reporter=reporter,
            start_epoch=start_epoch,
            name=self.name,
            lengths=(x > 0).sum(axis=1),
        )
        self.epochs_trained = self.result.last_epoch + 1
        return self.result.best_metrics

    # ---------------------------------------------------------------------------- inference
    def score_items(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        if self.net is None:
            raise RuntimeError(f"tool '{self.name}' is not trained")
        out = np.empty((len(histories), self.n_items), dtype=np.float32)
        lengths = np.array([len(h) for h in histories])
        for h in histories:
            self.check_items(np.asarray(h))
        out[lengths == 0] = popularity_scores(self.popularity)
        # Similar lengths per forward pass, so padding is trimmed (see ``trim_padding``).
        rows = np.flatnonzero(lengths > 0)
        rows = rows[np.argsort(lengths[rows], kind="stable")]
        if self.net.training:  # eval() walks every submodule: ~0.4 ms a call, more than a one-row forward's share
            self.net.eval()
        step = int(self.hp["score_batch"])
        for start in range(0, len(rows), step):
            rb = rows[start : start + step]
            seqs = torch.from_numpy(pad_left([histories[r] for r in rb], int(self.hp["max_len"])))
            out[rb] = self.net.score_last(seqs).numpy()
        return out

    # ---------------------------------------------------------------------------- save/load
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        config = {
            "params": self.hp,
            "n_items": self.n_items,
            "n_users": self.n_users,
            "epochs_trained": self.epochs_trained,
        }
        arrays = {"popularity": self.popularity}
        if self.net is not None:
            arrays.update({f"net.{k}": v.detach().cpu().numpy() for k, v in self.net.state_dict().items()})
        return config, arrays

    @classmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> SequentialTorchTool:
        tool = cls(config["params"])
        tool.n_items, tool.n_users = int(config["n_items"]), int(config["n_users"])
        tool.epochs_trained = int(config.get("epochs_trained", 0))
        tool.popularity = np.asarray(arrays["popularity"], dtype=np.float32)
        weights = {k[4:]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("net.")}
        if weights:
            tool.net = tool.build_net()
            tool.net.load_state_dict(weights)
            tool.net.eval()
        return tool
