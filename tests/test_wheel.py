"""A wheel built from the repo, installed in a fresh venv, runs a tiny job from another directory."""

import json
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_runs_from_another_directory(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, ROOT],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    wheel = next(dist.glob("kdtrain-*.whl"))
    # The venv sees the system's torch & co. but gets its own kdtrain from the wheel.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", wheel], check=True, capture_output=True)
    where = subprocess.run(
        [python, "-c", "import kdtrain.conf, kdtrain; print(kdtrain.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    assert str(env_dir) in where, f"kdtrain imported from {where}, not from the wheel"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [
            env_dir / "bin" / "kdtrain",
            "epochs=1",
            "teacher_train.epochs=1",
            "baseline=false",
            "progress=off",
            "hydra.run.dir=run",
            "teacher_store=teachers",
            "mode=combined",
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((elsewhere / "run" / "summary.json").read_text())
    assert summary["mode"] == "combined" and summary["teacher"]["params"] > 0
    assert (elsewhere / "teachers").is_dir()
