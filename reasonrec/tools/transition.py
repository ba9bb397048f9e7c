"""Next-item transition counts: a first-order Markov chain over items (a smoothed bigram model).

P(next = j | last item i) = (C[i, j] + alpha * pop[j]) / (N[i] + alpha), where C counts the
transitions i -> j in the training histories, N[i] their row sum and pop the items' share of all
training interactions: an item never followed in training backs off to popularity, a common one
follows its own successors. With ``window`` > 1 the last ``window`` items vote, the l-th last with
weight ``decay ** (l - 1)``. ``alpha`` is chosen on the validation targets from ``alphas``.

Users whose next item depends on their last one (the synthetic world's cold users follow such a
chain: counts hit 110 of its 147 coldest users where the quickstart SASRec hits 76) get a tool that
learns it from a single pass over the data. Counts are kept sparse (CSR) and saved as arrays.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import scipy.sparse as sp

from reasonrec.tools.base import Tool, ToolData, register
from reasonrec.tools.training import ranking_validator
from reasonrec.vocab import TOOL_TASKS


@register
class Transition(Tool):
    name = "transition"
    tasks = TOOL_TASKS

    DEFAULTS = {"alphas": [0.1, 1.0, 10.0], "window": 1, "decay": 0.5, "valid_users": 20000}

    def __init__(self, params: dict[str, Any] | None = None):
        super().__init__({**self.DEFAULTS, **(params or {})})
        self.counts = sp.csr_matrix((0, 0), dtype=np.float32)
        self.pop = np.zeros(0, dtype=np.float64)
        self.row_total = np.zeros(0, dtype=np.float64)  # transitions out of each item (C's row sums)
        self.alpha = float(self.params["alphas"][0])

    def fit(
        self, data: ToolData, reporter: Callable[[int, dict], None] | None = None, start_epoch: int = 0
    ) -> dict[str, float]:
        self.n_items, self.n_users = data.n_items, data.n_users
        pairs = [np.stack([s[:-1], s[1:]], 1) for s in data.train_seqs if len(s) > 1]
        src, dst = np.concatenate(pairs, 0).T if pairs else (np.zeros(0, np.int64), np.zeros(0, np.int64))
        self.counts = sp.csr_matrix((np.ones(len(src), np.float32), (src, dst)), shape=(self.n_items, self.n_items))
        self.counts.sum_duplicates()
        self.row_total = np.asarray(self.counts.sum(1), np.float64).ravel()
        pop = data.item_popularity + 1.0  # add-one: every item keeps a little mass
        self.pop = pop / pop.sum()
        best: tuple[float, float, dict] | None = None
        for alpha in self.params["alphas"]:
            self.alpha = float(alpha)
            m = ranking_validator(
                self.score_items, data.train_seqs, data.valid_item, max_users=self.params.get("valid_users")
            )()
            if best is None or m["hr@10"] > best[0]:
                best = (m["hr@10"], self.alpha, m)
        self.alpha, metrics = best[1], dict(best[2], alpha=best[1])
        if reporter is not None:
            reporter(start_epoch, dict(metrics, epoch=start_epoch))
        return metrics

    def score_items(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        B, window, decay = len(histories), int(self.params["window"]), float(self.params["decay"])
        for h in histories:
            self.check_items(np.asarray(h))
        num = np.zeros((B, self.n_items), np.float64)
        mass = np.zeros(B, np.float64)
        for lag in range(1, window + 1):
            rows = np.array([b for b, h in enumerate(histories) if len(h) >= lag], np.int64)
            if not len(rows):
                break
            last = np.array([int(histories[b][-lag]) for b in rows], np.int64)
            w = decay ** (lag - 1)
            num[rows] += w * self.counts[last].toarray()
            mass[rows] += w * self.row_total[last]
        return np.log((num + self.alpha * self.pop[None, :]) / (mass + self.alpha)[:, None])

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        c = self.counts
        return (
            {"params": self.params, "n_items": self.n_items, "n_users": self.n_users, "alpha": self.alpha},
            {
                "indptr": c.indptr.astype(np.int64),
                "indices": c.indices.astype(np.int64),
                "data": c.data.astype(np.float32),
                "pop": self.pop,
            },
        )

    @classmethod
    def from_state(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Transition:
        tool = cls(config["params"])
        tool.n_items, tool.n_users, tool.alpha = int(config["n_items"]), int(config["n_users"]), float(config["alpha"])
        tool.counts = sp.csr_matrix(
            (arrays["data"], arrays["indices"], arrays["indptr"]), shape=(tool.n_items, tool.n_items)
        )
        tool.pop = np.asarray(arrays["pop"], np.float64)
        tool.row_total = np.asarray(tool.counts.sum(1), np.float64).ravel()
        return tool
