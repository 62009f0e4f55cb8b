"""Known answers for the loss functions, computed by hand."""

import math

import pytest
import torch

from kdtrain.losses import ce_loss, feature_loss, kd_loss, total_loss

KL_75_25 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL([.75,.25] || [.5,.5]) = 0.130812


def test_ce_ignores_unlabelled_samples():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert ce_loss(logits, torch.tensor([0, -1])).item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    assert ce_loss(logits, torch.tensor([0, 1])).item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


def test_ce_without_labels_is_zero_not_nan():
    assert ce_loss(torch.randn(3, 4), torch.tensor([-1, -1, -1])).item() == 0.0


def test_kd_known_answer_at_t1():
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax = [0.75, 0.25]
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx(KL_75_25, rel=1e-5)


def test_kd_has_t_squared_factor():
    student = torch.zeros(1, 2)
    teacher = torch.tensor([[2 * math.log(3.0), 0.0]])  # at T=2 the same [0.75, 0.25]
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(4 * KL_75_25, rel=1e-5)


def test_kd_is_batch_mean_and_zero_for_equal_logits():
    student = torch.zeros(2, 2)
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx(KL_75_25 / 2, rel=1e-5)
    same = torch.randn(4, 5)
    assert kd_loss(same, same.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_gradient_is_t_times_probability_gap():
    # d/ds [T^2 KL(p_t || p_s)] = T (p_s - p_t) / B: the scale does not shrink as T grows.
    t, batch = 4.0, 3
    student = torch.randn(batch, 5, requires_grad=True)
    teacher = torch.randn(batch, 5)
    kd_loss(student, teacher, t).backward()
    expected = t * (torch.softmax(student / t, 1) - torch.softmax(teacher / t, 1)) / batch
    torch.testing.assert_close(student.grad, expected.detach(), rtol=1e-4, atol=1e-6)


def test_losses_are_float32_under_bf16_autocast():
    student = torch.randn(8, 10).bfloat16()
    teacher = torch.randn(8, 10).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kd = kd_loss(student, teacher, 4.0)
        ce = ce_loss(student, torch.arange(8) % 10)
        feat = feature_loss(student, teacher)
    assert kd.dtype == ce.dtype == feat.dtype == torch.float32
    ref = kd_loss(student.double(), teacher.double(), 4.0)
    assert kd.item() == pytest.approx(ref.item(), rel=1e-5)


def test_feature_mse_and_total():
    assert feature_loss(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)).item() == pytest.approx(2.5)
    terms = {"ce": torch.tensor(2.0), "kd": torch.tensor(3.0), "feat": torch.tensor(5.0)}
    assert total_loss(terms, {"ce": 0.1, "kd": 0.9, "feat": 2.0}).item() == pytest.approx(0.2 + 2.7 + 10.0)


# --- the field's methods (issue #15): known answers by hand, identities, gradients --------------------


def test_standardize_logits_known_answer_and_invariance():
    from kdtrain.losses import standardize_logits

    z = torch.tensor([[1.0, 2.0, 3.0]])  # mean 2, unbiased std 1
    torch.testing.assert_close(standardize_logits(z), torch.tensor([[-1.0, 0.0, 1.0]]) / (1 + 1e-7))
    logits = torch.randn(4, 7)
    shift, scale = torch.randn(4, 1) * 5, torch.rand(4, 1) * 3 + 0.1  # per sample
    torch.testing.assert_close(
        standardize_logits(logits * scale + shift), standardize_logits(logits), atol=1e-5, rtol=0
    )


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_dkd_known_answer_tckd_and_nckd():
    from kdtrain.losses import dkd_loss

    # Teacher softmax [0.2, 0.6, 0.2] at T=2 (logits doubled), student uniform, label 0:
    # TCKD = KL([.2, .8] || [1/3, 2/3]); NCKD = KL([.75, .25] || [.5, .5]); both times T^2 = 4.
    teacher = 2 * torch.tensor([[0.0, math.log(3.0), 0.0]])
    student = torch.zeros(1, 3)
    tckd = _kl([0.2, 0.8], [1 / 3, 2 / 3])
    nckd = _kl([0.75, 0.25], [0.5, 0.5])
    got = dkd_loss(student, teacher, torch.tensor([0]), alpha=1.5, beta=8.0, temperature=2.0)
    assert got.item() == pytest.approx(4 * (1.5 * tckd + 8.0 * nckd), rel=1e-5)
    # Summed over the batch, divided by B: a second, identical-to-teacher sample halves it.
    two = dkd_loss(torch.cat([student, teacher]), torch.cat([teacher, teacher]), torch.tensor([0, 0]), 1.5, 8.0, 2.0)
    assert two.item() == pytest.approx(got.item() / 2, rel=1e-5)


