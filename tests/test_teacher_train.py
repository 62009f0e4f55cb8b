"""The teacher's recipe group: epochs=0 (as loaded, also chosen for a fitting pretrained head), finetune."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchvision import models

import kdtrain.teacher as teacher_module
from kdtrain.config import validate
from kdtrain.data import build_dataset
from kdtrain.errors import UserError
from kdtrain.models import build_model
from kdtrain.teacher import get_teacher, teacher_identity

CPU = torch.device("cpu")


def _teacher(cfg):
    splits = build_dataset(cfg.dataset)
    model, info = get_teacher(cfg, splits, CPU, None)
    return model, info, Path(info["source"])


def _mobilenet_file(path: Path, num_classes: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    state = models.get_model("mobilenet_v3_small", weights=None, num_classes=num_classes).state_dict()
    torch.save(state, path)
    return state


def test_epochs_0_uses_the_teacher_as_loaded(compose, tmp_path, caplog) -> None:
    cfg = compose("teacher_train.epochs=0", f"teacher_store={tmp_path}")
    with caplog.at_level(logging.INFO, logger="kdtrain"):
        _, info, folder = _teacher(cfg)
    assert "its classifier was not loaded from pretrained weights" in caplog.text  # a random head: warned
    torch.manual_seed(0)  # teacher_train.seed: the weights it was built with
    fresh = build_model({"name": "cnn", "width": 32, "hidden": 128, "dropout": 0.2}, 10, (1, 8, 8), "teacher")
    stored = load_file(str(folder / "teacher.safetensors"))
    assert all(torch.equal(stored[k], v) for k, v in fresh.state_dict().items())  # never trained
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["recipe"] == {"epochs": 0, "seed": 0} and meta["val_acc"] == pytest.approx(info["val_acc"])
    assert (folder / "metrics.jsonl").read_text() == ""


def test_a_fitting_pretrained_head_is_used_as_loaded(compose, tmp_path, caplog) -> None:
    state = _mobilenet_file(tmp_path / "digits10.pth", 10)  # e.g. fine-tuned elsewhere, for these 10 classes
    model_args = [
        "teacher=torchvision",
        "teacher.arch=mobilenet_v3_small",
        f"teacher.pretrained={tmp_path}/digits10.pth",
    ]
    cfg = compose(*model_args, f"teacher_store={tmp_path / 'store'}")
    with caplog.at_level(logging.INFO, logger="kdtrain"):
        _, _, folder = _teacher(cfg)
    assert "already has the dataset's 10 classes, so it is used as loaded" in caplog.text
    stored = load_file(str(folder / "teacher.safetensors"))
    assert torch.equal(stored["net.classifier.3.weight"], state["classifier.3.weight"])
    assert json.loads((folder / "meta.json").read_text())["recipe"]["epochs"] == 0
    # Asked to train it anyway: trained (one epoch here), into another folder of the store.
    cfg = compose(*model_args, f"teacher_store={tmp_path / 'store'}", "teacher_train.use_fitting_pretrained=false")
    _, _, trained = _teacher(cfg)
    assert trained != folder
    assert not torch.equal(
        load_file(str(trained / "teacher.safetensors"))["net.classifier.3.weight"], state["classifier.3.weight"]
    )


def test_finetune_trains_the_head_alone_first(compose, tmp_path, monkeypatch) -> None:
    calls = []
    real_fit = teacher_module.fit

    def fit(model, *args, **kwargs):
        calls.append((args[2].epochs, args[2].lr, [n for n, p in model.named_parameters() if p.requires_grad]))
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(teacher_module, "fit", fit)
    cfg = compose("teacher_train=finetune", "teacher_train.epochs=2", f"teacher_store={tmp_path}")
    assert cfg.teacher_train.lr == 0.005 and cfg.teacher_train.freeze_backbone_epochs == 1
    model, _, folder = _teacher(cfg)
    (frozen_epochs, lr, head), (rest, _, every) = calls
    assert (frozen_epochs, rest, lr) == (1, 1, 0.005)
    assert head == ["fc.weight", "fc.bias"]  # the classifier (the last nn.Linear) alone
    assert every == [n for n, _ in model.named_parameters()]
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_default_recipe_keeps_the_stored_teachers_names(compose) -> None:
    # Keys added to teacher_train leave the identity as it was at their defaults: old stores stay valid.
    recipe = teacher_identity(compose(), "off")["recipe"]
    assert recipe == {
        "epochs": 1,
        "lr": 0.05,
        "batch_size": 32,
        "seed": 0,
        "optimizer": recipe["optimizer"],
        "scheduler": recipe["scheduler"],
    }


def test_recipe_errors(compose) -> None:
    with pytest.raises(
        UserError, match=r"teacher_train.freeze_backbone_epochs=3 is out of range: .*at most teacher_train.epochs \(2\)"
    ):
        validate(compose("teacher_train.epochs=2", "teacher_train.freeze_backbone_epochs=3"))
    with pytest.raises(
        UserError,
        match=r"teacher_train.epochs=-1 is out of range: it must be an integer >= 0 \(0: the teacher as loaded\)",
    ):
        validate(compose("teacher_train.epochs=-1"))
