"""DCNv2 (Wang et al. 2021) on TorchRec: ``torchrec.models.dlrm.DLRM_DCN``, i.e. DLRM with the
pairwise interaction replaced by a low-rank cross network over [dense; embeddings]. Same
features, training and model-parallel path as :mod:`reasonrec.tools.dlrm`."""

from __future__ import annotations

from typing import Any

from reasonrec.tools.base import register
from reasonrec.tools.ctr_torch import CTRModule, NeuralCTRTool
from reasonrec.tools.dlrm import TorchRecCTRModule


@register
class DCNv2Tool(NeuralCTRTool):
    name = "dcnv2"
    uses_torchrec = True
    model_defaults: dict[str, Any] = dict(
        NeuralCTRTool.model_defaults, dense_arch=[64], over_arch=[64, 32], dcn_layers=3, dcn_rank=16
    )

    def build_module(self) -> CTRModule:
        return TorchRecCTRModule(
            self.feat.sparse_names,
            self.feat.sparse_sizes,
            len(self.feat.dense_features),
            int(self.p("dim")),
            list(self.p("dense_arch")),
            list(self.p("over_arch")),
            dcn_layers=int(self.p("dcn_layers")),
            dcn_rank=int(self.p("dcn_rank")),
            history=int(self.p("history_len")) > 0,
        )
