"""Shared machinery of the BPR-trained direct tools (BPR-MF, BPR-MLP, LightGCN).

A subclass supplies a torch module with
* ``forward(users, pos_items, neg_items) -> loss`` (BPR loss + L2 on the batch's embeddings),
* ``user_scores(users) -> [B, n_items]`` for inference;
optionally ``candidate_scores(users, cands [B, C]) -> [B, C]``; this base does the rest: training pairs and
per-epoch negative sampling, validation on candidate
lists (the direct-recommendation protocol: 1 positive + sampled negatives), the shared epoch loop
(:func:`reasonrec.tools.training.train_loop`), the popularity fallback and save/load.

Fallback: users outside ``[0, n_users)`` (or -1) and users with no training interactions have no
trained embedding, so they get popularity scores ``log1p(train count)``. The history passed at
inference does not change a known user's scores (these are transductive user-id models).
"""

from __future__ import annotations

import abc
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reasonrec.metrics import rank_in_candidates, ranking_metrics
from reasonrec.tools.base import Tool, ToolData, ToolInputError
from reasonrec.tools.training import TrainConfig, train_loop


def bpr_loss(pos: torch.Tensor, neg: torch.Tensor, reg: torch.Tensor, l2: float) -> torch.Tensor:
    """-log sigmoid(s+ - s-) averaged, plus l2 * (sum of squared batch embeddings) / batch."""
    return -F.logsigmoid(pos - neg).mean() + l2 * reg / pos.shape[0]


def training_pairs(train_seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (user, item) training pairs (repeat purchases count once)."""
    users, items = [], []
    for u, seq in enumerate(train_seqs):
        if len(seq):
            s = np.unique(np.asarray(seq, dtype=np.int64))
            users.append(np.full(len(s), u, np.int64))
            items.append(s)
    if not users:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(users), np.concatenate(items)


def sample_negatives_for(
    users: np.ndarray, pos_keys_sorted: np.ndarray, n_items: int, rng: np.random.Generator, tries: int = 5
) -> np.ndarray:
    """One uniformly drawn item per row that the row's user has not interacted with (redrawn up
    to ``tries`` times; a leftover collision is harmless noise for users who bought nearly all)."""
    neg = rng.integers(0, n_items, size=len(users))
    for _ in range(tries):
        keys = users * n_items + neg
        pos = np.searchsorted(pos_keys_sorted, keys)
        hit = (pos < len(pos_keys_sorted)) & (pos_keys_sorted[np.minimum(pos, len(pos_keys_sorted) - 1)] == keys)
        if not hit.any():
            break
        neg[hit] = rng.integers(0, n_items, size=int(hit.sum()))
    return neg


def validation_candidates(data: ToolData, n_neg: int = 99, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, candidates [B, C], positive) for validation: ``data.direct_valid`` when the prepare
    stage made it, else the valid item plus ``n_neg`` never-interacted items per user (seeded)."""
    if data.direct_valid is not None:
        users, cands, pos = data.direct_valid
        return np.asarray(users, np.int64), np.asarray(cands, np.int64), np.asarray(pos, np.int64)
    rng = np.random.default_rng(seed)
    rows = [u for u in range(data.n_users) if data.valid_item[u] >= 0 and len(data.train_seqs[u])]
    seen_of = {u: np.union1d(data.train_seqs[u], [data.valid_item[u], data.test_item[u]]) for u in rows}
    # every row needs the same width: cap k by the smallest never-seen pool
    k = min([n_neg] + [data.n_items - len(s[s >= 0]) for s in seen_of.values()])
    if not rows or k < 1:
        return np.zeros(0, np.int64), np.zeros((0, 1), np.int64), np.zeros(0, np.int64)
    cands = np.empty((len(rows), k + 1), np.int64)
    for r, u in enumerate(rows):
        seen = seen_of[u][seen_of[u] >= 0]
        pool_size = data.n_items - len(seen)
        if pool_size <= 4 * k:
            negs = rng.choice(np.setdiff1d(np.arange(data.n_items), seen), size=k, replace=False)
        else:
            negs = np.empty(0, np.int64)
            while len(negs) < k:
                d = rng.integers(0, data.n_items, 2 * k)
                negs = np.unique(np.concatenate([negs, d[~np.isin(d, seen)]]))
            negs = rng.permutation(negs)[:k]
        cands[r] = rng.permutation(np.concatenate([[data.valid_item[u]], negs]))
    return np.asarray(rows, np.int64), cands, data.valid_item[rows].astype(np.int64)


def candidate_validator(
    score_candidates: Callable[[np.ndarray, np.ndarray], np.ndarray],
    users: np.ndarray,
    cands: np.ndarray,
    pos: np.ndarray,
    ks=(5, 10),
    batch_size: int = 1024,
) -> Callable[[], dict[str, float]]:
    def validate() -> dict[str, float]:
        ranks = [
            rank_in_candidates(
                score_candidates(users[s : s + batch_size], cands[s : s + batch_size]),
                cands[s : s + batch_size],
                pos[s : s + batch_size],
            )
            for s in range(0, len(users), batch_size)
        ]
        # the sampled protocol, not full ranking: metrics.json says so through the list width
        return {
            **ranking_metrics(np.concatenate(ranks) if ranks else np.zeros(0), ks),
            "ranked_among": float(cands.shape[1]),
        }

    return validate


