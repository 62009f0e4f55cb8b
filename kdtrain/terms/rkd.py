"""`rkd`: relational KD (Park et al. 2019) on the penultimate embeddings (or `rkd.student` / `rkd.teacher`
module paths): the distance and angle relations between the samples of a batch, compared by smooth-L1
with internal weights 25 (distance) and 50 (angle); CE weight 1, RKD weight 1 (RepDistiller)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdtrain.losses import rkd_loss
from kdtrain.terms import Batch, LayerPairConfig, LayerPairTerm, register


@dataclass
class RKDConfig(LayerPairConfig):
    weight: float = 1.0
    distance_weight: float = 25.0
    angle_weight: float = 50.0


@register("rkd", RKDConfig)
class RKD(LayerPairTerm):
    def forward(self, batch: Batch) -> Tensor:
        return rkd_loss(*self.pair(batch), self.cfg.distance_weight, self.cfg.angle_weight)
