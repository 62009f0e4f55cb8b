"""`sp`: similarity-preserving KD (Tung & Mori 2019): the batch's row-normalised Gram matrices of a
feature (the penultimate by default; the papers use the last stage's map, e.g. `sp.student=layer3
sp.teacher=layer3` on the CIFAR ResNets) compared by squared Frobenius norm / B^2; CE weight 1, SP
weight 3000 (RepDistiller)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdtrain.losses import sp_loss
from kdtrain.terms import Batch, LayerPairConfig, LayerPairTerm, register


@dataclass
class SPConfig(LayerPairConfig):
    weight: float = 3000.0


@register("sp", SPConfig)
class SP(LayerPairTerm):
    def forward(self, batch: Batch) -> Tensor:
        return sp_loss(*self.pair(batch))
