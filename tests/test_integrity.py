"""Nothing goes bad silently: checkpoints and stored teachers carry checksums, damaged store folders are
trained again, non-finite teachers are refused, and a run dir holds one run at a time (a lock)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import torch
from safetensors.torch import load_file, save_file

import kdtrain.cli
from kdtrain.checkpoint import file_sha256
from kdtrain.errors import UserError
from kdtrain.models import build_model
from kdtrain.run import run
from kdtrain.runlock import LOCK_FILE
from tests.conftest import TINY, run_cli

ROOT = Path(__file__).resolve().parents[1]


def compose_with(store: Path, *overrides: str):
    with hydra.initialize_config_module(config_module="kdtrain.conf", version_base="1.3"):
        return hydra.compose(
            "config", overrides=[*TINY, "epochs=1", "baseline=false", f"teacher_store={store}", *overrides]
        )


def flip_a_bit(path: Path, tensor: torch.Tensor) -> None:
    """Flip one bit in the middle of `tensor`'s bytes where they are stored in the file `path`."""
    data = bytearray(path.read_bytes())
    blob = tensor.contiguous().numpy().tobytes()
    at = data.find(blob)
    assert at >= 0, "the tensor's bytes are not stored as they are"
    data[at + len(blob) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def cli_exit(monkeypatch, capsys, *argv: str) -> tuple[int, list[str]]:
    """kdtrain.cli.main in-process up to Hydra's start (the task must not be reached): (exit code, stderr lines)."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["kdtrain", *argv])
    monkeypatch.setattr(kdtrain.cli, "task", lambda: pytest.fail("the command-line check let it through"))
    with pytest.raises(SystemExit) as exited:
        kdtrain.cli.main()
    return exited.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# --- checkpoints -------------------------------------------------------------------------------------


def test_a_bit_flipped_checkpoint_is_refused_and_an_old_one_without_checksum_resumes(
    tmp_path, store, monkeypatch, capsys
):
    run_dir = tmp_path / "run"
    run(compose_with(store), run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    intact = last.read_bytes()
    state = torch.load(last, weights_only=True)
    assert len(state["sha256"]) == 64

    flip_a_bit(last, state["model"]["fc.weight"])
    code, lines = cli_exit(monkeypatch, capsys, *TINY, "baseline=false", f"teacher_store={store}", f"resume={run_dir}")
    assert code == 2 and len(lines) == 1 and "fails its checksum" in lines[0], lines

    # A checkpoint of an older kdtrain (no checksum) still resumes.
    last.write_bytes(intact)
    del state["sha256"]
    torch.save(state, last)
    run(compose_with(store, "epochs=2", f"resume={run_dir}"), run_dir)
    assert torch.load(last, weights_only=True)["epoch"] == 2


# --- the teacher store -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, dict]:
    """A store holding one trained teacher, and the summary of the run that trained it."""
    base = tmp_path_factory.mktemp("pristine")
    run(compose_with(base / "store"), base / "run")
    return base / "store", json.loads((base / "run" / "summary.json").read_text())


def _entry(store: Path) -> Path:
    (folder,) = [p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "cache"]
    return folder


def _make_non_finite(folder: Path) -> None:
    """NaN weights that still match meta.json's checksum (so only the finiteness check can catch them)."""
    weights = folder / "teacher.safetensors"
    state = load_file(weights)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, weights)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "sha256": file_sha256(weights)}))


