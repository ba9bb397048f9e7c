"""xDeepFM (Lian et al. 2018) in plain torch: linear (first-order) + Compressed Interaction
Network (explicit vector-wise feature crosses) + DNN, summed into one logit.

Fields: one embedding per sparse feature (user, item, category, brand), the history bag (mean of
the history items' embeddings from the item table) and the dense features projected to one more
field, so CIN also crosses ids with e.g. popularity, category affinity and the history.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from reasonrec.tools.base import register
from reasonrec.tools.ctr_torch import CTRModule, NeuralCTRTool


class CIN(nn.Module):
    """X^k[h] = sum_{i,j} W^k[h,i,j] (X^{k-1}[i] * X^0[j]) as a 1x1 conv over the m*H_{k-1}
    outer products; each layer is sum-pooled over the embedding dimension."""

    def __init__(self, n_fields: int, layers: list[int]):
        super().__init__()
        self.convs = nn.ModuleList()
        prev = n_fields
        for h in layers:
            self.convs.append(nn.Conv1d(prev * n_fields, h, kernel_size=1))
            prev = h
        self.out_dim = sum(layers)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:  # x0 [B, m, D]
        b, m, d = x0.shape
        xk, pooled = x0, []
        for conv in self.convs:
            z = torch.einsum("bhd,bmd->bhmd", xk, x0).reshape(b, -1, d)
            xk = torch.relu(conv(z))
            pooled.append(xk.sum(dim=2))
        return torch.cat(pooled, dim=1)


class XDeepFMModule(CTRModule):
    def __init__(
        self,
        sizes: list[int],
        n_dense: int,
        dim: int,
        cin_layers: list[int],
        dnn: list[int],
        dropout: float,
        history: bool = False,
    ):
        super().__init__()
        self.history = history
        self.emb = nn.ModuleList(nn.Embedding(s, dim) for s in sizes)
        self.lin = nn.ModuleList(nn.Embedding(s, 1) for s in sizes)
        for e in self.emb:
            nn.init.normal_(e.weight, std=0.01)
        for e in self.lin:
            nn.init.zeros_(e.weight)
        self.dense_lin = nn.Linear(n_dense, 1)
        self.dense_field = nn.Linear(n_dense, dim)
        n_fields = len(sizes) + 1 + int(history)
        self.cin = CIN(n_fields, cin_layers)
        self.cin_out = nn.Linear(self.cin.out_dim, 1)
        layers: list[nn.Module] = []
        d = n_fields * dim + n_dense
        for h in dnn:
            layers += [nn.Linear(d, h), nn.ReLU(), nn.Dropout(dropout)]
            d = h
        layers.append(nn.Linear(d, 1))
        self.dnn = nn.Sequential(*layers)

    def logits(self, dense: torch.Tensor, ids: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        fields = [e(ids[:, k]) for k, e in enumerate(self.emb)] + [self.dense_field(dense)]
        if self.history:
            mask = (hist >= 0).unsqueeze(-1).to(dense.dtype)
            bag = (self.emb[1](hist.clamp(min=0).long()) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            fields.append(bag)  # ids column 1 is the item: the bag lives in the item space
        x0 = torch.stack(fields, dim=1)
        linear = sum(lin(ids[:, k]) for k, lin in enumerate(self.lin)) + self.dense_lin(dense)
        deep = self.dnn(torch.cat([x0.flatten(1), dense], dim=1))
        return (linear + self.cin_out(self.cin(x0)) + deep).squeeze(-1)


@register
class XDeepFMTool(NeuralCTRTool):
    name = "xdeepfm"
    model_defaults: dict[str, Any] = dict(NeuralCTRTool.model_defaults, cin_layers=[32, 32], dnn=[64, 32], dropout=0.1)

    def build_module(self) -> CTRModule:
        return XDeepFMModule(
            self.feat.sparse_sizes,
            len(self.feat.dense_features),
            int(self.p("dim")),
            list(self.p("cin_layers")),
            list(self.p("dnn")),
            float(self.p("dropout")),
            history=int(self.p("history_len")) > 0,
        )
