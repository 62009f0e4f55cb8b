"""kdtrain-inspect: the layer table of the model a command line builds, without loading dataset files;
and the CIFAR-100 recipes compose into valid configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import hydra
import pytest

from kdtrain.config import register_schema, validate
from kdtrain.inspect import main
from kdtrain.models import build_model, count_params
from tests._dataset_files import write_imagefolder

ROOT = Path(__file__).resolve().parents[1]
register_schema()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps long module paths on a narrow console


def test_student_table(capsys: pytest.CaptureFixture[str]) -> None:
    # dataset.root points nowhere: the shape comes from the dataset's config, not its files.
    main(["student=resnet20", "dataset=cifar10", "dataset.root=/nonexistent"])
    out = capsys.readouterr().out
    assert "student=resnet20" in out
    assert "cifar10: 10 classes, input (3, 32, 32)" in out
    for path, shape in (
        ("conv1", "1x16x32x32"),
        ("layer2.0.conv1", "1x32x16x16"),
        ("layer3.2.bn2", "1x64x8x8"),
        ("fc", "1x10"),
    ):
        line = next(line for line in out.splitlines() if f" {path} " in line)
        assert shape in line, line
    assert "│    432 │" in out  # conv1's own parameters: 3 * 16 * 3 * 3
    total = count_params(build_model({"name": "resnet20"}, 10, (3, 32, 32), "student"))
    assert f"parameters: {total:,}" in out
    assert "penultimate feature: input of fc (64)" in out


def test_teacher_torchvision_on_mnist(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--teacher", "teacher=torchvision", "teacher.arch=mobilenet_v3_small", "dataset=mnist"])
    out = capsys.readouterr().out
    assert "teacher=torchvision (mobilenet_v3_small)" in out
    assert "mnist: 10 classes, input (1, 28, 28)" in out
    assert "InputAdapter" in out and "net.classifier.3" in out
    assert "penultimate feature: input of net.classifier.3 (1024)" in out


def test_imagefolder_classes_from_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_imagefolder(tmp_path, classes=("a", "b", "c", "d"), mode="L", per_class=(1, 1))
    main(["student=cnn", "dataset=imagefolder", f"dataset.root={tmp_path}", "dataset.image_size=24"])
    assert "imagefolder: 4 classes, input (1, 24, 24)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["student=resnt20"], "student=resnt20 is not a known option (did you mean resnet20"),
        (["--depth", "3"], "--depth is not an option of kdtrain-inspect"),
        (["dataset=imagefolder"], "set dataset.root=PATH"),
    ],
)
def test_errors(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("kdtrain-inspect: error: ") and message in err and err.count("\n") == 1


def test_entry_point(tmp_path: Path) -> None:
    exe = shutil.which("kdtrain-inspect")
    cmd = [exe] if exe else [sys.executable, "-m", "kdtrain.inspect"]
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [*cmd, "student=wrn_16_2", "dataset=cifar100"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cifar100: 100 classes, input (3, 32, 32)" in proc.stdout and "WideResNet" in proc.stdout


RECIPES = {
    ("resnet32x4", "resnet8x4"),
    ("wrn_40_2", "wrn_16_2"),
    ("resnet56", "resnet20"),
}


@pytest.mark.parametrize("method", ["kd", "fitnet"])
@pytest.mark.parametrize(("teacher", "student"), sorted(RECIPES))
def test_recipes(teacher: str, student: str, method: str) -> None:
    name = f"cifar100_{teacher}_{student}_{method}"
    assert (ROOT / "conf" / "experiment" / f"{name}.yaml").read_text().startswith("# @package _global_\n")
    with hydra.initialize_config_module(config_module="kdtrain.conf", version_base="1.3"):
        cfg = hydra.compose("config", overrides=[f"experiment={name}"])
    validate(cfg)
    assert (cfg.teacher.name, cfg.student.name, cfg.dataset.name) == (teacher, student, "cifar100")
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.baseline) == (240, 0.05, 64, False)
    assert (cfg.optimizer.name, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == ("sgd", 0.9, 5e-4)
    assert (cfg.scheduler.name, list(cfg.scheduler.milestones), cfg.scheduler.gamma) == (
        "multistep",
        [150, 180, 210],
        0.1,
    )
    t = cfg.teacher_train
    assert (t.epochs, t.lr, t.batch_size, t.scheduler.name, list(t.scheduler.milestones)) == (
        240,
        0.05,
        64,
        "multistep",
        [150, 180, 210],
    )
    assert cfg.dataset.augment is True and cfg.temperature == 4.0
    if method == "kd":
        assert (cfg.mode.value, cfg.ce_weight, cfg.kd_weight) == ("soft", 0.1, 0.9)
    else:
        assert (cfg.mode.value, cfg.alpha) == ("feature", 100.0)
