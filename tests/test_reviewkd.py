"""ReviewKD term: HCL known answers, ABF fusion shapes and gradients, default stages."""

from __future__ import annotations

import pytest
import torch

from kdtrain.errors import UserError
from kdtrain.models import build_model
from kdtrain.terms.reviewkd import ReviewKDLoss, default_stages, hcl_loss

CPU = torch.device("cpu")


def test_hcl_known_answer_on_a_2x2_map():
    # Only the 1x1 level is smaller than 2x2: (MSE + 1/2 * MSE of the means) / (1 + 1/2).
    fs = torch.zeros(1, 1, 2, 2)
    ft = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert hcl_loss([fs], [ft]).item() == pytest.approx((0.25 + 0.5 * 0.25**2) / 1.5)


def test_hcl_known_answer_on_an_8x8_map_and_sum_over_stages():
    # Left half 1, right half 0 against zeros: full MSE 1/2; 4x4 and 2x2 pools keep the halves (MSE 1/2);
    # the 1x1 pool is 1/2 (MSE 1/4). Weights 1, 1/2, 1/4, 1/8, normalised by 1.875.
    ft = torch.zeros(1, 1, 8, 8)
    ft[..., :4] = 1.0
    one = (0.5 + 0.5 * 0.5 + 0.25 * 0.5 + 0.125 * 0.25) / 1.875
    assert hcl_loss([torch.zeros_like(ft)], [ft]).item() == pytest.approx(one)
    two = hcl_loss([torch.zeros_like(ft), torch.zeros(1, 1, 2, 2)], [ft, torch.ones(1, 1, 2, 2)])
    assert two.item() == pytest.approx(one + 1.0)  # a constant gap of 1 is 1 at every level


def test_hcl_of_identical_features_is_zero():
    f = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 1, 1)]
    assert hcl_loss(f, [x.clone() for x in f]).item() == 0.0


STUDENT = [torch.Size([2, 8, 16, 16]), torch.Size([2, 16, 8, 8]), torch.Size([2, 16])]
TEACHER = [torch.Size([2, 12, 8, 8]), torch.Size([2, 24, 4, 4]), torch.Size([2, 24])]


def test_fusion_maps_onto_the_teacher_shapes_and_gradients_reach_every_abf():
    torch.manual_seed(0)
    term = ReviewKDLoss(STUDENT, TEACHER, mid_channels=None)
    assert term.abfs[0].reduce[0].out_channels == 16  # min(512, the student's last stage channels)
    assert term.abfs[-1].attention is None and all(a.attention is not None for a in term.abfs[:-1])
    s = [torch.randn(*shape, requires_grad=True) for shape in STUDENT]
    t = [torch.randn(*shape) for shape in TEACHER]
    outs = term.fuse(s)
    assert [o.shape for o in outs] == [torch.Size([2, 12, 8, 8]), torch.Size([2, 24, 4, 4]), torch.Size([2, 24, 1, 1])]
    loss = term(s, t)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.parameters())
    assert all(x.grad.abs().sum() > 0 for x in s)


def test_stage_counts_must_match():
    with pytest.raises(UserError, match="2 student stages but 3 teacher stages"):
        ReviewKDLoss(STUDENT[1:], TEACHER, mid_channels=8)


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("resnet8x4", {}, ["layer1", "layer2", "layer3", "auto"]),
        ("wrn_16_2", {}, ["block1", "block2", "block3", "auto"]),
        ("vgg8", {}, ["block0", "block1", "block2", "block4", "auto"]),
        ("torchvision", {"arch": "resnet18"}, ["net.layer1", "net.layer2", "net.layer3", "net.layer4", "auto"]),
    ],
)
def test_default_stages(name, kwargs, expected):
    model = build_model({"name": name, **kwargs}, num_classes=10, in_shape=(3, 32, 32), role="student")
    assert default_stages(model, (3, 32, 32), CPU, "student") == expected


def test_a_model_without_feature_maps_has_the_penultimate_as_its_one_stage():
    mlp = build_model({"name": "mlp"}, num_classes=10, in_shape=(1, 8, 8), role="student")
    assert default_stages(mlp, (1, 8, 8), CPU, "student") == ["auto"]
