"""`dist`: DIST (Huang et al. 2022), 1 - Pearson correlation of the softened distributions between each
sample's classes (inter-class, weight `beta`) and between each class's samples across the batch
(intra-class, weight `gamma`), times tau^2 (see kdtrain.losses.dist_loss).

Published CIFAR defaults: beta = gamma = 1, tau 4, CE weight 1, DIST weight 2 (ImageNet: tau 1).
`dist.standardize=true` z-scores both logits first (logit standardisation).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig
from torch import Tensor

from kdtrain.errors import UserError
from kdtrain.losses import dist_loss, standardize_logits
from kdtrain.terms import Batch, Term, TermConfig, register


@dataclass
class DISTConfig(TermConfig):
    weight: float = 2.0
    beta: float = 1.0  # inter-class relation (each sample's distribution)
    gamma: float = 1.0  # intra-class relation (each class across the batch)
    tau: float = 4.0  # temperature
    standardize: bool = False


@register("dist", DISTConfig)
class DIST(Term):
    uses_teacher_logits = True

    def forward(self, batch: Batch) -> Tensor:
        s, t = batch.student_logits, batch.teacher_logits
        if self.cfg.standardize:
            s, t = standardize_logits(s), standardize_logits(t)
        return dist_loss(s, t, self.cfg.beta, self.cfg.gamma, self.cfg.tau)

    @classmethod
    def check(cls, cfg: DictConfig, root: DictConfig) -> None:
        super().check(cfg, root)
        for key in ("beta", "gamma"):
            if cfg[key] < 0:
                raise UserError(f"dist.{key}={cfg[key]} is out of range: it must be >= 0")
        if cfg.tau <= 0:
            raise UserError(f"dist.tau={cfg.tau} is out of range: it must be > 0 (e.g. 4)")
