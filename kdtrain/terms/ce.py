"""`ce`: cross-entropy on the labels (unlabelled samples, label -1, are left out). Weight: `ce_weight`."""

from __future__ import annotations

from torch import Tensor

from kdtrain.losses import ce_loss
from kdtrain.terms import Batch, Term, register


@register("ce", weight_key="ce_weight")
class CE(Term):
    def forward(self, batch: Batch) -> Tensor:
        return ce_loss(batch.student_logits, batch.labels)
