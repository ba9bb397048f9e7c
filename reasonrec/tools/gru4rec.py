"""GRU4Rec (Hidasi et al. 2016): a GRU over the item sequence; its projected hidden state at each
step scores all items through the shared item embedding. Same full-softmax CE as SASRec."""

from __future__ import annotations

import torch
from torch import nn

from reasonrec.tools.base import register
from reasonrec.tools.sequential import SeqNet, SequentialTorchTool


class GRU4RecNet(SeqNet):
    def __init__(self, n_items: int, hidden: int, gru_hidden: int, layers: int, dropout: float):
        super().__init__(n_items, hidden)
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(hidden, gru_hidden, num_layers=layers, batch_first=True)
        self.proj = nn.Linear(gru_hidden, hidden)

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        # Left padding: padded steps come first and carry zero embeddings; the state still moves on
        # them (the GRU's biases), so the amount of padding matters (see score_last).
        out, _ = self.gru(self.drop(self.item_emb(seqs)))
        return self.proj(self.drop(out))

    @torch.inference_mode()
    def score_last(self, seqs: torch.Tensor) -> torch.Tensor:
        # Every history padded to the full max_len, never trimmed to the batch's longest: a user's
        # answer must not depend on who else is in the batch (online == batch). Packing the
        # sequences instead removes the padding's effect altogether but measured worse on the
        # 5,000-user synthetic world (validation HR@5 0.161 vs 0.296, best epoch 1 vs 9).
        return self.logits(self.encode(seqs)[:, -1])


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
