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
