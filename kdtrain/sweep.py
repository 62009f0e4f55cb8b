"""Sweep summaries: one row per configuration, mean ± std over seeds, from the jobs' own files.

A sweep dir (`outputs/multirun/DATE/TIME/`) holds `multirun.yaml` and one folder per job; each job
that finished wrote `summary.json`, and every job that started wrote `.hydra/overrides.yaml`. A
configuration is a job's overrides without `seed=` and `hydra.*`; its row holds the best and last
validation accuracy as mean ± std over its seeds (n of them), the student's parameters, the mean
seconds per job and the compression ratios. std is the sample standard deviation (ddof=1) over the
seeds; with n=1 it is undefined: null in JSON, empty in CSV, "-" in the table. Jobs without a
summary.json (failed, or still running) are counted per configuration and listed with their
overrides, never dropped.

Two ways in, same result: the Hydra callback `SweepSummary` (registered in conf/config.yaml; it
rewrites the files after every job, so they exist even when a job fails and Hydra skips
`on_multirun_end`, and prints the table and draws the plots at the end of the sweep), and the
command `kdtrain-report DIR...` (a sweep dir, or any run dirs).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from kdtrain.errors import UserError, one_line_errors
from kdtrain.report import pct

log = logging.getLogger("kdtrain")

CSV_COLUMNS = [
    "config",
    "n",
    "failed",
    "best_mean",
    "best_std",
    "last_mean",
    "last_std",
    "student_params",
    "teacher_val_acc",
    "seconds_mean",
    "alone_best_mean",
    "gain_mean",
    "params_ratio",
    "flops_ratio",
    "latency_ratio_batch_1",
    "latency_ratio_batch_64",
    "seeds",
    "collapsed",
]

ROLES = ("student", "baseline", "teacher")  # the models of a job whose collapse a row reports


# ---------------------------------------------------------------- reading the jobs


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in (OmegaConf.load(path) or [])]


def _job_dirs(sweep_dir: Path) -> list[Path]:
    jobs = [
        d
        for d in sweep_dir.iterdir()
        if d.is_dir() and ((d / ".hydra" / "overrides.yaml").is_file() or (d / "summary.json").is_file())
    ]
    return sorted(jobs, key=lambda d: (0, int(d.name)) if d.name.isdigit() else (1, d.name))


def _is_run(folder: Path) -> bool:
    return (folder / "summary.json").is_file() or (folder / ".hydra" / "overrides.yaml").is_file()


def collect(paths: list[Path]) -> list[dict[str, Any]]:
    """Every job under `paths` (sweep dirs or run dirs): {dir, overrides, summary (None: no summary.json)}."""
    runs: list[dict[str, Any]] = []
    for path in paths:
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"{path} is not a directory; give a sweep dir (outputs/multirun/DATE/TIME) or run dirs")
        folders = [path] if _is_run(path) else _job_dirs(path)
        if not folders:
            raise UserError(
                f"{path} holds no kdtrain run (no summary.json or .hydra/overrides.yaml in it or its subfolders)"
            )
        for folder in folders:
            summary = None
            if (folder / "summary.json").is_file():
                try:
                    summary = json.loads((folder / "summary.json").read_text())
                except json.JSONDecodeError:
                    log.warning("%s/summary.json is not valid JSON; counted as failed", folder)
            runs.append({"dir": str(folder), "overrides": _overrides(folder), "summary": summary})
    return runs


# ---------------------------------------------------------------- summarising


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def config_of(overrides: list[str]) -> dict[str, str]:
    """The configuration a job belongs to: its overrides without seed and hydra.*, as {key: value}."""
    out = {}
    for o in overrides:
        key = _key(o)
        if key == "seed" or key == "hydra" or key.startswith("hydra."):
            continue
        out[key] = o.split("=", 1)[1] if "=" in o else ""
    return dict(sorted(out.items()))


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample std with ddof=1); std is None for fewer than two values, both None for none."""
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _mean(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows per configuration (sorted by best mean, descending; all-failed ones last), teachers, failed jobs."""
    groups: dict[tuple, dict[str, Any]] = {}
    for r in runs:
        params = config_of(r["overrides"])
        group = groups.setdefault(tuple(params.items()), {"params": params, "ok": [], "failed": []})
        (group["ok"] if r["summary"] is not None else group["failed"]).append(r)
    rows = []
    for group in groups.values():
        ok = [r["summary"] for r in group["ok"]]
        best_mean, best_std = mean_std([s["student"]["best_val_acc"] for s in ok])
        last_mean, last_std = mean_std([s["student"]["last_val_acc"] for s in ok])
        ratios = [s.get("compression", {}).get("ratios", {}) for s in ok]
        modes = {s.get("mode") for s in ok} or {group["params"].get("mode")}
        rows.append(
            {
                "config": " ".join(f"{k}={v}" for k, v in group["params"].items()) or "(defaults)",
                "params": group["params"],
                "mode": modes.pop() if len(modes) == 1 else None,
                "n": len(ok),
                "failed": len(group["failed"]),
                "best_mean": best_mean,
                "best_std": best_std,
                "last_mean": last_mean,
                "last_std": last_std,
                "student_params": ok[0]["student"]["params"] if ok else None,
                "teacher_val_acc": _mean([s["teacher"]["val_acc"] for s in ok]),
                "seconds_mean": _mean([s.get("seconds") for s in ok]),
                "alone_best_mean": _mean([(s.get("baseline") or {}).get("best_val_acc") for s in ok]),
                "gain_mean": _mean([s.get("gain_vs_baseline") for s in ok]),
                "params_ratio": _mean([x.get("params") for x in ratios]),
                "flops_ratio": _mean([x.get("flops") for x in ratios]),
                "latency_ratio_batch_1": _mean([x.get("latency_batch_1") for x in ratios]),
                "latency_ratio_batch_64": _mean([x.get("latency_batch_64") for x in ratios]),
                "seeds": sorted({s.get("seed") for s in ok if s.get("seed") is not None}),
                # Jobs whose model collapsed (training accuracy at chance; see kdtrain/collapse.py), per role.
                "collapsed": {
                    role: n for role in ROLES if (n := sum(bool((s.get(role) or {}).get("collapsed")) for s in ok))
                },
                "runs": [r["dir"] for r in group["ok"]],
            }
        )
    rows.sort(key=lambda r: (r["best_mean"] is None, -(r["best_mean"] or 0.0), r["config"]))
    # Overrides every configuration shares are said once (`common`); a row's label names the rest.
    keys = {k for r in rows for k in r["params"]}
    common = {
        k: rows[0]["params"][k]
        for k in sorted(keys)
        if all(r["params"].get(k) == rows[0]["params"].get(k) for r in rows) and k in rows[0]["params"]
    }
    for r in rows:
        r["label"] = " ".join(f"{k}={v}" for k, v in r["params"].items() if k not in common) or r["config"]
    teachers: dict[tuple, dict[str, Any]] = {}
    for r in runs:
        if r["summary"] is not None:
            t = r["summary"]["teacher"]
            teachers.setdefault((t["name"], t.get("source"), t["val_acc"]), t)
    failed = [{"dir": r["dir"], "overrides": r["overrides"]} for r in runs if r["summary"] is None]
    return {
        "rows": rows,
        "common": common,
        "teachers": list(teachers.values()),
        "failed": failed,
        "jobs": len(runs),
        "std": "sample standard deviation over seeds (ddof=1); null when n < 2",
    }


# ---------------------------------------------------------------- writing and printing


def write_files(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """`sweep_summary.json` and `sweep_summary.csv` in `out_dir`, written atomically."""
    from kdtrain.checkpoint import atomic_write

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / "sweep_summary.json", out_dir / "sweep_summary.csv"
    atomic_write(json_path, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    keys = sorted({k for r in result["rows"] for k in r["params"]})

    def write_csv(p: Path) -> None:
        with open(p, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_COLUMNS[:1] + keys + CSV_COLUMNS[1:])
            for r in result["rows"]:
                cells = [r["config"]] + [r["params"].get(k, "") for k in keys]
                for c in CSV_COLUMNS[1:]:
                    v = r[c]
                    if isinstance(v, dict):  # collapsed: "student=2 baseline=1"
                        v = " ".join(f"{k}={n}" for k, n in v.items())
                    cells.append(" ".join(map(str, v)) if isinstance(v, list) else ("" if v is None else v))
                w.writerow(cells)

    atomic_write(csv_path, write_csv)
    return json_path, csv_path


def _x(v: float | None) -> str:
    return "-" if v is None else (f"{v:,.0f}x" if v >= 100 else f"{v:.3g}x")


def print_sweep(result: dict[str, Any], title: str, console: Any = None) -> None:
    """The sweep table: teacher(s) first, then one row per configuration, best mean first."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file or a pipe: no terminal width to respect
            console = Console(width=120)
    rows = result["rows"]
    with_alone = any(r["gain_mean"] is not None for r in rows)
    common = " ".join(f"{k}={v}" for k, v in result.get("common", {}).items())
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        caption="best/last: val acc in %, mean±std, sample std over seeds (ddof=1; '-' when n=1). "
        "FLOPs, CPU: teacher / student (CPU latency at batch 1)"
        + (". gain: points over the student alone (same seed)" if with_alone else "")
        + (f". Every row: {common}" if common else ""),
    )
    table.add_column("config", min_width=10, overflow="fold")
    for col in ("n", "best acc", "last acc", "params", "FLOPs", "CPU") + (("gain",) if with_alone else ()) + ("s/job",):
        table.add_column(col, justify="right", no_wrap=True)
    for t in result["teachers"]:
        table.add_row(
            f"teacher ({t['name']})",
            "",
            pct(t["val_acc"], sign=""),
            pct(t["val_acc"], sign=""),
            f"{t['params']:,}",
            "1x",
            "1x",
            *([""] if with_alone else []),
            "",
            style="bold",
        )
    for r in rows:
        n = f"{r['n']}" + (f"+{r['failed']} failed" if r["failed"] else "")
        label = r["label"] + (" (alone)" if r["mode"] == "none" else "")
        if r["collapsed"]:  # flagged: these numbers come from a model that did not learn
            roles = ", ".join(f"{role} {k}/{r['n']}" for role, k in r["collapsed"].items())
            label += escape(f" [collapsed: {roles}]")  # brackets are rich markup otherwise
        gain = ["-" if r["gain_mean"] is None else f"{100 * r['gain_mean']:+.2f}"] if with_alone else []
        table.add_row(
            label,
            n,
            pct(r["best_mean"], r["best_std"]) if r["best_std"] is not None else pct(r["best_mean"], sign="±-"),
            pct(r["last_mean"], r["last_std"]) if r["last_std"] is not None else pct(r["last_mean"], sign="±-"),
            "-" if r["student_params"] is None else f"{r['student_params']:,}",
            _x(r["flops_ratio"]),
            _x(r["latency_ratio_batch_1"]),
            *gain,
            "-" if r["seconds_mean"] is None else f"{r['seconds_mean']:.1f}",
            style="red" if r["n"] == 0 or r["collapsed"] else None,
        )
    console.print(table)
    for f in result["failed"]:
        console.print(
            f"[red]failed[/red] (no summary.json): {f['dir']}  {' '.join(f['overrides']) or '(no overrides)'}",
            soft_wrap=True,
        )


