"""The student-alone baseline: labelled samples only, the same training as mode=none, stored once and
resumed exactly; collapse is reported."""

from __future__ import annotations

import csv
import errno
import json
import logging
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from kdtrain import baseline
from kdtrain.collapse import EPOCHS, chance_threshold, collapse_epoch
from kdtrain.data import TensorSet, build_dataset
from kdtrain.engine import STOP, Interrupted, fit
from kdtrain.run import _spec, _student, run, seed_everything
from kdtrain.sweep import print_sweep, summarise, write_files
from tests._dataset_files import write_idx

CPU = torch.device("cpu")


def _rows(path: Path, keys=("epoch", "loss", "ce", "train_acc", "val_acc")) -> list[dict]:
    return [{k: json.loads(line)[k] for k in keys} for line in path.read_text().splitlines()]


def _obtain(cfg, splits):
    def build():
        seed_everything(int(cfg.seed))
        return _student(cfg, splits, CPU)

    return baseline.obtain(cfg, splits, CPU, None, build, _spec(cfg, "baseline", None, {}))


def test_labelled_only_repeats_the_labelled_samples_to_the_transfer_set_size():
    y = torch.tensor([-1, 0, -1, 1, -1, -1, 2, -1, -1, -1])
    data = TensorSet(torch.arange(10.0).view(10, 1, 1, 1), y)
    out = baseline.labelled_only(data)
    assert len(out) == len(data)  # as many optimizer steps per epoch as the student's
    assert (out.y >= 0).all()
    counts = torch.bincount(out.x.flatten().long(), minlength=10)
    assert counts[y < 0].sum() == 0 and sorted(counts[y >= 0].tolist()) == [3, 3, 4]
    every = TensorSet(data.x, torch.arange(10) % 3)
    assert baseline.labelled_only(every) is every  # every sample labelled: the transfer set itself


def test_collapse_epoch():
    def rows(accs, losses=None):
        losses = losses or [2.3 - 0.1 * i for i in range(len(accs))]
        return [{"epoch": i + 1, "train_acc": a, "loss": v} for i, (a, v) in enumerate(zip(accs, losses))]

    at_chance = chance_threshold(10)
    assert at_chance == pytest.approx(0.2) and chance_threshold(2) == pytest.approx(0.75)
    assert collapse_epoch(rows([0.9, 0.1, 0.1, 0.1, 0.95]), 10) == 4  # stuck for EPOCHS epochs
    assert collapse_epoch(rows([0.1, 0.1, 0.5, 0.1, 0.1]), 10) is None  # it learned in between
    assert collapse_epoch(rows([0.1, 0.1, 0.1, 0.9]), 10, skip=1) is None  # the hint stage is not counted
    flat = [2.0, 2.1, 2.05, 2.2]  # accuracy above chance, but the loss never falls below epoch 1's
    assert collapse_epoch(rows([0.5] * 4, flat), 10) == 4
    assert EPOCHS == 3


