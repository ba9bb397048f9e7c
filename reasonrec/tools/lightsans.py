"""LightSANs (Fan et al. 2021): self-attention with low-rank decomposition -- each item attends
to ``k_interests`` latent interests (learned soft aggregations of the sequence's keys/values)
instead of to every item -- plus decoupled position encoding (a separate position-to-position
attention whose weights apply to the item values, added to the item-to-interest output).

Because we train with CE at every position (like SASRec), the interest aggregation is *causal*:
the interests seen at position t aggregate items <= t only (prefix softmax via cumulative sums),
so no position sees its own target.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from reasonrec.tools.base import register
from reasonrec.tools.sasrec import Block, causal_mask
from reasonrec.tools.sequential import SeqNet, SequentialTorchTool


class LowRankCausalAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, k_interests: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
        self.heads, self.dh = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.interest = nn.Linear(self.dh, k_interests, bias=False)  # item -> interest logits
        self.pos_qk = nn.Linear(hidden, 2 * hidden)  # decoupled position attention
        self.out = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, ctx: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        seqs, mask, pos = ctx  # [B, L], [B, 1, L, L], [L, d]
        B, L, d = x.shape
        H, dh = self.heads, self.dh
        q, k, v = self.qkv(x).view(B, L, 3, H, dh).permute(2, 0, 3, 1, 4)  # [B, H, L, dh] each
        valid = (seqs > 0)[:, None, :, None]  # [B, 1, L, 1]

        # Item-to-interest aggregation, causal: interests at t = softmax over items <= t.
        a = self.interest(k).masked_fill(~valid, -1e9)  # [B, H, L, K]
        w = torch.exp(a - a.amax(dim=2, keepdim=True)) * valid  # stable: shift per interest
        den = w.cumsum(dim=2).unsqueeze(-1) + 1e-9  # [B, H, L, K, 1]
        keys = (w.unsqueeze(-1) * k.unsqueeze(3)).cumsum(dim=2) / den  # [B, H, L, K, dh]
        vals = (w.unsqueeze(-1) * v.unsqueeze(3)).cumsum(dim=2) / den
        att = torch.einsum("bhld,bhlkd->bhlk", q, keys) / math.sqrt(dh)
        item_out = torch.einsum("bhlk,bhlkd->bhld", self.drop(att.softmax(-1)), vals)

        # Decoupled position encoding: position-only attention weights over the item values.
        pq, pk = self.pos_qk(pos).view(L, 2, H, dh).permute(1, 2, 0, 3)  # [H, L, dh] each
        pos_att = (pq @ pk.transpose(-1, -2)) / math.sqrt(dh)  # [H, L, L]
        pos_att = pos_att.unsqueeze(0).masked_fill(~mask, float("-inf"))  # [B, H, L, L]
        pos_out = self.drop(pos_att.softmax(-1)) @ v
        return self.out((item_out + pos_out).transpose(1, 2).reshape(B, L, d))


class LightSANsNet(SeqNet):
    def __init__(
        self,
        n_items: int,
        hidden: int,
        layers: int,
        heads: int,
        k_interests: int,
        inner: int,
        max_len: int,
        dropout: float,
        attn_dropout: float,
    ):
        super().__init__(n_items, hidden)
        self.max_len = max_len
        self.pos_emb = nn.Embedding(max_len, hidden)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.emb_ln, self.emb_drop = nn.LayerNorm(hidden), nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(hidden, inner, dropout, LowRankCausalAttention(hidden, heads, k_interests, attn_dropout))
            for _ in range(layers)
        )
        self.final_ln = nn.LayerNorm(hidden)

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        L = seqs.shape[1]
        pos = self.pos_emb(torch.arange(self.max_len - L, self.max_len, device=seqs.device))
        # Positions are *not* added to the items (decoupled); they only drive the position attention.
        x = self.emb_drop(self.emb_ln(self.item_emb(seqs))) * (seqs > 0).unsqueeze(-1)
        ctx = (seqs, causal_mask(seqs), pos)
        for block in self.blocks:
            x = block(x, ctx)
        return self.final_ln(x)


@register
class LightSANs(SequentialTorchTool):
    name = "lightsans"
    defaults = {
        "hidden": 64,
        "layers": 2,
        "heads": 2,
        "k_interests": 5,
        "inner": 256,
        "max_len": 50,
        "dropout": 0.5,
        "attn_dropout": 0.5,
        "lr": 1e-3,
        "batch_size": 128,
    }

    def build_net(self) -> LightSANsNet:
        hp = self.hp
        return LightSANsNet(
            self.n_items,
            int(hp["hidden"]),
            int(hp["layers"]),
            int(hp["heads"]),
            int(hp["k_interests"]),
            int(hp["inner"]),
            int(hp["max_len"]),
            float(hp["dropout"]),
            float(hp["attn_dropout"]),
        )
