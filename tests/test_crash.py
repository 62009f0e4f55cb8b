"""Crash consistency: a run SIGKILLed right after any of its writes, then re-run with the same command
(resume=auto), ends with the same files as a run that was never interrupted.

The kill comes from the test-only hook KDTRAIN_TEST_KILL_AT=NAME:N (kdtrain.checkpoint.atomic_write:
SIGKILL right after the N-th write of a file named NAME). A run of this size writes, in order: the
teacher (teacher.safetensors, then meta.json, into a temp folder that is then renamed into the store),
last.pt and best.pt for epochs 1 and 2, student.safetensors, curves.png, and summary.json last.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli

ARGS = ["epochs=2", "teacher_train.epochs=1", "progress=off", "device=cpu", "resume=auto"]
TIMING = ("samples_per_sec", "epoch_seconds")
# Every write point of the run, in order. The default suite runs the three that were broken before:
# a stale temp folder in the store, best.pt behind last.pt, and reports lost behind summary.json.
FAST = ["teacher.safetensors:1", "last.pt:2", "curves.png:1"]
SLOW = ["meta.json:1", "last.pt:1", "best.pt:1", "best.pt:2", "student.safetensors:1", "summary.json:1"]


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _checkpoint(path: Path) -> tuple[int, dict]:
    state = torch.load(path, weights_only=True)
    return state["epoch"], state["model"]


def _summary(run_dir: Path) -> dict:
    """summary.json without what differs between equal runs (timings, paths)."""
    s = json.loads((run_dir / "summary.json").read_text())
    for key in ("seconds", "run_dir", "resumed_from"):
        s.pop(key)
    s["teacher"].pop("source")
    ratios = s.pop("compression")["ratios"]
    s["compression"] = {k: ratios[k] for k in ("params", "flops")}  # latencies are timings
    return s


def _files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


def _store(store: Path) -> dict[str, bytes]:
    """The store's teacher folders (and nothing else: no temp folders) with their weights."""
    return {
        p.name: (p / "teacher.safetensors").read_bytes() for p in store.iterdir() if p.is_dir() and p.name != "cache"
    }


def assert_same_outputs(run_dir: Path, reference: Path) -> None:
    assert _files(run_dir) == _files(reference)
    for rows in ("metrics.jsonl", "baseline/metrics.jsonl"):
        assert _rows(run_dir / rows) == _rows(reference / rows)
    assert _tensors_equal(load_file(run_dir / "student.safetensors"), load_file(reference / "student.safetensors"))
    for name in ("last.pt", "best.pt"):
        epoch, model = _checkpoint(run_dir / "checkpoints" / name)
        ref_epoch, ref_model = _checkpoint(reference / "checkpoints" / name)
        assert epoch == ref_epoch and _tensors_equal(model, ref_model), name
    assert _summary(run_dir) == _summary(reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted run (and the store its teacher was trained into)."""
    base = tmp_path_factory.mktemp("crash")
    run_dir, store = base / "reference", base / "store"
    done = run_cli(*ARGS, f"hydra.run.dir={run_dir}", f"teacher_store={store}", cwd=base)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    # The points below mean something only if the second epoch is the best (best.pt written twice).
    assert summary["student"]["best_epoch"] == 2 and "compression" in summary
    assert (run_dir / "curves.png").is_file()
    return run_dir, store


def _kill_and_rerun(point: str, reference: tuple[Path, Path], tmp_path: Path) -> None:
    ref_dir, ref_store = reference
    run_dir = tmp_path / "run"
    # A kill while the teacher is written needs a store without it; the other points reuse the stored one.
    store = tmp_path / "store" if point.split(":")[0] in ("teacher.safetensors", "meta.json") else ref_store
    command = [*ARGS, f"hydra.run.dir={run_dir}", f"teacher_store={store}"]
    killed = run_cli(*command, cwd=tmp_path, env={"KDTRAIN_TEST_KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    again = run_cli(*command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert_same_outputs(run_dir, ref_dir)
    assert _store(store) == _store(ref_store)
    assert not [p for p in store.iterdir() if p.name.endswith((".tmp", ".old"))]


@pytest.mark.parametrize("point", FAST)
def test_a_kill_at_a_write_then_resume_auto_gives_the_uninterrupted_outputs(point, reference, tmp_path):
    _kill_and_rerun(point, reference, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("point", SLOW)
def test_every_other_write_point(point, reference, tmp_path):
    _kill_and_rerun(point, reference, tmp_path)
