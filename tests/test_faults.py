"""Faults end in one line (issue #13): a full disk or a read-only folder, a wait on another job's lock,
damaged metadata, the printed commands, files that keep the user's umask, nan_policy=skip's warning.

A full disk is simulated by making the writer raise OSError(ENOSPC) (tests run as root, where a
chmod'ed folder stays writable: read-only folders are simulated the same way, or skipped for root).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from safetensors.torch import save_file

import kdtrain.checkpoint
import kdtrain.cli
import kdtrain.errors
import kdtrain.teacher
import kdtrain.teacher_cache
from kdtrain import locks
from kdtrain.checkpoint import atomic_write, save_weights
from kdtrain.engine import STOP, Interrupted
from kdtrain.errors import UserError, WriteError
from kdtrain.models import build_model
from kdtrain.report import MetricsWriter
from kdtrain.run import run
from kdtrain.rundir import load_student_file
from kdtrain.teacher import teacher_key
from tests.conftest import TINY, run_cli

ROOT = Path(__file__).resolve().parents[1]
NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


def _full(path: Path) -> None:
    raise NO_SPACE


def _save_file_full_for(name_part: str):
    """safetensors' save_file, failing with a full disk for files whose name contains `name_part`."""
    real = kdtrain.checkpoint.save_file

    def save(tensors, filename, metadata=None):
        if name_part in Path(filename).name:
            raise NO_SPACE
        return real(tensors, filename, metadata=metadata)

    return save


# --- a full disk, a read-only folder ------------------------------------------------------------------


def test_a_full_disk_in_an_atomic_write_is_one_line_naming_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old\n")
    with pytest.raises(WriteError) as err:
        atomic_write(path, _full)
    message = str(err.value)
    assert f"cannot write {path}: its file system is full" in message and "free space there" in message
    assert "\n" not in message and err.value.path == path
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file