def report(
    paths: list[Path], out_dir: Path, title: str | None = None, quiet: bool = False, plots: bool = True
) -> dict[str, Any]:
    """Collect, summarise, write the files (and plots), print the table unless `quiet`."""
    result = summarise(collect(paths))
    json_path, csv_path = write_files(result, out_dir)
    written = []
    if plots:
        try:
            from kdtrain.plots import plot_sweep

            teacher = result["teachers"][0]["val_acc"] if len(result["teachers"]) == 1 else None
            written = plot_sweep(result["rows"], out_dir, teacher)
        except Exception as e:
            log.warning("sweep plots failed (%s: %s)", type(e).__name__, e)
    if not quiet:
        print_sweep(result, title or f"kdtrain sweep: {result['jobs']} jobs, {len(result['rows'])} configurations")
        print(f"Wrote {json_path}, {csv_path}" + "".join(f", {p}" for p in written))
    return result


# ---------------------------------------------------------------- the Hydra callback


def _sweep_dir_of(job_dir: Path) -> Path | None:
    for folder in (job_dir.parent, job_dir.parent.parent):
        if (folder / "multirun.yaml").is_file():
            return folder
    return None


class SweepSummary(Callback):
    """Hydra callback: keeps `sweep_summary.{json,csv}` current after every job of a multirun, and at
    the end of the sweep prints the table and draws `sweep_<param>.png`.

    Hydra skips `on_multirun_end` when a job raised; the files written after each job still hold
    every job (the failed ones listed as failed), and `kdtrain-report SWEEP_DIR` prints the table.
    """

    def on_job_end(self, config: Any, job_return: Any = None, **kwargs: Any) -> None:
        try:
            from hydra.types import RunMode

            if config.hydra.mode != RunMode.MULTIRUN:
                return
            sweep_dir = _sweep_dir_of(Path(config.hydra.runtime.output_dir))
            if sweep_dir is not None:
                report([sweep_dir], sweep_dir, quiet=True, plots=False)
        except Exception as e:
            log.warning("sweep summary after the job failed (%s: %s)", type(e).__name__, e)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            if not sweep_dir.is_dir():
                log.warning("sweep summary: %s not found; run kdtrain-report on the sweep dir", sweep_dir)
                return
            report([sweep_dir], sweep_dir, title=f"kdtrain sweep: {sweep_dir}")
        except Exception as e:
            log.warning(
                "sweep summary failed (%s: %s); run kdtrain-report %s", type(e).__name__, e, config.hydra.sweep.dir
            )


# ---------------------------------------------------------------- kdtrain-report


@one_line_errors("kdtrain-report")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kdtrain-report",
        description="Summarise a kdtrain sweep dir or any run dirs: one row per configuration (overrides but "
        "seed and hydra.*), best/last val accuracy as mean ± sample std (ddof=1) over seeds; writes "
        "sweep_summary.json/.csv and sweep_<param>.png.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="a sweep dir, or run dirs")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write the files (default: DIR when one is given, else the current directory)",
    )
    parser.add_argument("--no-plots", action="store_true", help="write no PNG")
    args = parser.parse_args(argv)
    out = args.out or (args.dirs[0] if len(args.dirs) == 1 else Path.cwd())
    report(args.dirs, out, plots=not args.no_plots)


if __name__ == "__main__":
    main()
