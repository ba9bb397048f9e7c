"""Most-popular baseline: scores are item counts in the training histories (same for every user)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from reasonrec.tools.base import Tool, ToolData, register
from reasonrec.tools.training import ranking_validator
from reasonrec.vocab import TOOL_TASKS


@register
class Popularity(Tool):
    name = "popularity"
    tasks = TOOL_TASKS

    def __init__(self, params: dict[str, Any] | None = None):
        super().__init__(params)
        self.counts = np.zeros(0, dtype=np.float32)

    def fit(
        self, data: ToolData, reporter: Callable[[int, dict], None] | None = None, start_epoch: int = 0
    ) -> dict[str, float]:
        self.n_items, self.n_users = data.n_items, data.n_users
        self.counts = data.item_popularity.astype(np.float32)
        metrics = ranking_validator(
            self.score_items, data.train_seqs, data.valid_item, max_users=self.params.get("valid_users")
        )()
        if reporter is not None:
            reporter(start_epoch, dict(metrics, epoch=start_epoch))
        return metrics

    def score_items(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        for h in histories:
            self.check_items(np.asarray(h))
        # log1p keeps the ranking and gives the default sigmoid CTR a usable spread.
        return np.broadcast_to(np.log1p(self.counts), (len(histories), self.n_items)).copy()

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"params": self.params, "n_items": self.n_items, "n_users": self.n_users}, {"counts": self.counts}

    @classmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Popularity:
        tool = cls(config["params"])
        tool.n_items, tool.n_users = int(config["n_items"]), int(config["n_users"])
        tool.counts = np.asarray(arrays["counts"], dtype=np.float32)
        return tool