class BPRTool(Tool):
    """Base of the BPR-trained user-id tools; not registered itself."""

    tasks = ("direct", "sequential", "ctr")
    # loop defaults (TrainConfig) and model defaults; ``params`` override both
    # measured on Beauty (bench/beauty_direct_ctr.py): large batches keep the dense AdamW step cheap
    train_defaults: dict[str, Any] = dict(lr=5e-3, batch_size=4096, max_epochs=200, patience=8, key="ndcg@5")
    model_defaults: dict[str, Any] = dict(dim=64, l2=1e-4, val_negatives=99)

    def __init__(self, params: dict[str, Any] | None = None):
        super().__init__(params)
        self.model: nn.Module | None = None
        self.popularity = np.zeros(0, np.float32)
        self.user_known = np.zeros(0, bool)
        self.train_info: dict[str, Any] = {}

    def p(self, key: str) -> Any:
        return self.params.get(key, self.model_defaults.get(key))

    # ------------------------------------------------------------------------- subclass API
    @abc.abstractmethod
    def build_module(self, data: ToolData | None, arrays: dict[str, np.ndarray] | None = None) -> nn.Module:
        """The torch module, from ``data`` when training or from the saved ``arrays`` when
        loading (data-derived buffers travel in the module's state_dict)."""

    # ----------------------------------------------------------------------------- training
    def fit(self, data: ToolData, reporter=None, start_epoch: int = 0) -> dict[str, float]:
        cfg = TrainConfig.from_params(self.params, **self.train_defaults)
        torch.manual_seed(cfg.seed)
        self.n_users, self.n_items = data.n_users, data.n_items
        self.popularity = np.log1p(data.item_popularity).astype(np.float32)
        self.user_known = np.array([len(s) > 0 for s in data.train_seqs], dtype=bool)
        if self.model is None or start_epoch == 0:
            self.model = self.build_module(data)
        users, items = training_pairs(data.train_seqs)
        if len(users) == 0:
            raise ToolInputError(f"{self.name}: no training interactions")
        pos_keys = np.sort(users * self.n_items + items)
        u_t, i_t = torch.from_numpy(users), torch.from_numpy(items)
        j_t = torch.zeros_like(i_t)

        def resample(epoch: int) -> None:
            # the same draw on every rank (seeded by epoch); filled in place so the loop sees it
            rng = np.random.default_rng([cfg.seed, 7, epoch])
            j_t.copy_(torch.from_numpy(sample_negatives_for(users, pos_keys, self.n_items, rng)))

        vu, vc, vp = validation_candidates(data, int(self.p("val_negatives")), seed=cfg.seed)
        validate = candidate_validator(self._score_cands_known, vu, vc, vp) if len(vu) else None
        result = train_loop(
            self.model,
            [u_t, i_t, j_t],
            cfg,
            validate=validate,
            reporter=reporter,
            start_epoch=start_epoch,
            name=self.name,
            on_epoch_start=resample,
        )
        self.model.eval()
        self.train_info = {
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "stopped": result.stopped,
            "seconds": round(result.seconds, 2),
        }
        return dict(result.best_metrics)

    def _score_cands_known(self, users: np.ndarray, cands: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            if hasattr(self.model, "candidate_scores"):  # cheaper than scoring the whole catalog
                return self.model.candidate_scores(torch.from_numpy(users), torch.from_numpy(cands)).numpy()
            s = self.model.user_scores(torch.from_numpy(users)).numpy()
        return np.take_along_axis(s, cands, axis=1)

    # ---------------------------------------------------------------------------- inference
    def _known(self, users: np.ndarray) -> np.ndarray:
        users = np.asarray(users, dtype=np.int64)
        inside = (users >= 0) & (users < self.n_users)
        known = np.zeros(len(users), bool)
        known[inside] = self.user_known[users[inside]]
        return known

    def score_items(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        if self.model is None:
            raise RuntimeError(f"{self.name}: not trained")
        users = np.asarray(users, dtype=np.int64).reshape(-1)
        if len(histories) != len(users):
            raise ToolInputError(f"{len(users)} users but {len(histories)} histories")
        for h in histories:
            self.check_items(np.asarray(h, dtype=np.int64))
        out = np.broadcast_to(self.popularity, (len(users), self.n_items)).astype(np.float32)
        known = self._known(users)
        if known.any():
            with torch.no_grad():
                out[known] = self.model.user_scores(torch.from_numpy(users[known])).numpy()
        return out

    # ---------------------------------------------------------------------------- save/load
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self.model is None:
            raise RuntimeError(f"{self.name}: not trained")
        arrays = {f"model.{k}": v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}
        arrays["popularity"] = self.popularity
        arrays["user_known"] = self.user_known.astype(np.uint8)
        config = {
            "params": self.params,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "train_info": self.train_info,
        }
        return config, arrays

    @classmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> BPRTool:
        tool = cls(config["params"])
        tool.n_users, tool.n_items = int(config["n_users"]), int(config["n_items"])
        tool.train_info = dict(config.get("train_info", {}))
        tool.popularity = np.asarray(arrays["popularity"], np.float32)
        tool.user_known = np.asarray(arrays["user_known"]).astype(bool)
        tool.model = tool.build_module(None, arrays)
        tool.model.load_state_dict(
            {k[len("model.") :]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("model.")}
        )
        tool.model.eval()
        return tool
