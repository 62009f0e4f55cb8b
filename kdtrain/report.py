"""Run outputs a user scripts against: metrics.jsonl, metrics.csv, summary.json and the final table."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.table import Table

from kdtrain.checkpoint import atomic_write
from kdtrain.errors import write_error

# Columns of metrics.jsonl / metrics.csv, in order (a public interface: extend, never rename).
COLUMNS = [
    "epoch",
    "loss",
    "ce",
    "kd",
    "feat",
    "lr",
    "train_acc",
    "val_acc",
    "agreement",
    "samples_per_sec",
    "epoch_seconds",
    "skipped_steps",
]


class MetricsWriter:
    """Appends one row per epoch to `metrics.jsonl` and `metrics.csv` in `folder`.

    The files start with `rows` (a resumed run: the rows of the epochs its checkpoint holds; rows
    of later epochs, written before an interruption, are dropped), written atomically."""

    def __init__(self, folder: Path, extra_columns: list[str] | None = None, rows: list[dict[str, Any]] | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.columns = COLUMNS + (extra_columns or [])
        self.jsonl = folder / "metrics.jsonl"
        self.csv = folder / "metrics.csv"
        values = [self._values(row) for row in rows or []]
        atomic_write(self.jsonl, lambda p: p.write_text("".join(json.dumps(v) + "\n" for v in values)))

        def write_csv(path: Path) -> None:
            with open(path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(self.columns)
                writer.writerows(self._cells(v) for v in values)

        atomic_write(self.csv, write_csv)

    def _values(self, row: dict[str, Any]) -> dict[str, Any]:
        return {k: _clean(row.get(k)) for k in self.columns}

    def _cells(self, values: dict[str, Any]) -> list[Any]:
        return ["" if values[k] is None else values[k] for k in self.columns]

    def write(self, row: dict[str, Any]) -> None:
        values = self._values(row)
        self._append(self.jsonl, lambda f: f.write(json.dumps(values) + "\n"))
        self._append(self.csv, lambda f: csv.writer(f).writerow(self._cells(values)))

    @staticmethod
    def _append(path: Path, write: Callable[[IO[str]], Any]) -> None:
        """Append one row; when the disk is full (or the folder read-only) cut the file back to its
        previous rows, so no torn row is left, and raise the one-line WriteError."""
        size = path.stat().st_size
        try:
            with open(path, "a", newline="") as f:
                write(f)
        except OSError as e:
            error = write_error(e, path)
            if error is None:
                raise
            with contextlib.suppress(OSError):
                os.truncate(path, size)
            raise error from None


class TensorBoardWriter:
    """The metrics rows' scalars as TensorBoard events in `folder` (logger=tensorboard)."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def sink(self, prefix: str):
        """A metrics-row callback that logs every numeric column as `prefix/column` at step `epoch`."""

        def write(row: dict[str, Any]) -> None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{prefix}/{key}", value, global_step=int(row["epoch"]))
            self.writer.flush()

        return write

    def close(self) -> None:
        self.writer.close()


def _clean(value: Any) -> Any:
    # JSON has no NaN: write null instead (e.g. agreement when there is no teacher).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_summary(summary: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))


def pct(x: float | None, std: float | None = None, sign: str = "%") -> str:
    """A fraction as a percentage with two decimals, `-` when missing or NaN; `±std` when a std is given
    (sweep tables: the std over seeds)."""
    if x is None or math.isnan(x):
        return "-"
    return f"{100 * x:.2f}{sign}" if std is None else f"{100 * x:.2f}±{100 * std:.2f}"


def _collapsed(entry: dict[str, Any]) -> str:
    return " \\[collapsed]" if entry.get("collapsed") else ""  # escaped: brackets are rich markup


def print_table(summary: dict[str, Any], console: Console | None = None) -> None:
    """Teacher vs student (and the student alone, when trained) in one table."""
    console = console or Console()
    t, s, b = summary["teacher"], summary["student"], summary.get("baseline")
    table = Table(title=f"kdtrain: {t['name']} -> {s['name']}, mode={summary['mode']}, T={summary['temperature']}")
    for col in ("model", "params", "best val acc", "last val acc", "vs teacher"):
        table.add_column(col, justify="left" if col == "model" else "right")
    table.add_row(
        f"teacher ({t['name']})" + _collapsed(t),
        f"{t['params']:,}",
        pct(t["val_acc"]),
        pct(t["val_acc"]),
        "1.00x params",
    )
    if b is not None:
        table.add_row(
            "student alone (mode=none)" + _collapsed(b),
            f"{s['params']:,}",
            pct(b["best_val_acc"]),
            pct(b["last_val_acc"]),
            f"{s['params'] / t['params']:.3f}x params",
        )
    table.add_row(
        f"student ({summary['mode']})" + _collapsed(s),
        f"{s['params']:,}",
        pct(s["best_val_acc"]),
        pct(s["last_val_acc"]),
        f"{s['params'] / t['params']:.3f}x params",
    )
    console.print(table)
    if b is not None:
        gain = 100 * (s["best_val_acc"] - b["best_val_acc"])
        console.print(f"Distillation gain over the student alone: {gain:+.2f} points (best val acc, same seed).")
    console.print(f"Teacher-student agreement: {pct(s.get('agreement'))}; outputs in {summary['run_dir']}")


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}x"


def print_compression(report: dict[str, Any], console: Console | None = None) -> None:
    """One line: how many times smaller and faster the student is than its teacher."""
    r = report["ratios"]
    (console or Console()).print(
        f"Compression (teacher / student): {_times(r['params'])} params, {_times(r['flops'])} FLOPs, "
        f"{_times(r['latency_batch_1'])} CPU latency at batch 1, {_times(r['latency_batch_64'])} at batch 64 (1 "
        "thread)."
    )


def finish_run(summary: dict[str, Any], run_dir: Path, teacher: Any, student: Any, in_shape: Any, device: Any) -> None:
    """The end of a run: add the compression report to `summary` and print it, draw curves.png, then
    write summary.json. It is written last, so its presence means that every output of the run is there
    (a crash before it makes resume=auto redo the end); neither report can fail the finished run: a
    failure is logged as a warning.
    """
    import logging

    log = logging.getLogger("kdtrain")
    try:
        from kdtrain.compression import compression_report

        summary["compression"] = compression_report(teacher, student, in_shape, device)
        print_compression(summary["compression"])
    except Exception as e:
        log.warning("compression report failed (%s: %s); summary.json has no 'compression'", type(e).__name__, e)
    try:
        from kdtrain.plots import plot_run

        plot_run(Path(run_dir), summary)
    except Exception as e:
        log.warning("curves.png failed (%s: %s)", type(e).__name__, e)
    write_summary(summary, Path(run_dir) / "summary.json")
