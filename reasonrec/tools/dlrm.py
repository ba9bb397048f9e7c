"""DLRM (Naumov et al. 2019) on TorchRec: one ``EmbeddingBagCollection`` table per sparse feature
(user, item, category, brand; the history bag shares the item table), a bottom MLP on the dense features,
pairwise dot-product
interaction, a top MLP to one logit (``torchrec.models.dlrm.DLRM``). Trains single-process or
model-parallel under ``DistributedModelParallel`` (see ``ctr_torch``)."""

from __future__ import annotations

from typing import Any

import torch

from reasonrec.tools.base import register
from reasonrec.tools.ctr_features import make_ebc, make_kjt
from reasonrec.tools.ctr_torch import CTRModule, NeuralCTRTool


class TorchRecCTRModule(CTRModule):
    """DLRM or DLRM_DCN over the featurizer's sparse ids (one id per feature and row)."""

    def __init__(
        self,
        keys: list[str],
        sizes: list[int],
        n_dense: int,
        dim: int,
        dense_arch: list[int],
        over_arch: list[int],
        dcn_layers: int = 0,
        dcn_rank: int = 0,
        history: bool = False,
    ):
        super().__init__()
        from torchrec.models.dlrm import DLRM, DLRM_DCN

        self.keys = list(keys)
        ebc = make_ebc(keys, sizes, dim, history=history)
        # the bottom MLP must end at the embedding width (DLRM interacts them as equals)
        dense_sizes, over_sizes = list(dense_arch) + [dim], list(over_arch) + [1]
        if dcn_layers:
            self.net = DLRM_DCN(
                ebc, n_dense, dense_sizes, over_sizes, dcn_num_layers=dcn_layers, dcn_low_rank_dim=dcn_rank
            )
        else:
            self.net = DLRM(ebc, n_dense, dense_sizes, over_sizes)

    def logits(self, dense: torch.Tensor, ids: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
        return self.net(dense, make_kjt(ids, self.keys, hist)).squeeze(-1)


@register
class DLRMTool(NeuralCTRTool):
    name = "dlrm"
    uses_torchrec = True
    model_defaults: dict[str, Any] = dict(NeuralCTRTool.model_defaults, dense_arch=[64], over_arch=[64, 32])

    def build_module(self) -> CTRModule:
        return TorchRecCTRModule(
            self.feat.sparse_names,
            self.feat.sparse_sizes,
            len(self.feat.dense_features),
            int(self.p("dim")),
            list(self.p("dense_arch")),
            list(self.p("over_arch")),
            history=int(self.p("history_len")) > 0,
        )
