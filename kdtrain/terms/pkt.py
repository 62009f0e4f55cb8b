"""`pkt`: probabilistic knowledge transfer (Passalis & Tefas 2018) on the penultimate embeddings (or
`pkt.student` / `pkt.teacher` module paths): the KL divergence between the batch's cosine-similarity
distributions; CE weight 1, PKT weight 30000 (RepDistiller)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdtrain.losses import pkt_loss
from kdtrain.terms import Batch, LayerPairConfig, LayerPairTerm, register


@dataclass
class PKTConfig(LayerPairConfig):
    weight: float = 30000.0


@register("pkt", PKTConfig)
class PKT(LayerPairTerm):
    def forward(self, batch: Batch) -> Tensor:
        return pkt_loss(*self.pair(batch))
