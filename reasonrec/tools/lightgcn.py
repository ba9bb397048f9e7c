"""LightGCN (He et al. 2020): id embeddings smoothed over the user-item training graph.

Layer k+1 = A_hat @ layer k with A_hat = D^-1/2 A D^-1/2 the symmetric-normalised bipartite
adjacency (a torch sparse matrix); the final embedding is the mean of layers 0..K; score = dot
product; BPR loss with L2 on the layer-0 (ego) embeddings of the batch, as in the paper. The
training edges are kept in the module's state so a loaded tool rebuilds the same graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from reasonrec.tools.base import ToolData, register
from reasonrec.tools.bpr_common import BPRTool, bpr_loss, training_pairs


def normalized_adjacency(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int) -> torch.Tensor:
    """Sparse [U+I, U+I] D^-1/2 A D^-1/2 of the bipartite graph with edges (u, U+i) both ways."""
    n = n_users + n_items
    rows = torch.cat([users, items + n_users])
    cols = torch.cat([items + n_users, users])
    deg = torch.bincount(rows, minlength=n).to(torch.float32)
    inv_sqrt = torch.where(deg > 0, deg.pow(-0.5), torch.zeros_like(deg))
    vals = inv_sqrt[rows] * inv_sqrt[cols]
    # COO (stable API) rather than CSR (beta); indices are built here, so the check is not needed
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n, n), check_invariants=False).coalesce()


class LightGCNModule(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int, n_layers: int, l2: float, edges: torch.Tensor):
        super().__init__()
        self.n_users, self.n_items, self.n_layers, self.l2 = n_users, n_items, n_layers, l2
        self.emb = nn.Embedding(n_users + n_items, dim)
        nn.init.normal_(self.emb.weight, std=0.1)
        self.register_buffer("edges", edges.to(torch.int64))  # [2, E] (user, item); saved with the weights
        self._adj: torch.Tensor | None = None
        self._prop: torch.Tensor | None = None
        self._prop_key: tuple | None = None

    def adjacency(self) -> torch.Tensor:
        if self._adj is None:  # built lazily: after load_state_dict the edges are the loaded ones
            self._adj = normalized_adjacency(self.edges[0], self.edges[1], self.n_users, self.n_items)
        return self._adj

    def _load_from_state_dict(self, *args, **kwargs):
        self._adj, self._prop, self._prop_key = None, None, None
        super()._load_from_state_dict(*args, **kwargs)

    def propagate(self) -> torch.Tensor:
        x = self.emb.weight
        acc = x
        adj = self.adjacency()
        for _ in range(self.n_layers):
            x = adj @ x
            acc = acc + x
        return acc / (self.n_layers + 1)

    def forward(self, u: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        allx = self.propagate()
        eu, ei, ej = allx[u], allx[i + self.n_users], allx[j + self.n_users]
        ego = self.emb.weight
        reg = ego[u].pow(2).sum() + ego[i + self.n_users].pow(2).sum() + ego[j + self.n_users].pow(2).sum()
        return bpr_loss((eu * ei).sum(-1), (eu * ej).sum(-1), reg, self.l2)

    def propagated(self) -> torch.Tensor:
        """:meth:`propagate` for inference, kept until the embeddings change: the graph is fixed, so
        one row's scores need not pay the n_layers sparse products over every node each call. The key
        is the weight tensor and its version counter (any in-place update, an optimizer step or
        ``load_state_dict``, bumps it); while training (autograd on) it is recomputed every call."""
        w = self.emb.weight
        key = (id(w), w._version, self.n_layers)
        if torch.is_grad_enabled() or self._prop_key != key:
            out = self.propagate()
            if torch.is_grad_enabled():
                return out
            self._prop, self._prop_key = out, key
        return self._prop

    def user_scores(self, u: torch.Tensor) -> torch.Tensor:
        allx = self.propagated()
        return allx[u] @ allx[self.n_users :].T


@register
class LightGCN(BPRTool):
    name = "lightgcn"
    train_defaults: dict[str, Any] = dict(BPRTool.train_defaults, batch_size=2048)
    model_defaults: dict[str, Any] = dict(BPRTool.model_defaults, n_layers=3)

    def build_module(self, data: ToolData | None, arrays=None) -> nn.Module:
        if data is not None:
            users, items = training_pairs(data.train_seqs)
            edges = torch.from_numpy(np.stack([users, items]))
        else:
            edges = torch.from_numpy(np.array(arrays["model.edges"], dtype=np.int64))
        return LightGCNModule(
            self.n_users, self.n_items, int(self.p("dim")), int(self.p("n_layers")), float(self.p("l2")), edges
        )