def test_mode_none_is_the_baseline_and_a_later_run_reuses_it(compose, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kdtrain")
    run(compose("seed=7"), tmp_path / "soft")
    soft = json.loads((tmp_path / "soft" / "summary.json").read_text())
    b = soft["baseline"]
    assert b["labelled"] == 200 and not b["reused"] and not b["collapsed"] and 0 <= b["agreement"] <= 1
    assert soft["gain_vs_baseline"] == pytest.approx(soft["student"]["best_val_acc"] - b["best_val_acc"])
    assert "baseline: none stored" in caplog.text
    stored = Path(b["source"])
    assert (stored / "baseline.safetensors").is_file() and stored.parent.name == "baselines"

    # The student alone as a run of its own (mode=none) trains exactly as the baseline did.
    run(compose("seed=7", "mode=none"), tmp_path / "none")
    none = json.loads((tmp_path / "none" / "summary.json").read_text())
    assert _rows(tmp_path / "none" / "metrics.jsonl") == _rows(tmp_path / "soft" / "baseline" / "metrics.jsonl")
    assert none["student"]["best_val_acc"] == b["best_val_acc"]
    weights = load_file(stored / "baseline.safetensors")
    student = load_file(tmp_path / "none" / "student.safetensors")
    assert all(torch.equal(weights[k], student[k]) for k in weights)

    # Another run with the same student, data, recipe and seed (another temperature) reuses it.
    caplog.clear()
    run(compose("seed=7", "temperature=2"), tmp_path / "t2")
    again = json.loads((tmp_path / "t2" / "summary.json").read_text())["baseline"]
    assert again["reused"] and "baseline: reusing" in caplog.text and "baseline: none stored" not in caplog.text
    assert {k: again[k] for k in ("best_val_acc", "last_val_acc", "source")} == {
        k: b[k] for k in ("best_val_acc", "last_val_acc", "source")
    }
    assert (tmp_path / "t2" / "baseline" / "metrics.jsonl").read_text() == (
        tmp_path / "soft" / "baseline" / "metrics.jsonl"
    ).read_text()


def test_an_interrupted_baseline_continues_exactly(compose, tmp_path):
    splits = build_dataset(compose().dataset)
    _, reference, _ = _obtain(compose(f"teacher_store={tmp_path / 'a'}"), splits)

    cfg = compose(f"teacher_store={tmp_path / 'b'}")
    STOP.signum = signal.SIGTERM  # as the signal handler does: stop after the current step
    try:
        with pytest.raises(Interrupted):
            _obtain(cfg, splits)
    finally:
        STOP.signum = None
    partial = [p for p in (tmp_path / "b" / "baselines").iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and (partial[0] / "checkpoints" / "last.pt").is_file()
    assert not [p for p in (tmp_path / "b" / "baselines").iterdir() if p.name[0] != "."]  # nothing stored yet
    _, resumed, folder = _obtain(cfg, splits)
    assert not partial[0].exists() and (folder / "result.json").is_file()

    def strip(history):
        return [{k: v for k, v in r.items() if k not in ("samples_per_sec", "epoch_seconds")} for r in history]

    assert strip(resumed["history"]) == strip(reference["history"])
    a = load_file(tmp_path / "a" / "baselines" / folder.name / "baseline.safetensors")
    b = load_file(folder / "baseline.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_stored_baseline_is_trained_again(compose, tmp_path, caplog):
    splits = build_dataset(compose().dataset)
    cfg = compose(f"teacher_store={tmp_path}")
    _, first, folder = _obtain(cfg, splits)
    weights = folder / "baseline.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF  # a flipped bit in the last weight
    weights.write_bytes(bytes(blob))
    caplog.set_level(logging.INFO, logger="kdtrain")
    _, again, _ = _obtain(cfg, splits)
    assert "fails its checksum" in caplog.text and not again["reused"]
    assert again["best_val_acc"] == first["best_val_acc"] and again["sha256"] == first["sha256"]


def test_a_store_that_cannot_be_written_still_gives_the_run_its_baseline(compose, tmp_path, monkeypatch, caplog):
    splits = build_dataset(compose().dataset)
    _, stored, _ = _obtain(compose(f"teacher_store={tmp_path / 'a'}"), splits)

    def no_lock(path: Path, what: str):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(baseline, "file_lock", no_lock)
    caplog.set_level(logging.WARNING, logger="kdtrain")
    _, memory, source = _obtain(compose(f"teacher_store={tmp_path / 'b'}"), splits)
    assert "is not writable; training the student alone in memory" in caplog.text and "not stored" in str(source)
    assert memory["best_val_acc"] == stored["best_val_acc"] and not memory["reused"]


def test_collapse_at_an_absurd_lr_is_reported(compose, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="kdtrain")
    run(compose("lr=10", "epochs=3"), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["student"]["collapsed"] and summary["baseline"]["collapsed"]
    assert summary["teacher"]["collapsed"] is False
    warnings = [r.getMessage() for r in caplog.records if "collapsed" in r.getMessage()]
    assert len(warnings) == 2 and all("learning rate" in w and "lr=1" in w for w in warnings)


def test_the_sweep_table_flags_collapsed_jobs(capsys, tmp_path):
    def job(seed, collapsed):
        acc = 0.1 if collapsed else 0.9
        entry = {"name": "mlp", "params": 10, "best_val_acc": acc, "last_val_acc": acc, "collapsed": collapsed}
        summary = {
            "mode": "soft",
            "seed": seed,
            "teacher": {"name": "cnn", "val_acc": 0.95, "params": 100, "collapsed": False},
            "student": entry,
            "baseline": {**entry, "collapsed": False},
        }
        overrides = ["lr=10" if collapsed else "lr=0.05", f"seed={seed}"]
        return {"dir": f"j{seed}", "overrides": overrides, "summary": summary}

    result = summarise([job(0, True), job(1, True), job(0, False)])
    rows = {r["config"]: r for r in result["rows"]}
    assert rows["lr=10"]["collapsed"] == {"student": 2} and rows["lr=0.05"]["collapsed"] == {}
    print_sweep(result, "t", console=Console(width=200))
    assert "[collapsed: student 2/2]" in capsys.readouterr().out
    _, csv_path = write_files(result, tmp_path)
    with open(csv_path) as f:
        cells = {row["config"]: row["collapsed"] for row in csv.DictReader(f)}
    assert cells == {"lr=10": "student=2", "lr=0.05": ""}


MNIST_TRAIN_PER_CLASS = 130  # 1,300 images: an MNIST-format transfer set of 20 labels per class


def _mnist_style(root: Path) -> None:
    """scikit-learn's digits scaled to 28x28 uint8 and written as the MNIST IDX files (real digits, offline)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) * (255 / 16)
    images = torch.nn.functional.interpolate(images, size=(28, 28), mode="bilinear").squeeze(1)
    images, labels = images.round().clamp(0, 255).numpy().astype(np.uint8), data.target
    train = np.concatenate([np.flatnonzero(labels == c)[:MNIST_TRAIN_PER_CLASS] for c in range(10)])
    test = np.setdiff1d(np.arange(len(labels)), train)
    for name, idx in (("train", train), ("t10k", test)):
        write_idx(root / "MNIST" / "raw" / f"{name}-images-idx3-ubyte", images[idx])
        write_idx(root / "MNIST" / "raw" / f"{name}-labels-idx1-ubyte", labels[idx])


@pytest.mark.parametrize("dataset", ["digits", "mnist"])
def test_the_baseline_reaches_a_student_trained_on_the_labelled_samples_alone(compose, tmp_path, dataset):
    """At the default lr, on a transfer set of 20 labels per class (200 of ~1,300 images), the baseline
    does as well as the same student trained on just those 200 images (it used to collapse on MNIST)."""
    overrides = ["dataset.labelled_per_class=20", "epochs=5", f"teacher_store={tmp_path}"]
    if dataset == "mnist":
        _mnist_style(tmp_path / "data")
        overrides += ["dataset=mnist", f"dataset.root={tmp_path / 'data'}"]
    cfg = compose(*overrides)
    splits = build_dataset(cfg.dataset)
    assert int((splits.train.y >= 0).sum()) == 200 and len(splits.train) >= 1297
    _, result, _ = _obtain(cfg, splits)
    assert collapse_epoch(result["history"], 10) is None

    # The reference: the same student and recipe on the 200 labelled images as its whole training set,
    # for about as many optimizer steps (30 epochs of 4 steps against 5 epochs of >= 20).
    seed_everything(0)
    alone = _student(cfg, splits, CPU)
    spec = replace(_spec(cfg, "alone", None, {}), epochs=30)
    reference = fit(alone, splits.teacher_train, splits.val, spec, CPU, None)
    assert reference["best_val_acc"] > 0.5
    assert result["best_val_acc"] >= reference["best_val_acc"] - 0.03
