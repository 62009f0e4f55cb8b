"""Sweeps: one teacher for every job, a summary per configuration that matches the runs' own files,
failed jobs listed (not dropped), the compression report and the plots."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from kdtrain.sweep import config_of, mean_std
from tests.conftest import run_cli

SWEEP = [
    "--multirun",
    "mode=soft,none",
    "temperature=2,4",
    "seed=0,1",
    "epochs=1",
    "teacher_train.epochs=1",
    "progress=off",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """8 tiny jobs (2 modes x 2 temperatures x 2 seeds) with a fresh teacher store; the soft jobs also
    report against the student alone (2 distinct baselines, one per seed)."""
    tmp = tmp_path_factory.mktemp("sweep")
    sweep_dir, store = tmp / "sweep", tmp / "store"
    result = run_cli(*SWEEP, f"hydra.sweep.dir={sweep_dir}", f"teacher_store={store}", cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir, store, result


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdtrain.sweep", *args], capture_output=True, text=True, timeout=120)


def _jobs(sweep_dir: Path) -> list[Path]:
    return sorted((d for d in sweep_dir.iterdir() if d.name.isdigit()), key=lambda d: int(d.name))


def test_summary_matches_a_hand_computation_from_the_runs(sweep):
    sweep_dir, _, result = sweep
    jobs = _jobs(sweep_dir)
    assert len(jobs) == 8
    by_config: dict[tuple, list[dict]] = {}
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        by_config.setdefault((summary["mode"], summary["temperature"]), []).append(summary)
    data = json.loads((sweep_dir / "sweep_summary.json").read_text())
    rows = data["rows"]
    assert len(rows) == 4 and data["failed"] == [] and data["jobs"] == 8
    for row in rows:
        assert "seed" not in row["params"] and not any(k.startswith("hydra") for k in row["params"])
        runs = by_config[(row["params"]["mode"], float(row["params"]["temperature"]))]
        best = [s["student"]["best_val_acc"] for s in runs]
        last = [s["student"]["last_val_acc"] for s in runs]
        assert row["n"] == 2 and row["failed"] == 0 and row["seeds"] == [0, 1]
        assert row["best_mean"] == pytest.approx(sum(best) / 2)
        assert row["best_std"] == pytest.approx(abs(best[0] - best[1]) / 2**0.5)  # sample std, ddof=1
        assert row["last_mean"] == pytest.approx(sum(last) / 2)
        assert row["last_std"] == pytest.approx(statistics.stdev(last))
        assert row["seconds_mean"] == pytest.approx(sum(s["seconds"] for s in runs) / 2)
        assert row["student_params"] == runs[0]["student"]["params"]
    assert [r["best_mean"] for r in rows] == sorted((r["best_mean"] for r in rows), reverse=True)
    assert {r["mode"] for r in rows} == {"soft", "none"}
    assert len(data["teachers"]) == 1
    csv_lines = (sweep_dir / "sweep_summary.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and "best_std" in csv_lines[0]
    # The table at the end of the sweep (on_multirun_end), and the plot over the numeric swept key.
    assert "kdtrain sweep" in result.stdout and "teacher (cnn)" in result.stdout
    assert (sweep_dir / "sweep_temperature.png").stat().st_size > 0


def test_a_sweep_trains_its_teacher_once(sweep):
    sweep_dir, store, _ = sweep
    teachers = [d for d in store.iterdir() if d.is_dir() and d.name[0] != "." and d.name not in ("baselines", "cache")]
    assert len(teachers) == 1 and (teachers[0] / "teacher.safetensors").is_file()
    logs = [(job / "kdtrain.log").read_text() for job in _jobs(sweep_dir)]
    assert sum("teacher: none stored" in text for text in logs) == 1
    assert sum("teacher: reusing" in text for text in logs) == 7
    sources = {json.loads((job / "summary.json").read_text())["teacher"]["source"] for job in _jobs(sweep_dir)}
    assert sources == {str(teachers[0])}


def test_a_sweep_trains_each_distinct_baseline_once(sweep):
    sweep_dir, store, _ = sweep
    stored = sorted(d for d in (store / "baselines").iterdir() if d.is_dir() and not d.name.startswith("."))
    assert len(stored) == 2  # one per seed; the temperature does not change the student alone
    jobs = {job: json.loads((job / "summary.json").read_text()) for job in _jobs(sweep_dir)}
    soft = {job: s for job, s in jobs.items() if s["mode"] == "soft"}
    logs = [(job / "kdtrain.log").read_text() for job in soft]
    assert sum("baseline: none stored" in text for text in logs) == 2
    assert sum("baseline: reusing" in text for text in logs) == 2
    for seed in (0, 1):
        entries = [s["baseline"] for s in soft.values() if s["seed"] == seed]
        assert len(entries) == 2 and sum(e["reused"] for e in entries) == 1
        keys = ("best_val_acc", "last_val_acc", "agreement", "source")
        assert {k: entries[0][k] for k in keys} == {k: entries[1][k] for k in keys}  # reuse: identical numbers
        # mode=none trains the student alone exactly as the baseline does.
        alone = [s for s in jobs.values() if s["mode"] == "none" and s["seed"] == seed]
        assert all(s["baseline"] is None and s["student"]["best_val_acc"] == entries[0]["best_val_acc"] for s in alone)


def test_compression_report_and_curves_in_every_run(sweep):
    sweep_dir, _, _ = sweep
    for job in _jobs(sweep_dir)[:2]:
        c = json.loads((job / "summary.json").read_text())["compression"]
        for role in ("teacher", "student"):
            assert c[role]["params"] > 0 and c[role]["flops"] > 0
            assert c[role]["latency_ms"]["batch_1"] > 0 and c[role]["latency_ms"]["batch_64"] > 0
        assert c["ratios"]["params"] > 1 and c["ratios"]["flops"] > 1
        assert all(v > 0 for v in c["ratios"].values())
        assert (job / "curves.png").stat().st_size > 0


def test_report_lists_a_failed_job_and_exits_0(sweep, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(sweep[0], copy)
    for name in ("sweep_summary.json", "sweep_summary.csv"):
        (copy / name).unlink()
    (copy / "3" / "summary.json").unlink()
    overrides = [line[2:] for line in (copy / "3" / ".hydra" / "overrides.yaml").read_text().splitlines()]
    result = _report(str(copy))
    assert result.returncode == 0, result.stderr
    assert "failed" in result.stdout and str(copy / "3") in result.stdout.replace("\n", "")
    data = json.loads((copy / "sweep_summary.json").read_text())
    assert data["failed"] == [{"dir": str(copy / "3"), "overrides": overrides}]
    row = next(r for r in data["rows"] if r["params"] == config_of(overrides))
    assert row["n"] == 1 and row["failed"] == 1 and row["best_std"] is None  # n=1: no std
    assert sum(r["n"] for r in data["rows"]) == 7


def test_report_on_run_dirs_and_a_wrong_dir(sweep, tmp_path):
    jobs = _jobs(sweep[0])
    result = _report(str(jobs[0]), str(jobs[1]), "--out", str(tmp_path), "--no-plots")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert sum(r["n"] for r in data["rows"]) == 2
    bad = _report(str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and bad.stderr.startswith("kdtrain-report: error:") and len(bad.stderr.splitlines()) == 1


def test_a_failed_job_still_leaves_the_summary_files(tmp_path, sweep):
    """Hydra skips on_multirun_end when a job raised: the files written after each job still hold every job."""
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "--multirun",
        "batch_size=32,5000",
        "epochs=1",
        "teacher_train.epochs=1",
        "baseline=false",
        "progress=off",
        f"hydra.sweep.dir={sweep_dir}",
        f"teacher_store={sweep[1]}",
        cwd=tmp_path,
    )
    assert result.returncode != 0  # the second job is refused (batch larger than the training set)
    data = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert [r["n"] for r in data["rows"] if r["n"]] == [1]
    assert [f["dir"] for f in data["failed"]] == [str(sweep_dir / "1")]


def test_mean_std_is_the_sample_std():
    assert mean_std([0.5]) == (0.5, None)
    mean, std = mean_std([0.1, 0.2, 0.6])
    assert mean == pytest.approx(0.3) and std == pytest.approx(statistics.stdev([0.1, 0.2, 0.6]))
    assert config_of(["seed=3", "hydra.run.dir=x", "+teacher.width=2", "mode=soft"]) == {
        "mode": "soft",
        "teacher.width": "2",
    }