def test_torch_save_failing_for_space_without_an_errno_is_a_write_error(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError ("unexpected pos"): kdtrain checks the free space."""
    monkeypatch.setattr(kdtrain.errors.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))

    def torn(path: Path) -> None:
        path.write_bytes(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    with pytest.raises(WriteError, match="file system is full"):
        atomic_write(tmp_path / "last.pt", torn)
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_folder_is_one_line(tmp_path):
    def read_only(path: Path) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    with pytest.raises(WriteError, match=f"cannot write {tmp_path / 'x.json'}: .* is read-only or not writable"):
        atomic_write(tmp_path / "x.json", read_only)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 folder")
def test_a_chmod_read_only_folder_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(WriteError, match="not writable"):
            atomic_write(folder / "x.json", lambda p: p.write_text("{}"))
    finally:
        folder.chmod(0o755)


def test_other_write_failures_stay_bugs(tmp_path):
    with pytest.raises(ZeroDivisionError):
        atomic_write(tmp_path / "x.json", lambda p: 1 / 0)


def test_a_metrics_row_that_does_not_fit_leaves_no_torn_row(tmp_path):
    writer = MetricsWriter(tmp_path, rows=[])
    writer.write({"epoch": 1, "loss": 1.0})
    before = writer.jsonl.read_bytes()

    def half_then_full(f) -> None:
        f.write('{"epoch": 2, "lo')
        f.flush()
        raise NO_SPACE

    with pytest.raises(WriteError, match="metrics.jsonl: its file system is full"):
        MetricsWriter._append(writer.jsonl, half_then_full)
    assert writer.jsonl.read_bytes() == before


FULL_AT_LAST_PT = """
import errno
import torch

_save = torch.save


def _save_on_a_full_disk(obj, f, *args, **kwargs):
    if ".last.pt." in str(f):  # atomic_write's temp file for checkpoints/last.pt
        raise OSError(errno.ENOSPC, "No space left on device")
    return _save(obj, f, *args, **kwargs)


torch.save = _save_on_a_full_disk
"""


def test_a_full_run_dir_ends_the_run_with_one_line_and_exit_2(tmp_path, store):
    hook = tmp_path / "hook"  # a sitecustomize that makes checkpoints/last.pt meet a full disk
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FULL_AT_LAST_PT)
    run_dir = tmp_path / "run"
    result = run_cli(
        "epochs=1",
        "teacher_train.epochs=1",
        "progress=off",
        "baseline=false",
        f"teacher_store={store}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env={"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}"},
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert f"kdtrain: error: cannot write {run_dir / 'checkpoints' / 'last.pt'}: its file system is full" in lines[0]
    assert list((run_dir / "checkpoints").iterdir()) == []  # no torn file, no temp file


def test_a_teacher_that_cannot_be_stored_is_kept_for_the_run(tmp_path, compose, monkeypatch, caplog):
    monkeypatch.setattr(kdtrain.checkpoint, "save_file", _save_file_full_for("teacher.safetensors"))
    store = tmp_path / "store"
    with caplog.at_level(logging.WARNING, logger="kdtrain"):
        run(compose("epochs=1", "baseline=false", f"teacher_store={store}"), tmp_path / "run")
    assert "teacher: not stored (cannot write" in caplog.text and "file system is full" in caplog.text
    assert [p.name for p in store.iterdir() if not p.name.endswith(".lock")] == []  # no half teacher, no temp folder
    teacher = json.loads((tmp_path / "run" / "summary.json").read_text())["teacher"]
    assert "kept in memory" in teacher["source"]
    assert teacher["val_acc"] > 0.2  # the trained teacher (an untrained one scores ~0.1 on 10 classes)


def test_a_teacher_cache_that_cannot_be_written_is_skipped(tmp_path, compose, monkeypatch, caplog):
    monkeypatch.setattr(kdtrain.checkpoint, "save_file", _save_file_full_for(".teacher-"))
    cache_dir = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="kdtrain"):
        run(compose("epochs=1", "baseline=false", "teacher_cache=disk", f"teacher_cache_dir={cache_dir}"), tmp_path)
    assert "teacher cache: not written (cannot write" in caplog.text
    assert [p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock")] == []
    assert json.loads((tmp_path / "summary.json").read_text())["teacher_cache"]["policy"] == "disk"


def test_a_read_only_cache_dir_is_skipped(tmp_path, compose, monkeypatch, caplog):
    def no_lock(path: Path, what: str):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(kdtrain.teacher_cache, "file_lock", no_lock)
    with caplog.at_level(logging.WARNING, logger="kdtrain"):
        run(
            compose("epochs=1", "baseline=false", "teacher_cache=disk", f"teacher_cache_dir={tmp_path / 'c'}"), tmp_path
        )
    assert "is read-only or not writable" in caplog.text and "the cache is not written this time" in caplog.text
    assert (tmp_path / "summary.json").is_file()


def test_a_read_only_teacher_store_serves_a_stored_teacher(tmp_path, compose, store, monkeypatch, caplog):
    args = ["epochs=1", "baseline=false"]
    run(compose(*args), tmp_path / "first")  # the teacher is in the store (trained now or earlier)

    def read_only_lock(path: Path, what: str):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(kdtrain.teacher, "file_lock", read_only_lock)
    monkeypatch.setattr(kdtrain.cli.os, "access", lambda path, mode: Path(path).resolve() != store.resolve())
    argv = [*TINY, *args, f"teacher_store={store}", f"hydra.run.dir={tmp_path / 'second'}"]
    assert kdtrain.cli.check_command_line(argv) == argv  # reading a stored teacher needs no write access
    with pytest.raises(UserError, match="teacher_store=.* cannot be written"):  # training one does
        kdtrain.cli.check_command_line([*argv, "teacher_train.seed=12345"])
    with caplog.at_level(logging.INFO, logger="kdtrain"):
        run(compose(*args), tmp_path / "second")
    assert "teacher: reusing" in caplog.text and "is not writable; using it without its lock" in caplog.text


# --- lock waits ---------------------------------------------------------------------------------------


def test_a_lock_wait_says_what_it_waits_for_and_ends_on_a_signal(tmp_path, monkeypatch, caplog):
    path = tmp_path / ".cnn-digits-abc.lock"
    monkeypatch.setattr(locks, "WAIT_LOG_SECONDS", 0.2)  # 30 s in use
    monkeypatch.setattr(locks, "POLL_SECONDS", 0.02)
    signal_later = threading.Timer(0.7, lambda: setattr(STOP, "signum", signal.SIGTERM))
    with open(path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another job's lock (flock: per open file, so in-process works too)
        signal_later.start()
        try:
            with (
                caplog.at_level(logging.INFO, logger="kdtrain"),
                pytest.raises(Interrupted) as err,
                locks.file_lock(path, "the stored teacher cnn-digits-abc"),
            ):
                pytest.fail("took a lock another process holds")
        finally:
            signal_later.cancel()
            STOP.signum = None
    waits = [
        r.getMessage() for r in caplog.records if "waiting for the stored teacher cnn-digits-abc" in r.getMessage()
    ]
    assert len(waits) >= 2, waits  # at once, then again every WAIT_LOG_SECONDS
    assert str(path) in waits[0] and "waiting since 20" in waits[0]
    assert err.value.signum == signal.SIGTERM and "at the wait for the stored teacher cnn-digits-abc" in str(err.value)


def test_sigterm_while_waiting_for_the_teacher_lock_exits_143_at_once(tmp_path, compose):
    store = tmp_path / "store"
    args = ["epochs=1", "teacher_train.epochs=1", "progress=off", "baseline=false", f"teacher_store={store}"]
    key = teacher_key(compose(*args), "off")  # amp=auto trains in float32 on the CPU
    store.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    with open(store / f".{key}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another job is training this teacher
        proc = subprocess.Popen(
            [sys.executable, "-m", "kdtrain", *args, f"hydra.run.dir={tmp_path / 'run'}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            seen = []
            for line in proc.stdout:  # Hydra's console log
                seen.append(line)
                if "waiting for" in line:
                    break
            assert any(f"waiting for the stored teacher {key}" in line for line in seen), "".join(seen)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
            seconds = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 143 and seconds < 10, (proc.returncode, seconds, stderr)
    assert len(lines) == 1 and "interrupted by SIGTERM at the wait for the stored teacher" in lines[0], stderr
    assert "nothing to resume yet" in lines[0]
    assert not (store / key).exists()


# --- bad values in files a user hands us --------------------------------------------------------------


def _student_file(path: Path, **meta) -> Path:
    model = build_model({"name": "mlp"}, 10, (1, 8, 8), "student")
    good = {"model": {"name": "mlp"}, "num_classes": 10, "in_shape": [1, 8, 8], "mean": [0.0], "std": [1.0]}
    save_weights(model.state_dict(), path, {**good, **meta})
    return path


def test_student_metadata_with_bad_values_is_one_line(tmp_path):
    assert load_student_file(_student_file(tmp_path / "good.safetensors")).in_shape == (1, 8, 8)
    bad = [  # (metadata that differs from a good file, what the error says)
        ({"mean": []}, r"mean and std must hold one value per channel \(1\)"),
        ({"std": [0.0]}, "std > 0"),
        ({"in_shape": [8, 8]}, "in_shape must be 3 sizes"),
        ({"num_classes": "abc"}, "unusable kdtrain metadata"),
    ]
    for meta, message in bad:
        with pytest.raises(UserError, match=message):
            load_student_file(_student_file(tmp_path / "bad.safetensors", **meta))


def test_deeply_nested_student_metadata_is_one_line(tmp_path):
    model = build_model({"name": "mlp"}, 10, (1, 8, 8), "student")
    path = tmp_path / "deep.safetensors"
    meta = {"model": "[" * 100_000 + "]" * 100_000, "num_classes": "10", "in_shape": "[1, 8, 8]"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=meta)
    with pytest.raises(UserError, match="nested too deeply"):
        load_student_file(path)


# --- what an interrupted run prints -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a,b c'd", 'quote"and\\backslash', "r\u00fcn"])
def test_the_printed_resume_command_survives_the_shell_and_hydra(tmp_path, name):
    run_dir = tmp_path / name
    argv = shlex.split(kdtrain.cli._resume_command(run_dir, ["epochs=3", "lr=0.1"]))
    assert argv[0] == "kdtrain" and argv[2:] == ["epochs=3", "lr=0.1"]
    override = OverridesParser.create().parse_overrides([argv[1]])[0]
    assert override.key_or_group == "resume" and not override.is_sweep_override() and override.value() == str(run_dir)


def test_an_interruption_during_the_baseline_does_not_claim_a_saved_checkpoint(tmp_path):
    last = tmp_path / "checkpoints" / "last.pt"
    last.parent.mkdir()
    last.write_bytes(b"the student's last epoch")
    during_baseline = Interrupted(signal.SIGINT, None, "epoch 1, step 3/21")  # the baseline has no checkpoint
    message = kdtrain.cli._interrupted_message(during_baseline, tmp_path, ["epochs=3"])
    assert "last.pt saved" not in message and "nothing saved for the current phase" in message
    assert "continue with: kdtrain resume=" in message
    during_student = Interrupted(signal.SIGINT, last, "epoch 1, step 3/21")
    assert "checkpoints/last.pt saved; continue with" in kdtrain.cli._interrupted_message(during_student, tmp_path, [])


def test_ctrl_c_during_the_baseline_says_nothing_was_saved_and_its_command_finishes_the_run(tmp_path, store):
    run_dir = tmp_path / "a run, with a comma"
    args = [
        *TINY,
        "student=custom",
        "student._target_=tests.models.Scripted",
        f"teacher_store={store}",
        f"hydra.run.dir={kdtrain.cli._hydra_value(str(run_dir))}",
    ]
    env = {"PYTHONPATH": str(ROOT), "KDTRAIN_TEST_SIGNAL_AT": "3", "KDTRAIN_TEST_SIGNAL_INSTANCE": "2"}
    stopped = run_cli(*args, cwd=tmp_path, env={**env, "KDTRAIN_TEST_SIGNAL": "SIGINT"})  # instance 2: the baseline
    lines = [line for line in stopped.stderr.splitlines() if line.strip()]
    assert stopped.returncode == 130 and len(lines) == 1, stopped.stderr
    assert "interrupted by SIGINT" in lines[0] and "last.pt saved" not in lines[0], lines[0]
    assert "nothing saved for the current phase" in lines[0] and not (run_dir / "summary.json").exists()

    command = shlex.split(lines[0].split("continue with: ", 1)[1])  # pasted into a shell
    assert command[0] == "kdtrain"
    resumed = run_cli(*command[1:], cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run_dir / "summary.json").read_text())["baseline"] is not None


# --- nan_policy=skip, file permissions ----------------------------------------------------------------


def test_nan_policy_skip_warns_when_more_than_a_tenth_of_an_epoch_is_skipped(tmp_path, compose, monkeypatch, caplog):
    monkeypatch.setenv("KDTRAIN_TEST_NAN_AT", "2")  # one NaN step of 6 (batch_size=256 on 1,297 samples)
    scripted = ["student=custom", "student._target_=tests.models.Scripted", "baseline=false", "epochs=1"]
    with caplog.at_level(logging.WARNING, logger="kdtrain"):
        run(compose(*scripted, "batch_size=256", "nan_policy=skip"), tmp_path)
    assert "student: 1 of 6 steps of epoch 1 had a non-finite loss and were skipped" in caplog.text


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_keep_the_users_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write(tmp_path / "summary.json", lambda p: p.write_text("{}"))
        save_weights({"w": torch.zeros(2)}, tmp_path / "student.safetensors")
    finally:
        os.umask(old)
    for name in ("summary.json", "student.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
