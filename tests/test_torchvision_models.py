"""torchvision (and timm) models by name, offline pretrained weights, user models through the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from torch import nn
from torchvision import models

from kdtrain.config import register_schema, validate
from kdtrain.errors import UserError
from kdtrain.features import AUTO, Capture, classifier_name
from kdtrain.models import build_model, known_models
from kdtrain.models.tv import InputAdapter, check_forward

TESTS = Path(__file__).resolve().parent
ARCHS = ["resnet18", "mobilenet_v3_small"]
register_schema()


def tv(arch: str, num_classes: int = 10, in_shape: tuple[int, int, int] = (3, 32, 32), **kw) -> nn.Module:
    return build_model({"name": "torchvision", "arch": arch, **kw}, num_classes, in_shape, "student")


@pytest.mark.parametrize("in_shape", [(1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("arch", ARCHS)
def test_builds_and_returns_logits(arch: str, in_shape: tuple[int, int, int]) -> None:
    model = tv(arch, 10, in_shape).train()
    hook = Capture(model, [AUTO], "student")
    logits = model(torch.randn(2, *in_shape))
    assert logits.shape == (2, 10)
    # The classifier is the last nn.Linear: its input is the penultimate feature kdtrain hooks.
    last = model.get_submodule(classifier_name(model, "student"))
    assert last.out_features == 10
    assert hook.pop()[0].flatten(1).shape == (2, last.in_features)
    hook.remove()


def _save_imagenet_weights(path: Path, arch: str = "mobilenet_v3_small") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = models.get_model(arch, weights=None, num_classes=1000).state_dict()
    torch.save(state, path)
    return state


def test_pretrained_file_loads_backbone_and_reinits_classifier(tmp_path: Path) -> None:
    state = _save_imagenet_weights(tmp_path / "imagenet.pth")
    model = tv("mobilenet_v3_small", 10, (3, 32, 32), pretrained=str(tmp_path / "imagenet.pth"))
    own = model.net.state_dict()
    assert torch.equal(own["features.0.0.weight"], state["features.0.0.weight"])
    assert torch.equal(own["classifier.0.weight"], state["classifier.0.weight"])
    assert own["classifier.3.weight"].shape == (10, 1024)  # 1000-class head left out, freshly initialised
    # Same number of classes: the head loads too.
    model = tv("mobilenet_v3_small", 1000, (3, 32, 32), pretrained=str(tmp_path / "imagenet.pth"))
    assert torch.equal(model.net.state_dict()["classifier.3.weight"], state["classifier.3.weight"])


def test_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"pretrained=.*missing\.pth is not a file"):
        tv("resnet18", pretrained=str(tmp_path / "missing.pth"))
    _save_imagenet_weights(tmp_path / "mobilenet.pth")
    with pytest.raises(UserError, match=r"is not a state dict of resnet18: missing keys"):
        tv("resnet18", pretrained=str(tmp_path / "mobilenet.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"pretrained weights .*junk\.pth"):  # refused, never unpickled
        tv("resnet18", pretrained=str(tmp_path / "junk.pth"))


def test_unknown_arch_lists_close_matches() -> None:
    with pytest.raises(
        UserError, match=r"arch=resnet5 is not a torchvision classification model \(close matches: resnet50"
    ):
        tv("resnet5")


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(
        UserError,
        match=r"student=torchvison is not a known model \(did you mean torchvision\?\); known models: .*torchvision",
    ):
        build_model({"name": "torchvison"}, 10, (3, 32, 32), "student")
    assert {"torchvision", "timm"} <= set(known_models())


class _Needs224(nn.Module):
    """Fails like torchvision's ViT on another input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[-1] == 224, f"Wrong image width! Expected 224 but got {x.shape[-1]}!")
        return x.flatten(1)[:, :10]


def test_input_too_small_for_arch() -> None:
    with pytest.raises(
        UserError,
        match=r"arch=vit_b_16 cannot run on inputs of shape \(3, 32, 32\) \(Wrong image width.*dataset.image_size",
    ):
        check_forward(InputAdapter(_Needs224(), 3), (3, 32, 32), "vit_b_16")


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_timm_missing() -> None:
    with pytest.raises(UserError, match=r"pip install 'kdtrain\[timm\]'"):
        build_model({"name": "timm", "arch": "resnet18"}, 10, (3, 32, 32), "student")


def test_configs_compose() -> None:
    with hydra.initialize_config_module(config_module="kdtrain.conf", version_base="1.3"):
        cfg = hydra.compose(
            "config",
            overrides=[
                "teacher=torchvision",
                "teacher.arch=resnet50",
                "student=torchvision",
                "student.pretrained=DEFAULT",
                "dataset=cifar10",
            ],
        )
    validate(cfg)
    assert cfg.teacher.arch == "resnet50" and cfg.teacher.checkpoint is None and cfg.teacher.pretrained is None
    assert cfg.student.arch == "resnet18" and cfg.student.pretrained == "DEFAULT"


def test_user_model_through_cli(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdtrain",
            "dataset=fake",
            "student=custom",
            "student._target_=_user_models.TinyNet",
            "+student.width=8",
            "teacher=mlp",
            "epochs=1",
            "teacher_train.epochs=1",
            "batch_size=32",
            "teacher_train.batch_size=32",
            "baseline=false",
            "progress=off",
            "device=cpu",
            f"hydra.run.dir={tmp_path / 'run'}",
            f"teacher_store={tmp_path / 'teachers'}",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["student"]["params"] == 3 * 8 * 9 + 8 + 8 * 10 + 10  # conv + fc of TinyNet(width=8), 3 channels
