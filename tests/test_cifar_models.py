"""The CIFAR model zoo (kdtrain/models/cifar.py): shapes, sizes and the penultimate feature."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kdtrain.models import build_model, count_params, known_models

# Parameter counts for num_classes=100, 3x32x32 inputs, from the KD benchmark tables
# (CRD / RepDistiller, mdistiller). Where a table gives too few digits for a 3% check
# (resnet8 "0.08M", resnet14) or no figure (vgg11), the value is derived from the published
# architecture definitions (RepDistiller models/): resnet8 = 83,892, resnet14 = 181,108,
# vgg11 (configuration "A" with BatchNorm) = 9,277,284.
PUBLISHED_PARAMS = {
    "resnet8": 0.084e6,
    "resnet14": 0.181e6,
    "resnet20": 0.278e6,
    "resnet32": 0.47e6,
    "resnet44": 0.67e6,
    "resnet56": 0.86e6,
    "resnet110": 1.74e6,
    "resnet8x4": 1.23e6,
    "resnet32x4": 7.43e6,
    "wrn_16_1": 0.18e6,
    "wrn_16_2": 0.70e6,
    "wrn_40_1": 0.57e6,
    "wrn_40_2": 2.26e6,
    "vgg8": 3.96e6,
    "vgg11": 9.28e6,
    "vgg13": 9.46e6,
    "mobilenetv2": 0.81e6,
    "shufflenetv2": 1.36e6,
}
CIFAR_MODELS = sorted(PUBLISHED_PARAMS)
ROOT = Path(__file__).resolve().parents[1]


def _build(name: str, num_classes: int = 100, in_shape: tuple[int, int, int] = (3, 32, 32)) -> nn.Module:
    return build_model({"name": name}, num_classes, in_shape, role="student").eval()


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears, "model has no nn.Linear"
    return linears[-1]


def test_all_registered() -> None:
    known = set(known_models())
    missing = [n for n in CIFAR_MODELS if n not in known]
    assert not missing, f"not registered: {missing}"


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_forward_and_penultimate(name: str) -> None:
    model = _build(name)
    fc = _last_linear(model)
    seen: list[torch.Size] = []
    handle = fc.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    handle.remove()
    assert out.shape == (2, 100)
    assert torch.isfinite(out).all()
    # The last Linear is the classifier: called once, on the flat penultimate feature.
    assert fc.out_features == 100
    assert seen == [torch.Size([2, fc.in_features])]


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_grayscale_small_input(name: str) -> None:
    model = _build(name, num_classes=10, in_shape=(1, 28, 28))
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "mobilenetv2", "shufflenetv2"])
def test_tiny_input(name: str) -> None:
    model = _build(name, num_classes=10, in_shape=(1, 8, 8))
    with torch.no_grad():
        out = model(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_param_count(name: str) -> None:
    n = count_params(_build(name))
    expected = PUBLISHED_PARAMS[name]
    assert abs(n - expected) / expected < 0.03, f"{name}: {n / 1e6:.3f}M params, expected ~{expected / 1e6:.2f}M"


def test_feature_layer_names() -> None:
    names = {
        "resnet20": ["conv1", "bn1", "layer1", "layer2", "layer3", "fc"],
        "resnet8x4": ["conv1", "bn1", "layer1", "layer2", "layer3", "fc"],
        "wrn_40_2": ["conv1", "block1", "block2", "block3", "bn1", "fc"],
        "vgg13": ["block0", "block1", "block2", "block3", "block4", "classifier"],
        "mobilenetv2": ["conv1", "blocks", "conv2", "classifier"],
        "shufflenetv2": ["conv1", "bn1", "layer1", "layer2", "layer3", "conv2", "bn2", "linear"],
    }
    for model_name, modules in names.items():
        present = dict(_build(model_name).named_modules())
        for m in modules:
            assert m in present, f"{model_name} has no submodule {m!r}"


def test_no_inplace_relu() -> None:
    for name in CIFAR_MODELS:
        for mod_name, m in _build(name).named_modules():
            assert not getattr(m, "inplace", False), f"{name}.{mod_name} is in-place"


def test_init() -> None:
    model = _build("resnet20")
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)
    assert model.conv1.weight.std() > 0


def test_config_files() -> None:
    for name in CIFAR_MODELS:
        teacher = (ROOT / "conf" / "teacher" / f"{name}.yaml").read_text().split("\n")
        student = (ROOT / "conf" / "student" / f"{name}.yaml").read_text().split("\n")
        assert teacher[:2] == [f"name: {name}", "checkpoint: null"]
        assert student[0] == f"name: {name}"