DAMAGE = {
    "bit-flip": (
        lambda f: flip_a_bit(f / "teacher.safetensors", load_file(f / "teacher.safetensors")["fc.weight"]),
        "fails its checksum",
    ),
    "non-finite": (_make_non_finite, "holds non-finite weights"),
    "weights-gone": (lambda f: (f / "teacher.safetensors").unlink(), "has no teacher.safetensors"),
    "no-checksum": (lambda f: (f / "meta.json").write_text("{}"), "has no checksum in its meta.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_store_folder_is_trained_again(damage, pristine, tmp_path, caplog):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(pristine[0], store)
    folder = _entry(store)
    good = (folder / "teacher.safetensors").read_bytes()
    harm, warning = DAMAGE[damage]
    harm(folder)
    caplog.set_level("INFO", logger="kdtrain")
    run(compose_with(store), tmp_path / "run")
    assert warning in caplog.text and "training it again" in caplog.text
    assert (folder / "teacher.safetensors").read_bytes() == good  # the same teacher, trained again
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["teacher"]["val_acc"] == pristine[1]["teacher"]["val_acc"]
    assert [p.name for p in store.iterdir() if p.name.endswith((".tmp", ".old"))] == []


def test_temp_folders_of_dead_trainings_are_removed_and_live_ones_kept(pristine, tmp_path, caplog):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(pristine[0], store)
    key = _entry(store).name
    ended = subprocess.Popen(["true"])
    ended.wait()
    dead, alive = store / f".{key}.{ended.pid}.tmp", store / f".{key}.{os.getppid()}.tmp"
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "teacher.safetensors").write_bytes(b"half a teacher")
    caplog.set_level("INFO", logger="kdtrain")
    run(compose_with(store), tmp_path / "run")
    assert not dead.exists() and alive.exists()
    assert "left by an interrupted training" in caplog.text and "reusing" in caplog.text


def test_the_store_key_covers_amp(pristine, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(pristine[0], store)  # trained with amp=auto on the CPU: amp off
    run(compose_with(store, "amp=off"), tmp_path / "off")
    run(compose_with(store, "amp=bf16"), tmp_path / "bf16")
    folders = sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "cache")
    assert len(folders) == 2
    sources = {json.loads((tmp_path / d / "summary.json").read_text())["teacher"]["source"] for d in ("off", "bf16")}
    assert sources == {str(f) for f in folders}
    a, b = (load_file(f / "teacher.safetensors") for f in folders)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_non_finite_or_altered_teacher_checkpoint_is_refused(tmp_path, store):
    state = build_model({"name": "cnn"}, 10, (1, 8, 8), "teacher").state_dict()
    path = tmp_path / "teacher.safetensors"
    save_file(state, path)
    (tmp_path / "teacher.safetensors.sha256").write_text("0" * 64 + "  teacher.safetensors\n")
    with pytest.raises(UserError, match="fails the sha256 recorded beside it") as err:
        run(compose_with(store, f"teacher.checkpoint={path}"), tmp_path / "a")
    assert "\n" not in str(err.value)

    (tmp_path / "teacher.safetensors.sha256").unlink()
    state["fc.weight"][0, 0] = float("inf")
    save_file(state, path)
    with pytest.raises(UserError, match=r"holds non-finite weights \(1 tensors, e.g. fc.weight\)") as err:
        run(compose_with(store, f"teacher.checkpoint={path}"), tmp_path / "b")
    assert "\n" not in str(err.value)


# --- one run per run dir -----------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def test_a_run_dir_in_use_is_refused_with_one_line_and_nothing_written(tmp_path, store, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("the other process's files\n")
    with open(run_dir / LOCK_FILE, "w") as held:  # what another kdtrain process holds
        fcntl.flock(held, fcntl.LOCK_EX)
        before = _snapshot(run_dir)
        code, lines = cli_exit(
            monkeypatch, capsys, *TINY, f"teacher_store={store}", f"hydra.run.dir={run_dir}", "resume=auto"
        )
        assert code == 2 and len(lines) == 1, lines
        assert lines[0] == (
            f"kdtrain: error: {run_dir} is in use by another kdtrain process (it holds {LOCK_FILE} there); wait "
            "for that run to end, or choose another hydra.run.dir"
        )
        assert _snapshot(run_dir) == before


def test_two_processes_on_one_run_dir_and_the_lock_dies_with_its_process(tmp_path, store):
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        "epochs=3",
        "baseline=false",
        "student=custom",
        "student._target_=tests.models.Scripted",
        f"teacher_store={store}",
        f"hydra.run.dir={run_dir}",
        "resume=auto",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KDTRAIN_TEST_SLEEP": "0.5"}  # 30 s of training
    env.pop("HYDRA_FULL_ERROR", None)
    first = subprocess.Popen(
        [sys.executable, "-m", "kdtrain", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while not (run_dir / "kdtrain.log").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        second = run_cli(*args, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
        assert first.poll() is None, "the first run ended before the second started: the test proves nothing"
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1 and "is in use by another kdtrain process" in lines[0]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The OS dropped the killed process's lock: the same command continues the run.
    again = run_cli(*args, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert again.returncode == 0, again.stderr
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_sweep_job_whose_dir_is_in_use_writes_no_output(tmp_path, store):
    """Sweep jobs (and runs in the default timestamped dir) take the lock when the job starts."""
    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    with open(job / LOCK_FILE, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        done = run_cli("--multirun", *TINY, f"teacher_store={store}", f"hydra.sweep.dir={tmp_path / 'sweep'}", "seed=0")
    assert done.returncode != 0 and f"{job} is in use by another kdtrain process" in done.stderr, done.stderr
    assert not (job / "metrics.jsonl").exists() and not (job / "checkpoints").exists()