def test_dkd_recovers_kd_and_its_gradient():
    # Per sample, KD = TCKD + (1 - p_t[target]) * NCKD (Zhao et al. 2022, eq. 4); so is the gradient,
    # T (p_s - p_t) / B, a closed form.
    from kdtrain.losses import dkd_loss

    t, label = 4.0, torch.tensor([2])
    student = torch.randn(1, 6, requires_grad=True)
    teacher = torch.randn(1, 6) * 3
    p_target = torch.softmax(teacher / t, 1)[0, 2].item()
    loss = dkd_loss(student, teacher, label, alpha=1.0, beta=1 - p_target, temperature=t)
    assert loss.item() == pytest.approx(kd_loss(student, teacher, t).item(), rel=1e-5)
    loss.backward()
    expected = t * (torch.softmax(student / t, 1) - torch.softmax(teacher / t, 1))
    torch.testing.assert_close(student.grad, expected.detach(), rtol=1e-4, atol=1e-6)


def test_dist_known_answer_and_numpy_reference():
    import numpy as np

    from kdtrain.losses import dist_loss

    # y_t = [[.75, .25], [.25, .75]], y_s swapped: every row and column correlates -1, so each relation is 2.
    teacher = 2 * torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    student = teacher.flip(1)
    assert dist_loss(student, teacher, beta=1.0, gamma=0.5, temperature=2.0).item() == pytest.approx(4 * 3.0, rel=1e-5)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    y_s, y_t = torch.softmax(s / 3, 1).double().numpy(), torch.softmax(t / 3, 1).double().numpy()
    inter = 1 - np.mean([np.corrcoef(y_s[i], y_t[i])[0, 1] for i in range(5)])
    intra = 1 - np.mean([np.corrcoef(y_s[:, j], y_t[:, j])[0, 1] for j in range(4)])
    assert dist_loss(s, t, 2.0, 1.0, 3.0).item() == pytest.approx(9 * (2 * inter + intra), rel=1e-4)


def _smooth_l1(a: list[float], b: list[float]) -> float:
    d = [abs(x - y) for x, y in zip(a, b)]
    return sum(0.5 * v * v if v < 1 else v - 0.5 for v in d) / len(d)


def _relations(points: list[list[float]]) -> tuple[list[float], list[float]]:
    """RKD's psi_d and psi_a by explicit loops."""
    n = len(points)
    dist = [[math.dist(points[i], points[j]) for j in range(n)] for i in range(n)]
    mean = sum(d for row in dist for d in row if d > 0) / sum(1 for row in dist for d in row if d > 0)
    psi_d = [d / mean for row in dist for d in row]

    def unit(i: int, j: int) -> list[float]:
        v = [a - b for a, b in zip(points[j], points[i])]
        norm = math.hypot(*v)
        return [x / norm for x in v] if norm > 0 else [0.0] * len(v)

    psi_a = [sum(a * b for a, b in zip(unit(i, j), unit(i, k))) for i in range(n) for j in range(n) for k in range(n)]
    return psi_d, psi_a


def test_rkd_known_answer_and_identities():
    from kdtrain.losses import rkd_loss

    teacher = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    student = [[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]]
    (td, ta), (sd, sa) = _relations(teacher), _relations(student)
    expected = 25 * _smooth_l1(sd, td) + 50 * _smooth_l1(sa, ta)
    got = rkd_loss(torch.tensor(student), torch.tensor(teacher), 25.0, 50.0)
    assert got.item() == pytest.approx(expected, rel=1e-5) and expected > 0
    e = torch.randn(6, 5)
    assert rkd_loss(e, e.clone(), 25.0, 50.0).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_loss(3 * e, e, 25.0, 50.0).item() == pytest.approx(0.0, abs=1e-5)  # relations ignore scale


def test_pkt_known_answer_and_identity():
    from kdtrain.losses import pkt_loss

    # Teacher rows orthogonal: P_t = [[2/3, 1/3], [1/3, 2/3]]; student rows equal: P_s = 1/2 everywhere.
    got = pkt_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    expected = 2 * (2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)) / 4
    assert got.item() == pytest.approx(expected, rel=1e-4)
    e = torch.randn(5, 8)
    assert pkt_loss(e, e.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_sp_known_answer_and_identity():
    from kdtrain.losses import sp_loss

    # G_t = I; G_s = all ones, rows normalised to 1/sqrt(2): each row differs by (1 - 1/sqrt 2)^2 + 1/2.
    got = sp_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert got.item() == pytest.approx(2 * ((1 - 2**-0.5) ** 2 + 0.5) / 4, rel=1e-5)
    maps = torch.randn(4, 3, 5, 5)
    assert sp_loss(maps, maps.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert sp_loss(maps, torch.randn(4, 7, 2, 2)).item() > 0  # sizes may differ: B x B Gram matrices


def test_logit_identities_and_float32_under_bf16():
    from kdtrain.losses import dist_loss, dkd_loss

    z = torch.randn(8, 10)
    labels = torch.arange(8) % 10
    assert dkd_loss(z, z.clone(), labels, 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert dist_loss(z, z.clone(), 1.0, 1.0, 4.0).item() == pytest.approx(0.0, abs=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, t = z.bfloat16(), torch.randn(8, 10).bfloat16()
        assert dkd_loss(s, t, labels, 1.0, 8.0, 4.0).dtype == dist_loss(s, t, 1.0, 1.0, 4.0).dtype == torch.float32
