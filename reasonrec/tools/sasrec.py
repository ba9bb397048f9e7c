"""SASRec (Kang & McAuley 2018): causal self-attention over the last ``max_len`` items with learned
positional embeddings; the item embedding doubles as the output layer. Trained with full-softmax
cross-entropy at every position (stronger than the paper's sampled BCE on sparse data).

Defaults suit Amazon Beauty (small and sparse: heavy dropout, 2 layers of width 64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reasonrec.tools.base import register
from reasonrec.tools.sequential import SeqNet, SequentialTorchTool


def causal_mask(seqs: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] bool, True where query t may attend key s: s <= t and s is not padding.
    The diagonal is always allowed so that padded queries never see an empty row (NaN)."""
    L = seqs.shape[1]
    tri = torch.ones(L, L, dtype=torch.bool, device=seqs.device).tril()
    keep = tri & (seqs > 0)[:, None, None, :]
    return keep | torch.eye(L, dtype=torch.bool, device=seqs.device)


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(B, L, d))


class FeedForward(nn.Sequential):
    def __init__(self, hidden: int, inner: int, dropout: float):
        super().__init__(nn.Linear(hidden, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, hidden))


class Block(nn.Module):
    """Pre-norm transformer block; ``attn`` is any module called as ``attn(x, seqs)``."""

    def __init__(self, hidden: int, inner: int, dropout: float, attn: nn.Module):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn, self.ffn = attn, FeedForward(hidden, inner, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), ctx))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRecNet(SeqNet):
    def __init__(
        self,
        n_items: int,
        hidden: int,
        layers: int,
        heads: int,
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
            Block(hidden, inner, dropout, CausalSelfAttention(hidden, heads, attn_dropout)) for _ in range(layers)
        )
        self.final_ln = nn.LayerNorm(hidden)

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        L = seqs.shape[1]
        # Left padding: position ids count back from the most recent item (always max_len - 1).
        pos = torch.arange(self.max_len - L, self.max_len, device=seqs.device)
        x = self.emb_drop(self.emb_ln(self.item_emb(seqs) + self.pos_emb(pos)))
        x = x * (seqs > 0).unsqueeze(-1)
        mask = causal_mask(seqs)
        for block in self.blocks:
            x = block(x, mask)
        return self.final_ln(x)


@register
class SASRec(SequentialTorchTool):
    name = "sasrec"
    defaults = {
        "hidden": 64,
        "layers": 2,
        "heads": 2,
        "inner": 256,
        "max_len": 50,
        "dropout": 0.5,
        "attn_dropout": 0.5,
        "lr": 1e-3,
        "batch_size": 128,
    }

    def build_net(self) -> SASRecNet:
        hp = self.hp
        return SASRecNet(
            self.n_items,
            int(hp["hidden"]),
            int(hp["layers"]),
            int(hp["heads"]),
            int(hp["inner"]),
            int(hp["max_len"]),
            float(hp["dropout"]),
            float(hp["attn_dropout"]),
        )
