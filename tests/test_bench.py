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


def test_bench_data_folder_and_tree_memory(tmp_path):
    """bench_data.py's generated folders (counts, split, the small one inside the large one) and its memory
    probe, which sums the process tree (a child that allocates 200 MB in a forked grandchild)."""
    bench_data = load("bench_data")
    assert bench_data.generate(tmp_path / "big", 23, 24, 3, 0.2) == {"train": 18, "val": 5}
    assert len(list((tmp_path / "big" / "val" / "c0").glob("*.jpg"))) == 2  # 8 images, 20 % of them in val/
    assert bench_data.subset(tmp_path / "big", tmp_path / "small", 12, 3, 0.2) == {"train": 9, "val": 3}
    for path in (tmp_path / "small").rglob("*.jpg"):
        assert path.samefile(tmp_path / "big" / path.relative_to(tmp_path / "small"))  # a hard link, same split
    code = (
        "import multiprocessing as mp, time\n"
        "def grow():\n    x = bytearray(200 * 2**20)\n    time.sleep(1.0)\n"
        "if __name__ == '__main__':\n"
        "    p = mp.get_context('fork').Process(target=grow); p.start(); p.join()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    memory = bench_data.TreeMemory(proc.pid, interval=0.05)
    proc.wait()
    memory.stop()
    assert memory.peak > 200 * 2**20 and memory.peak_processes == 2


def test_bench_data_plain_loop(tmp_path):
    """The plain torchvision loop that the stream path is compared with trains and reports its rate."""
    bench_data = load("bench_data")
    bench_data.generate(tmp_path / "img", 12, 24, 2, 0.25)
    out = tmp_path / "plain.json"
    argv = ["--plain", str(tmp_path / "img"), "--plain-out", str(out), "--epochs", "2", "--image-size", "16"]
    assert bench_data.main([*argv, "--batch-size", "4", "--workers", "0"]) == 0
    rates = json.loads(out.read_text())["samples_per_sec_per_epoch"]
    assert len(rates) == 2 and all(r > 0 for r in rates)


@pytest.mark.slow
def test_bench_data_end_to_end(tmp_path):
    """The whole benchmark on 40 tiny JPEGs: kdtrain's stream path and the plain loop, and the memory runs (~1 min)."""
    bench_data = load("bench_data")
    out = tmp_path / "bench_data.json"
    argv = ["--images", "40", "--classes", "2", "--size", "48", "--image-size", "16", "--epochs", "2"]
    assert bench_data.main([*argv, "--batch-size", "8", "--workers", "1", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["complete"] and got["generated"] == {"train": 32, "val": 8} and got["ratio"] > 0
    assert len(got["results"]["stream"]["runs"][0]["samples_per_sec_per_epoch"]) == 2
    for loader in ("stream", "memory"):
        assert set(got["memory"][loader]) == {"10", "40", "growth_mb"}
        assert got["memory"][loader]["40"]["peak_mb"] > 50  # at least a Python process with torch
