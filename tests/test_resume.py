"""Never lose a run: exact resume after SIGKILL / SIGTERM (mid-epoch too), resume=auto, config checks,
non-finite losses (nan_policy=stop|skip)."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdtrain.engine import Interrupted, stop_on_signals
from kdtrain.errors import UserError
from kdtrain.run import run
from tests.conftest import run_cli

TIMING = ("samples_per_sec", "epoch_seconds")
ROOT = Path(__file__).resolve().parents[1]  # on PYTHONPATH, so a subprocess imports tests.models
SCRIPTED = ["student=custom", "student._target_=tests.models.Scripted", "baseline=false", "epochs=3"]


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the timing columns (the only ones that may differ between equal runs)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def assert_same_run(a: Path, b: Path) -> None:
    assert rows(a) == rows(b)
    wa, wb = load_file(a / "student.safetensors"), load_file(b / "student.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    csv_a, csv_b = ((d / "metrics.csv").read_text().splitlines() for d in (a, b))
    assert len(csv_a) == len(csv_b) == len(rows(a)) + 1 and csv_a[0] == csv_b[0]


@pytest.fixture(scope="module")
def scripted_reference(tmp_path_factory, store) -> Path:
    """The uninterrupted run the interrupted ones must equal."""
    import hydra

    from tests.conftest import TINY

    folder = tmp_path_factory.mktemp("reference")
    with hydra.initialize_config_module(config_module="kdtrain.conf", version_base="1.3"):
        cfg = hydra.compose("config", overrides=[*TINY, f"teacher_store={store}", *SCRIPTED])
    run(cfg, folder)
    return folder


def test_sigkill_after_an_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, store, compose):
    args = [
        "epochs=3",
        "teacher_train.epochs=1",
        "progress=off",
        "baseline=false",
        "student.dropout=0.3",
        f"teacher_store={store}",
    ]
    reference = tmp_path / "reference"
    run(compose(*args), reference)

    run_dir = tmp_path / "run"
    killed = run_cli(*args, f"hydra.run.dir={run_dir}", cwd=tmp_path, env={"KDTRAIN_TEST_KILL_AT": "last.pt:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["partial"] is None and len(state["history"]) == 1
    # A row written after the checkpoint (a crash between the two) is dropped on resume.
    for name in ("metrics.jsonl", "metrics.csv"):
        with open(run_dir / name, "a") as f:
            f.write('{"epoch": 2, "loss": 123.0}\n' if name.endswith("jsonl") else "2,123.0\n")

    resumed = run_cli("resume=" + str(run_dir), *args, cwd=tmp_path)  # continues in its own run dir
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in rows(run_dir)] == [1, 2, 3]
    assert_same_run(run_dir, reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] == str(run_dir / "checkpoints" / "last.pt")
    assert "resuming from" in (run_dir / "kdtrain.log").read_text()


@pytest.mark.parametrize(
    "signame, signal_at, epoch, partial",
    [("SIGTERM", 7, 0, 7), ("SIGTERM", 29, 1, 8), ("SIGINT", 29, 1, 8), ("SIGTERM", 21, 1, None)],
    ids=["mid-epoch-1", "mid-epoch-2", "sigint-mid-epoch-2", "last-step-of-epoch-1"],
)
def test_a_signal_saves_and_resume_continues_exactly(
    tmp_path, compose, monkeypatch, scripted_reference, signame, signal_at, epoch, partial
):
    monkeypatch.setenv("KDTRAIN_TEST_SIGNAL_AT", str(signal_at))  # 21 steps per epoch
    monkeypatch.setenv("KDTRAIN_TEST_SIGNAL", signame)
    with stop_on_signals(), pytest.raises(Interrupted) as stopped:
        run(compose(*SCRIPTED), tmp_path)
    assert stopped.value.signum == signal.Signals[signame]
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == epoch and state["step"] == signal_at
    assert (state["partial"] or {}).get("batches") == partial
    assert not (tmp_path / "summary.json").exists()

    monkeypatch.delenv("KDTRAIN_TEST_SIGNAL_AT")
    run(compose(*SCRIPTED, f"resume={tmp_path}"), tmp_path)
    assert_same_run(tmp_path, scripted_reference)


def test_sigterm_from_outside_prints_the_resume_command(tmp_path, store, scripted_reference):
    run_dir = tmp_path / "run"
    args = [*SCRIPTED, "teacher_train.epochs=1", "progress=off", f"teacher_store={store}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "KDTRAIN_TEST_SLEEP": "0.02", "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdtrain", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdtrain: interrupted by SIGTERM at "), stderr
    command = shlex.split(lines[0].split("continue with: ", 1)[1])
    assert command[:2] == ["kdtrain", f"resume={run_dir}"] and "hydra.run.dir" not in " ".join(command)

    resumed = run_cli(*command[1:], cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run_dir, scripted_reference)


def test_resume_auto_starts_fresh_then_leaves_a_finished_run_alone(tmp_path, compose):
    run(compose("baseline=false", "resume=auto"), tmp_path)
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}
    best = run(compose("baseline=false", "resume=auto"), tmp_path)
    assert best == json.loads((tmp_path / "summary.json").read_text())["student"]["best_val_acc"]
    assert files == {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}


def test_resume_checks_the_config_and_the_weights(tmp_path, compose):
    run(compose("baseline=false", "epochs=1"), tmp_path)
    with pytest.raises(UserError, match=r"student.hidden=32 but this run has student.hidden=64"):
        run(compose("baseline=false", "epochs=2", "student.hidden=64", f"resume={tmp_path}"), tmp_path)
    other = tmp_path / "other"
    with pytest.raises(UserError, match="already holds a run"):  # another run's dir is never written into
        run(compose("baseline=false", "epochs=2"), tmp_path)

    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    state["model"] = {k.replace("fc.", "head."): v for k, v in state["model"].items()}
    del state["sha256"]  # edited by hand, as another tool would write it (with the old checksum: refused)
    torch.save(state, tmp_path / "doctored.pt")
    with pytest.raises(UserError, match="another architecture") as err:
        run(compose("baseline=false", "epochs=2", f"resume={tmp_path / 'doctored.pt'}"), other)
    assert "\n" not in str(err.value)


def test_nan_policy_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, compose, monkeypatch):
    monkeypatch.setenv("KDTRAIN_TEST_NAN_AT", "24")  # epoch 2, step 3
    with pytest.raises(UserError, match=r"non-finite at epoch 2, step 3/21 \(ce=nan, kd=nan\)") as err:
        run(compose(*SCRIPTED), tmp_path)
    assert "nan_policy=skip" in str(err.value) and "\n" not in str(err.value)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert [r["epoch"] for r in rows(tmp_path)] == [1]


def test_nan_policy_skip_drops_the_step_and_counts_it(tmp_path, compose, monkeypatch):
    monkeypatch.setenv("KDTRAIN_TEST_NAN_AT", "24")
    run(compose(*SCRIPTED, "nan_policy=skip"), tmp_path)
    table = rows(tmp_path)
    assert [r["skipped_steps"] for r in table] == [0, 1, 0]
    assert all(math.isfinite(r["loss"]) for r in table)
    assert json.loads((tmp_path / "summary.json").read_text())["student"]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in load_file(tmp_path / "student.safetensors").values())


def test_resume_after_the_last_epoch_reuses_the_baseline_and_recomputes_the_summary(tmp_path, compose):
    """Stopped after the student's last epoch (e.g. during the baseline): resume trains nothing more."""
    run(compose(), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    weights = load_file(tmp_path / "student.safetensors")
    (tmp_path / "summary.json").unlink()
    run(compose(f"resume={tmp_path}"), tmp_path)
    again = json.loads((tmp_path / "summary.json").read_text())
    assert again["baseline"]["reused"]  # stored once, not trained again
    assert {k: v for k, v in again["baseline"].items() if k != "reused"} == {
        k: v for k, v in summary["baseline"].items() if k != "reused"
    }
    assert again["student"] == summary["student"]
    assert [r["epoch"] for r in rows(tmp_path)] == [1, 2]
    again_weights = load_file(tmp_path / "student.safetensors")
    assert again_weights.keys() == weights.keys() and all(torch.equal(again_weights[k], weights[k]) for k in weights)


def test_resume_into_a_new_dir_with_more_epochs_warns_and_keeps_the_history(tmp_path, compose, caplog):
    run(compose("baseline=false", "epochs=1"), tmp_path / "a")
    caplog.set_level("INFO", logger="kdtrain")
    run(compose("baseline=false", "epochs=2", f"resume={tmp_path / 'a' / 'checkpoints' / 'last.pt'}"), tmp_path / "b")
    assert "settings that differ from the checkpoint's" in caplog.text and "epochs: 1 -> 2" in caplog.text
    assert [r["epoch"] for r in rows(tmp_path / "b")] == [1, 2]
    assert rows(tmp_path / "b")[0] == rows(tmp_path / "a")[0]
    assert [r["epoch"] for r in rows(tmp_path / "a")] == [1]  # the source run is not written into
