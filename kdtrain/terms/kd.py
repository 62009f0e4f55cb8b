"""`kd`: Hinton et al. 2015, T^2 * KL(softmax(t/T) || softmax(s/T)) averaged over the batch, at the run's
`temperature`. Weight: `kd_weight`.

`kd.standardize=true`: logit standardisation (Sun et al. 2024) z-scores each sample's logits of
student and teacher (unbiased std + 1e-7) before the softmax; `temperature` is then the base
temperature (published: 2, with ce_weight 0.1 and kd_weight 9: `mode=kd_std`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdtrain.losses import kd_loss, standardize_logits
from kdtrain.terms import Batch, Setup, Term, TermConfig, register


@dataclass
class KDConfig(TermConfig):
    standardize: bool = False  # z-score each sample's logits before the softmax (logit standardisation)


@register("kd", KDConfig, weight_key="kd_weight")
class KD(Term):
    uses_teacher_logits = True

    def __init__(self, cfg: KDConfig, setup: Setup):
        super().__init__(cfg, setup)
        self.temperature = float(setup.root.temperature) if setup.root is not None else 4.0
        self.standardize = bool(cfg.standardize) if cfg is not None else False

    def describe(self) -> list[str]:
        return [f"T={self.temperature:g}{', standardised logits' if self.standardize else ''}"]

    def forward(self, batch: Batch) -> Tensor:
        s, t = batch.student_logits, batch.teacher_logits
        if self.standardize:
            s, t = standardize_logits(s), standardize_logits(t)
        return kd_loss(s, t, self.temperature)
