"""torchrun: 2 CPU processes with gloo match one process with the same global batch; N -> M resume."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_match_one_process(tmp_path):
    store = tmp_path / "teachers"
    common = [
        "epochs=2",
        "teacher_train.epochs=1",
        "progress=off",
        "mode=combined",
        f"teacher_store={store}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    # No hydra.run.dir: the ranks must agree on one timestamped run dir by themselves.
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
        *common,
        "batch_size=32",
    ]
    ddp = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
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
