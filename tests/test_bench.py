"""scripts/bench.py (a tiny CPU run) and scripts/bench_summary.py (failures are loud)."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def part(name: str, sps: float) -> dict:
    result = {"samples_per_sec": sps, "epoch_seconds": 100 / sps, "ms_per_step": 1.0, "projected_minutes": 2.0}
    return {"name": name, "complete": True, "errors": {}, "recipe_epochs": 240, "results": {"engine": result}}


def test_summary_shows_what_worked_and_fails_on_a_timed_out_setting(tmp_path, capsys):
    summary = load("bench_summary")
    (tmp_path / "ok.json").write_text(json.dumps(part("ok", 1234.0)))
    (tmp_path / "ok.rc").write_text("0\n")
    (tmp_path / "slow.rc").write_text("124\n")  # killed at its cap before writing anything
    out = tmp_path / "all.json"
    assert summary.main([str(tmp_path), "--expect", "ok", "slow", "--json", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "1,234" in printed and "FAILED slow: stopped at its time cap (exit 124); no JSON" in printed
    combined = json.loads(out.read_text())
    assert list(combined["settings"]) == ["ok"] and "slow" in combined["failed"]
    # Every setting fine: exit 0.
    (tmp_path / "slow.json").write_text(json.dumps(part("slow", 99.0)))
    (tmp_path / "slow.rc").write_text("0\n")
    assert summary.main([str(tmp_path), "--expect", "ok", "slow", "--json", str(out)]) == 0


def test_summary_fails_on_a_failed_way(tmp_path, capsys):
    summary = load("bench_summary")
    broken = part("x", 10.0) | {"errors": {"cached": "RuntimeError: boom"}}
    (tmp_path / "x.json").write_text(json.dumps(broken))
    (tmp_path / "x.rc").write_text("1\n")
    assert summary.main([str(tmp_path), "--expect", "x", "--json", str(tmp_path / "all.json")]) == 1
    assert "FAILED x: exit 1; cached: RuntimeError: boom" in capsys.readouterr().out


def test_bench_digits_plain_loop_has_no_host_sync_per_step(tmp_path):
    bench = load("bench")
    out = tmp_path / "b.json"
    argv = ["--case", "digits", "--epochs", "1", "--ways", "plain_index,student_alone", "--batch-size", "128"]
    assert bench.main([*argv, "--syncs", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["complete"] and set(got["results"]) == {"plain_index", "student_alone"}
    assert got["syncs"]["plain_index"]["per_step"]["local_scalar_dense"] == 0
    assert got["syncs"]["student_alone"]["steps"] == [5, 10]  # 1,297 samples: at most 2k <= 10 steps of 128
    assert got["results"]["student_alone"]["projected_minutes"] > 0


@pytest.mark.slow
def test_bench_gpu_dry_run(tmp_path):
    """The offline install from .whl/ and every setting's command, on the CPU (minutes; needs fetch_wheels.sh)."""
    if not list((ROOT / ".whl").glob("*.whl")):
        pytest.skip("no wheels in .whl/: run bash scripts/fetch_wheels.sh first (needs PyPI)")
    if shutil.which("timeout") is None:
        pytest.skip("no timeout command")
    result = subprocess.run(
        ["bash", "scripts/bench_gpu.sh", "--dry-run", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "dry run passed" in result.stdout
    combined = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert not combined["failed"] and set(combined["settings"]) == {"bf16_cl", "bf16", "fp32"}
