"""torchrun: 2 CPU processes with gloo match one process with the same global batch (FitNets' hint stage too);
N -> M resume."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]  # on PYTHONPATH, so the ranks import tests.models


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _torchrun(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node=2 -m kdtrain ARGS` on the CPU (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        "-m",
        "kdtrain",
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_two_gloo_processes_match_one_process(tmp_path):
    store = tmp_path / "teachers"
    common = [
        "epochs=2",
        "teacher_train.epochs=1",
        "progress=off",
        "mode=combined",
        f"teacher_store={store}",
    ]
    # No hydra.run.dir: the ranks must agree on one timestamped run dir by themselves.
    ddp = _torchrun(tmp_path, *common, "batch_size=32")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    run_dirs = [p for p in (tmp_path / "outputs" / "runs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    ddp_dir = run_dirs[0]
    assert (ddp_dir / "summary.json").is_file() and (ddp_dir / "checkpoints" / "last.pt").is_file()
    assert len(list(store.glob("cnn-digits-*"))) == 1  # the teacher, trained by rank 0 while rank 1 waited

    single_dir = tmp_path / "single"
    single = run_cli(*common, "batch_size=64", f"hydra.run.dir={single_dir}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "teacher: reusing" in (single_dir / "kdtrain.log").read_text()
    # Rank 0 trained the student alone on the global batch (2 x 32) while rank 1 waited: the very baseline
    # one process with batch_size=64 needs, so that run reuses it.
    assert "baseline: reusing" in (single_dir / "kdtrain.log").read_text()
    ddp_base, single_base = (json.loads((d / "summary.json").read_text())["baseline"] for d in (ddp_dir, single_dir))
    assert not ddp_base["reused"] and ddp_base["source"] == single_base["source"]
    assert ddp_base["best_val_acc"] == single_base["best_val_acc"]

    a, b = _rows(ddp_dir), _rows(single_dir)
    assert len(a) == len(b) == 2
    for row_a, row_b in zip(a, b):
        for key in ("loss", "ce", "kd", "feat"):
            assert row_a[key] == pytest.approx(row_b[key], rel=0.02), key
        assert abs(row_a["val_acc"] - row_b["val_acc"]) <= 0.02

    # A checkpoint from 2 ranks continues on 1 (per-rank batch_size kept: it must match the checkpoint's).
    resumed = run_cli(*common, "batch_size=32", "epochs=3", f"resume={ddp_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in _rows(ddp_dir)] == [1, 2, 3]


@pytest.mark.slow
def test_the_hint_stage_on_two_gloo_processes_matches_one_process(tmp_path):
    """FitNets' hint stage trains the student up to a hooked layer only: the layers after it get no gradient,
    which DDP cannot tell from the logits (it used to fail with "Expected to have finished reduction")."""
    common = [
        "epochs=2",
        "teacher_train.epochs=1",
        "progress=off",
        "mode=feature",
        "feature.hint_epochs=1",
        "baseline=false",
        f"teacher_store={tmp_path / 'teachers'}",
    ]
    ddp = _torchrun(tmp_path, *common, "batch_size=32", f"hydra.run.dir={tmp_path / 'ddp'}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_cli(*common, "batch_size=64", f"hydra.run.dir={tmp_path / 'single'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]

    a, b = _rows(tmp_path / "ddp"), _rows(tmp_path / "single")
    assert len(a) == len(b) == 2
    assert a[0]["ce"] > 0 and a[0]["feat"] > 0 and a[1]["feat"] > 0  # the hint stage, then CE with the hints
    for row_a, row_b in zip(a, b):
        for key in ("loss", "ce", "feat"):
            assert row_a[key] == pytest.approx(row_b[key], rel=0.02), key
        assert abs(row_a["val_acc"] - row_b["val_acc"]) <= 0.02


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_both_at_the_same_step_and_resumes(tmp_path):
    """The stop flag is reduced with each step's flags and read every POLL_STEPS steps: rank 1's SIGTERM at
    its 5th step stops both ranks at step 16 (the first read) with one mid-epoch checkpoint."""
    common = [
        "student=custom",
        "student._target_=tests.models.Scripted",
        "baseline=false",
        "epochs=2",
        "teacher_train.epochs=1",
        "progress=off",
        "batch_size=32",
        f"teacher_store={tmp_path / 'teachers'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    signal_env = {"KDTRAIN_TEST_SIGNAL_AT": "5", "KDTRAIN_TEST_SIGNAL_RANK": "1", "PYTHONPATH": str(ROOT)}
    stopped = _torchrun(tmp_path, *common, env=signal_env)
    assert stopped.returncode != 0
    assert "interrupted by SIGTERM at epoch 1, step 16/21" in stopped.stderr, stopped.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["partial"]["batches"] == 16 and state["world_size"] == 2
    resumed = _torchrun(tmp_path, *common, f"resume={tmp_path / 'run'}", env={"PYTHONPATH": str(ROOT)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in _rows(tmp_path / "run")] == [1, 2]
