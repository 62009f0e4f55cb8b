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


def dkd_loss(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float, beta: float, temperature: float
) -> Tensor:
    """Decoupled KD (Zhao et al. 2022): alpha * TCKD + beta * NCKD, each T^2 * KL summed over the batch / B.

    TCKD compares the binary distributions b = [p_target, 1 - p_target] of p = softmax(z/T); NCKD the
    distributions over the non-target classes only (softmax of z/T with the target logit pushed down
    by 1000, as the reference implementation does). `labels` must be valid classes (0..C-1).
    """
    t = float(temperature)
    s, z_t = student_logits.float() / t, teacher_logits.float() / t
    target = F.one_hot(labels.long(), s.shape[1]).bool()
    batch = s.shape[0]

    def binary(z: Tensor) -> Tensor:  # log [p_target, 1 - p_target], without log(1 - p) rounding to -inf
        log_all = torch.logsumexp(z, dim=1)
        log_target = (z.masked_fill(~target, float("-inf"))).logsumexp(dim=1)
        log_other = (z.masked_fill(target, float("-inf"))).logsumexp(dim=1)
        return torch.stack([log_target, log_other], dim=1) - log_all[:, None]

    tckd = F.kl_div(binary(s), binary(z_t), reduction="sum", log_target=True) * (t * t) / batch
    log_q_s = F.log_softmax(s - 1000.0 * target, dim=1)
    log_q_t = F.log_softmax(z_t - 1000.0 * target, dim=1)
    nckd = F.kl_div(log_q_s, log_q_t, reduction="sum", log_target=True) * (t * t) / batch
    return alpha * tckd + beta * nckd


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of `a` with the same row of `b` (cosine of the centred rows; the
    denominator is clamped at `eps` rather than offset by it, so equal rows correlate exactly 1)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=eps)


def dist_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float, gamma: float, temperature: float) -> Tensor:
    """DIST (Huang et al. 2022): T^2 * [beta * (1 - mean_i pearson(y_s[i,:], y_t[i,:]))
    + gamma * (1 - mean_j pearson(y_s[:,j], y_t[:,j]))] with y = softmax(z/T): the inter-class relation
    of each sample and the intra-class relation of each class across the batch."""
    t = float(temperature)
    y_s = F.softmax(student_logits.float() / t, dim=1)
    y_t = F.softmax(teacher_logits.float() / t, dim=1)
    inter = 1 - _pearson_rows(y_s, y_t).mean()
    intra = 1 - _pearson_rows(y_s.t(), y_t.t()).mean()
    return (t * t) * (beta * inter + gamma * intra)


def _pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    square = e.pow(2).sum(dim=1)
    d = (square[:, None] + square[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))  # exactly 0 on the diagonal


def rkd_loss(student_emb: Tensor, teacher_emb: Tensor, distance_weight: float, angle_weight: float) -> Tensor:
    """Relational KD (Park et al. 2019):
    w_d * smoothL1(psi_d(e_s), psi_d(e_t)) + w_a * smoothL1(psi_a(e_s), psi_a(e_t)).

    psi_d: the pairwise distances divided by their mean over the non-zero pairs; psi_a: for every
    anchor, the cosines between the L2-normalised difference vectors to the other samples (B^3
    entries). Embeddings are flattened; student and teacher may differ in size.
    """
    s, t = student_emb.float().flatten(1), teacher_emb.float().detach().flatten(1)

    def distances(e: Tensor) -> Tensor:
        d = _pairwise_distances(e)
        return d / d[d > 0].mean()

    def angles(e: Tensor) -> Tensor:
        diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
        return torch.bmm(diff, diff.transpose(1, 2)).flatten()

    loss_d = F.smooth_l1_loss(distances(s), distances(t))
    loss_a = F.smooth_l1_loss(angles(s), angles(t))
    return distance_weight * loss_d + angle_weight * loss_a


def pkt_loss(student_emb: Tensor, teacher_emb: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018): rows L2-normalised, cosine similarities
    mapped to [0, 1] by (cos + 1) / 2 and normalised per row to sum 1 (P_s, P_t); the loss is the mean over
    the B x B entries of P_t * log((P_t + eps) / (P_s + eps))."""

    def similarities(e: Tensor) -> Tensor:
        e = e.float().flatten(1)
        e = e / (e.norm(dim=1, keepdim=True) + eps)
        p = (e @ e.t() + 1.0) / 2.0
        return p / p.sum(dim=1, keepdim=True)

    p_s, p_t = similarities(student_emb), similarities(teacher_emb.detach())
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def sp_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """Similarity-preserving KD (Tung & Mori 2019): || normalize_rows(G_s) - normalize_rows(G_t) ||_F^2 / B^2
    with G = F F^T (B x B) of the flattened features; student and teacher may differ in size."""
    batch = student_map.shape[0]
    s, t = student_map.float().flatten(1), teacher_map.float().detach().flatten(1)
    g_s = F.normalize(s @ s.t(), dim=1)
    g_t = F.normalize(t @ t.t(), dim=1)
    return (g_s - g_t).pow(2).sum() / (batch * batch)
