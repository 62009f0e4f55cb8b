"""A wheel built from the repo, installed in a fresh venv, runs a tiny job from another directory."""

import json
import os
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
    # A fresh venv that gets its own kdtrain from the wheel and reuses the dependencies (torch & co.) already
    # installed for the interpreter running the tests, wherever they are: the system's site-packages, or those
    # of the user's venv or conda env (system_site_packages=True would see the base interpreter's only). The .pth
    # lists those folders; Python does not read .pth files inside them, so an editable kdtrain there stays out.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the wheel's kdtrain only
    python = env_dir / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    own = subprocess.run([python, "-c", purelib], check=True, capture_output=True, text=True, env=env).stdout.strip()
    deps = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (Path(own) / "_kdtrain_test_deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", wheel], check=True, capture_output=True, env=env)
    where = subprocess.run(
        [python, "-c", "import kdtrain.conf, kdtrain; print(kdtrain.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
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
        env=env,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((elsewhere / "run" / "summary.json").read_text())
    assert summary["mode"] == "combined" and summary["teacher"]["params"] > 0
    assert (elsewhere / "teachers").is_dir()
