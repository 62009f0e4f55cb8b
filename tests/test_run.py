"""Tiny end-to-end runs: every mode writes every output, the teacher store is reused, runs are deterministic."""

import csv
import json
import logging

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from kdtrain import engine
from kdtrain.data import build_dataset
from kdtrain.errors import UserError
from kdtrain.models import build_model
from kdtrain.report import COLUMNS
from kdtrain.run import run
from tests.conftest import run_cli


@pytest.mark.parametrize("mode", ["soft", "feature", "combined", "none"])
def test_tiny_run_writes_every_output(compose, tmp_path, mode):
    cfg = compose(f"mode={mode}")
    best = run(cfg, tmp_path)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert list(rows[0]) == COLUMNS
    with open(tmp_path / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and list(table[0]) == COLUMNS
    assert float(table[1]["val_acc"]) == pytest.approx(rows[1]["val_acc"])
    assert rows[-1]["kd"] > 0 if mode in ("soft", "combined") else rows[-1]["kd"] == 0
    assert rows[-1]["feat"] > 0 if mode in ("feature", "combined") else rows[-1]["feat"] == 0

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == mode
    assert 0 <= summary["teacher"]["val_acc"] <= 1 and summary["teacher"]["params"] > summary["student"]["params"]
    assert summary["student"]["best_val_acc"] == best == max(r["val_acc"] for r in rows)
    assert summary["student"]["last_val_acc"] == rows[-1]["val_acc"]
    assert summary["seconds"] > 0
    assert (summary["baseline"] is None) == (mode == "none")
    weights = summary["weights"]
    assert (weights["kd_weight"] > 0) == (mode in ("soft", "combined"))
    assert (weights["alpha"] > 0) == (mode in ("feature", "combined"))

    for name in ("last.pt", "best.pt"):
        state = torch.load(tmp_path / "checkpoints" / name, weights_only=True)
        assert {"model", "adapter", "optimizer", "scheduler", "scaler", "epoch", "rng", "config"} <= set(state)
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["config"]["mode"] == mode
    weights_file = load_file(tmp_path / "student.safetensors")
    for key, value in last["model"].items():
        torch.testing.assert_close(weights_file[key], value)
    if mode in ("feature", "combined"):
        assert last["adapter"], "the adapter (32 -> 128) is training state"


def test_teacher_store_is_reused(compose, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kdtrain")
    run(compose("baseline=false"), tmp_path / "a")
    first = json.loads((tmp_path / "a" / "summary.json").read_text())["teacher"]
    caplog.clear()
    run(compose("baseline=false", "seed=1"), tmp_path / "b")
    second = json.loads((tmp_path / "b" / "summary.json").read_text())["teacher"]
    assert "teacher: reusing" in caplog.text and "training it once" not in caplog.text
    assert first == second


def test_same_seed_gives_identical_metrics(compose, tmp_path):
    for name in ("a", "b"):
        run(compose("mode=combined", "baseline=false"), tmp_path / name)
    a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()

    def strip(rows):
        return [{k: v for k, v in json.loads(r).items() if k not in ("samples_per_sec", "epoch_seconds")} for r in rows]

    assert strip(a) == strip(b)
    wa, wb = (load_file(tmp_path / name / "student.safetensors") for name in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit-identical weights, not just equal metrics


def test_labelled_subset_and_excluded_classes(compose, tmp_path):
    cfg = compose("dataset.labelled_per_class=5", "dataset.exclude_classes=[3]", "baseline=false")
    full = build_dataset(compose("dataset.labelled_per_class=null").dataset)  # every training label
    splits = build_dataset(cfg.dataset)
    y = splits.train.y
    # 5 labels per class for every class but the hidden 3, which has no sample at all in the transfer set.
    assert [int((y == c).sum()) for c in range(10)] == [5, 5, 5, 0, 5, 5, 5, 5, 5, 5]
    threes = int((full.teacher_train.y == 3).sum())
    assert len(splits.train) == len(full.teacher_train) - threes  # the unlabelled rest stays, minus the 3s
    assert int((splits.teacher_train.y == 3).sum()) == 5  # the teacher still learns the class
    run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # val_acc_excluded is the final student's accuracy on the validation 3s (computed here independently).
    student = build_model(OmegaConf.to_container(cfg.student), 10, splits.in_shape, "student").eval()
    student.load_state_dict(load_file(tmp_path / "student.safetensors"))
    with torch.no_grad():
        threes = splits.val.x[splits.val.y == 3]
        acc = (student(threes).argmax(1) == 3).float().mean().item()
    assert rows[-1]["val_acc_excluded"] == pytest.approx(acc)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["student"]["last_val_acc_excluded"] == rows[-1]["val_acc_excluded"]


def test_run_refuses_to_overwrite_a_finished_run(compose, tmp_path):
    run(compose("baseline=false"), tmp_path)
    before = (tmp_path / "summary.json").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        run(compose("baseline=false"), tmp_path)
    assert (tmp_path / "summary.json").read_bytes() == before


def test_cli_end_to_end(tmp_path, store):
    run_dir = tmp_path / "run"
    result = run_cli(
        "epochs=2", "teacher_train.epochs=1", f"teacher_store={store}", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "Distillation gain over the student alone" in result.stdout
    for name in (
        "metrics.jsonl",
        "metrics.csv",
        "summary.json",
        "student.safetensors",
        "kdtrain.log",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        ".hydra/config.yaml",
        "baseline/metrics.jsonl",
    ):
        assert (run_dir / name).exists(), name
    log_text = (run_dir / "kdtrain.log").read_text()
    assert "student epoch 2/2" in log_text and "\r" not in log_text  # plain lines, no progress-bar debris


class _HostReads(TorchDispatchMode):
    """Counts the reads of device values on the host: `aten._local_scalar_dense` (.item(), bool(t), float(t))
    and Tensor.tolist (which on the CPU reads memory without dispatching; on CUDA it copies and waits)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        tolist = torch.Tensor.tolist

        def counted(t, *args, **kwargs):
            self.count += 1
            return tolist(t, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("overrides", [["mode=combined", "teacher_cache=off"], ["nan_policy=skip", "batch_size=16"]])
def test_training_steps_do_not_read_the_device_on_the_host(compose, tmp_path, monkeypatch, overrides):
    """The step log and the metrics are read every POLL_STEPS steps and at an epoch's end, not every step."""
    reads, steps = _HostReads(monkeypatch), []
    train_epoch = engine._Training.train_epoch

    def counted(self, epoch, partial):
        steps.append(self.steps_per_epoch)
        with reads:
            return train_epoch(self, epoch, partial)

    monkeypatch.setattr(engine._Training, "train_epoch", counted)
    run(compose("baseline=false", *overrides), tmp_path)
    student_steps = steps[-1] * 2  # the student's 2 epochs (the teacher may have trained first)
    per_step = reads.count / sum(steps)
    assert student_steps >= 40 and per_step < 0.2, (reads.count, steps)
