"""Pure loss functions. All math runs in float32, also under autocast (bf16 on CPU does not upcast
softmax by itself, and small probabilities underflow in fp16)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ce_loss(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over the labelled samples of the batch (label -1 = unlabelled).

    A batch without labels contributes 0 instead of NaN.
    """
    labelled = labels >= 0
    total = F.cross_entropy(student_logits.float(), labels.clamp(min=0), reduction="none")
    return (total * labelled).sum() / labelled.sum().clamp(min=1)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al. 2015: T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch.

    The T^2 factor keeps the gradient scale of this term independent of T.
    """
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    # log_target=True avoids log(0) for teacher probabilities that underflow.
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def standardize_logits(logits: Tensor) -> Tensor:
    """Logit standardisation (Sun et al. 2024): each sample's logits z-scored over the classes,
    (z - mean) / (std + 1e-7) with the unbiased std, in float32. Invariant to a per-sample shift and
    positive scale of the logits, so the student matches the teacher's ranking, not its logit range."""
    z = logits.float()
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + 1e-7)


def feature_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Mean squared error between the (adapted) student feature and the teacher feature."""
    return F.mse_loss(student_feature.float(), teacher_feature.float())


def total_loss(terms: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """`ce_weight*CE + kd_weight*KD + alpha*FEAT` over the terms whose weight is not 0.

    A term with weight 0 is left out of the graph, so parameters only it reaches get no gradient
    (and SGD leaves them alone, weight decay included), e.g. the classifier in FitNets' hint stage.
    """
    on = [weights[name] * value for name, value in terms.items() if weights[name] != 0]
    if not on:
        raise ValueError("every loss weight is 0")
    return torch.stack(on).sum() if len(on) > 1 else on[0]
