"""BPR-MF (Rendle et al. 2009): user and item embeddings, score = dot product, trained with the
pairwise BPR loss on uniformly sampled negatives. Direct tool; also ranks the whole catalog
(sequential) and gives a CTR probability as sigmoid(score)."""

from __future__ import annotations

import torch
from torch import nn

from reasonrec.tools.base import ToolData, register
from reasonrec.tools.bpr_common import BPRTool, bpr_loss


class MFModule(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int, l2: float):
        super().__init__()
        self.l2 = l2
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        # small init: BPR on dot products is sensitive to the initial score scale
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)

    def forward(self, u: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        eu, ei, ej = self.user(u), self.item(i), self.item(j)
        reg = eu.pow(2).sum() + ei.pow(2).sum() + ej.pow(2).sum()
        return bpr_loss((eu * ei).sum(-1), (eu * ej).sum(-1), reg, self.l2)

    def user_scores(self, u: torch.Tensor) -> torch.Tensor:
        return self.user(u) @ self.item.weight.T

    def candidate_scores(self, u: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bd,bcd->bc", self.user(u), self.item(cands))


@register
class BPRMF(BPRTool):
    name = "bpr_mf"

    def build_module(self, data: ToolData | None, arrays=None) -> nn.Module:
        return MFModule(self.n_users, self.n_items, int(self.p("dim")), float(self.p("l2")))
