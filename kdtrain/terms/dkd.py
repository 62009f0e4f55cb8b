"""`dkd`: decoupled KD (Zhao et al. 2022), alpha * TCKD + beta * NCKD (see kdtrain.losses.dkd_loss).

Published CIFAR-100 defaults: alpha 1, beta 8, T 4, CE weight 1, DKD weight 1 ramped linearly over 20
warm-up epochs (beta 2 for resnet56 -> resnet20, 6 for wrn_40_2 -> wrn_16_2). For an unlabelled sample
of a transfer set (label -1) the teacher's top-1 class stands in for the label.
`dkd.standardize=true` z-scores both logits first (logit standardisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import Tensor

from kdtrain.errors import UserError
from kdtrain.losses import dkd_loss, standardize_logits
from kdtrain.terms import Batch, Term, TermConfig, register


@dataclass
class DKDConfig(TermConfig):
    weight: float = 1.0
    alpha: float = 1.0  # weight of TCKD (target vs the rest)
    beta: float = 8.0  # weight of NCKD (among the non-target classes)
    temperature: float = 4.0
    warmup_epochs: int = 20
    standardize: bool = False  # logit standardisation of both logits before the softmax


@register("dkd", DKDConfig)
class DKD(Term):
    uses_teacher_logits = True

    def forward(self, batch: Batch) -> Tensor:
        s, t = batch.student_logits, batch.teacher_logits
        labels = torch.where(batch.labels >= 0, batch.labels, t.argmax(dim=1))  # unlabelled: the teacher's top-1
        if self.cfg.standardize:
            s, t = standardize_logits(s), standardize_logits(t)
        return dkd_loss(s, t, labels, self.cfg.alpha, self.cfg.beta, self.cfg.temperature)

    @classmethod
    def check(cls, cfg: DictConfig, root: DictConfig) -> None:
        super().check(cfg, root)
        for key in ("alpha", "beta"):
            if cfg[key] < 0:
                raise UserError(f"dkd.{key}={cfg[key]} is out of range: it must be >= 0")
        if cfg.temperature <= 0:
            raise UserError(f"dkd.temperature={cfg.temperature} is out of range: it must be > 0 (e.g. 4)")
