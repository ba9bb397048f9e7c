"""GRU4Rec (Hidasi et al. 2016): a GRU over the item sequence; its projected hidden state at each
step scores all items through the shared item embedding. Same full-softmax CE as SASRec."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from reasonrec.tools.base import register
from reasonrec.tools.sequential import SeqNet, SequentialTorchTool


class GRU4RecNet(SeqNet):
    def __init__(self, n_items: int, hidden: int, gru_hidden: int, layers: int, dropout: float):
        super().__init__(n_items, hidden)
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(hidden, gru_hidden, num_layers=layers, batch_first=True)
        self.proj = nn.Linear(gru_hidden, hidden)

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        # Packed: a GRU's state moves even on zero embeddings (its biases), so left padding would make
        # a user's answer depend on how much padding the batch's longest history gave it (an answer
        # alone differed from the same user's answer in a batch). Each row is rotated so its items
        # come first, run packed to its own length, and rotated back to the left-padded layout.
        B, L = seqs.shape
        lengths = (seqs > 0).sum(1)
        pad = (L - lengths)[:, None]
        steps = torch.arange(L, device=seqs.device)[None, :]
        first = seqs.gather(1, (steps + pad) % L)  # [B, L]: the items, then padding
        packed = pack_padded_sequence(
            self.drop(self.item_emb(first)), lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=L)
        out = out.gather(1, ((steps - pad) % L)[:, :, None].expand(-1, -1, out.shape[2]))
        return self.proj(self.drop(out))


@register
class GRU4Rec(SequentialTorchTool):
    name = "gru4rec"
    defaults = {
        "hidden": 64,
        "gru_hidden": 128,
        "layers": 1,
        "dropout": 0.3,
        "max_len": 50,
        "lr": 1e-3,
        "batch_size": 128,
    }

    def build_net(self) -> GRU4RecNet:
        hp = self.hp
        return GRU4RecNet(
            self.n_items, int(hp["hidden"]), int(hp["gru_hidden"]), int(hp["layers"]), float(hp["dropout"])
        )
