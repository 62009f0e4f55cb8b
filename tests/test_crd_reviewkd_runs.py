"""CRD and ReviewKD end to end: the default data from the CLI, a CIFAR-zoo pair and a torchvision pair on
`dataset=fake`, and CRD's memory banks through a SIGKILL + resume (bit-identical to an uninterrupted run)."""

from __future__ import annotations

import csv
import json
import logging
import math
import signal

import pytest
import torch

from kdtrain.config import validate
from kdtrain.errors import UserError
from kdtrain.run import run
from tests.conftest import run_cli
from tests.test_resume import assert_same_run

FAST = {"crd": ["crd.nce_k=64"], "reviewkd": []}  # few negatives: the test stays quick


def rows(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def assert_trained(run_dir, term: str, weight: float) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["loss"] == {"ce": 1.0, term: weight}
    values = [float(r[term]) for r in rows(run_dir)]
    assert values and all(math.isfinite(v) and v > 0 for v in values)


@pytest.mark.parametrize("term, weight", [("crd", 0.8), ("reviewkd", 5.0)])
def test_the_preset_trains_on_the_default_data_from_the_cli(tmp_path, store, term, weight):
    run_dir = tmp_path / "run"
    args = ["epochs=2", "teacher_train.epochs=1", "progress=off", "baseline=false", f"teacher_store={store}"]
    done = run_cli(f"mode={term}", *FAST[term], *args, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_trained(run_dir, term, weight)
    assert f"loss term {term}:" in (run_dir / "kdtrain.log").read_text()


PAIRS = {
    "cifar": ["teacher=resnet14", "student=resnet8"],
    "torchvision": ["teacher=torchvision", "student=torchvision", "student.arch=mobilenet_v3_small"],
}


@pytest.mark.parametrize("pair", PAIRS)
def test_both_terms_together_for_a_few_steps_on_fake_images(tmp_path, compose, caplog, pair):
    # One run with CE + CRD + ReviewKD (free combination): both terms' modules and state on a real pair.
    cfg = compose(
        "mode=crd", "loss=[ce,crd,reviewkd]", "crd.nce_k=64", *PAIRS[pair], "dataset=fake", "epochs=1", "baseline=false"
    )
    with caplog.at_level(logging.INFO, logger="kdtrain"):
        run(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["loss"] == {"ce": 1.0, "crd": 0.8, "reviewkd": 5.0}
    for term in ("crd", "reviewkd"):
        assert all(math.isfinite(float(r[term])) and float(r[term]) > 0 for r in rows(tmp_path))
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["terms"]
    assert state["crd"]["loss.bank_s"].shape == (256, 128)  # FakeData: 256 training samples
    assert any(k.startswith("loss.abfs.") for k in state["reviewkd"])
    # The default stages, paired deepest first when the counts differ (mobilenet_v3_small has one container).
    stages = {"cifar": "reviewkd: layer3 (64, 8, 8) -> layer3 (64, 8, 8)", "torchvision": "reviewkd: net.features ("}
    assert stages[pair] in caplog.text
    if pair == "torchvision":
        assert ") -> net.layer4 (" in caplog.text and "net.layer3 (" not in caplog.text


def test_crd_banks_survive_a_sigkill_and_resume_exactly(tmp_path, store, compose):
    args = ["mode=crd", "crd.nce_k=64", "epochs=3", "teacher_train.epochs=1", "progress=off", "baseline=false"]
    args.append(f"teacher_store={store}")
    reference = tmp_path / "reference"
    run(compose(*args), reference)

    run_dir = tmp_path / "run"
    # SIGKILL right after epoch 1's last.pt (main spells the fault injection KDTRAIN_TEST_KILL_AT; both set).
    kill = {"KDTRAIN_TEST_KILL_AFTER_EPOCH": "1", "KDTRAIN_TEST_KILL_AT": "last.pt:1"}
    killed = run_cli(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path, env=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and int(saved["terms"]["crd"]["loss.steps"]) > 0

    resumed = run_cli("resume=" + str(run_dir), *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_dir, reference)
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True)["terms"]["crd"] for d in (run_dir, reference))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # banks, Z, heads, step counter


@pytest.mark.parametrize(
    "pair, reviewkd_weight",
    [("resnet32x4_resnet8x4", 5.0), ("wrn_40_2_wrn_16_2", 5.0), ("resnet56_resnet20", 0.6)],
)
def test_cifar100_recipes_carry_the_published_weights(compose, pair, reviewkd_weight):
    crd = compose(f"experiment=cifar100_{pair}_crd")
    validate(crd)
    assert (list(crd.loss), crd.ce_weight, crd.crd.weight, crd.crd.nce_k, crd.crd.nce_t) == (
        ["ce", "crd"],
        1.0,
        0.8,
        16384,
        0.07,
    )
    review = compose(f"experiment=cifar100_{pair}_reviewkd")
    validate(review)
    assert (list(review.loss), review.ce_weight, review.reviewkd.weight, review.reviewkd.warmup_epochs) == (
        ["ce", "reviewkd"],
        1.0,
        reviewkd_weight,
        20,
    )
    for cfg in (crd, review):
        assert (cfg.lr, cfg.batch_size, cfg.dataset.name, list(cfg.scheduler.milestones)) == (
            0.05,
            64,
            "cifar100",
            [150, 180, 210],
        )


@pytest.mark.parametrize(
    "override, message",
    [
        ("crd.nce_t=0", "crd.nce_t=0.0 is out of range"),
        ("crd.momentum=1", "crd.momentum=1.0 is out of range"),
        ("crd.nce_k=0", "crd.nce_k=0 is out of range"),
        ("reviewkd.mid_channels=0", "reviewkd.mid_channels=0 is out of range"),
        (
            "reviewkd.student_stages=[layer1,layer2] reviewkd.teacher_stages=[layer1]",
            "reviewkd.student_stages has 2 paths and reviewkd.teacher_stages 1",
        ),
    ],
)
def test_bad_options_get_one_clear_error(compose, override, message):
    mode = override.split(".")[0]
    with pytest.raises(UserError, match=message):
        validate(compose(f"mode={mode}", *override.split()))
