"""Run outputs a user scripts against: metrics.jsonl, metrics.csv, summary.json and the final table."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kdtrain.checkpoint import atomic_write

# Columns of metrics.jsonl / metrics.csv, in order (a public interface: extend, never rename).
COLUMNS = ["epoch", "loss", "ce", "kd", "feat", "lr", "train_acc", "val_acc", "agreement", "samples_per_sec", "epoch_seconds"]


class MetricsWriter:
    """Appends one row per epoch to `metrics.jsonl` and `metrics.csv` in `folder`."""

    def __init__(self, folder: Path, extra_columns: list[str] | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.columns = COLUMNS + (extra_columns or [])
        self.jsonl = folder / "metrics.jsonl"
        self.csv = folder / "metrics.csv"
        self.jsonl.write_text("")
        with open(self.csv, "w", newline="") as f:
            csv.writer(f).writerow(self.columns)

    def write(self, row: dict[str, Any]) -> None:
        values = {k: _clean(row.get(k)) for k in self.columns}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(values) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow(["" if values[k] is None else values[k] for k in self.columns])


def _clean(value: Any) -> Any:
    # JSON has no NaN: write null instead (e.g. agreement when there is no teacher).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_summary(summary: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def print_table(summary: dict[str, Any], console: Console | None = None) -> None:
    """Teacher vs student (and the student alone, when trained) in one table."""
    console = console or Console()
    t, s, b = summary["teacher"], summary["student"], summary.get("baseline")
    table = Table(title=f"kdtrain: {t['name']} -> {s['name']}, mode={summary['mode']}, T={summary['temperature']}")
    for col in ("model", "params", "best val acc", "last val acc", "vs teacher"):
        table.add_column(col, justify="left" if col == "model" else "right")
    table.add_row(f"teacher ({t['name']})", f"{t['params']:,}", _pct(t["val_acc"]), _pct(t["val_acc"]), "1.00x params")
    if b is not None:
        table.add_row("student alone (mode=none)", f"{s['params']:,}", _pct(b["best_val_acc"]), _pct(b["last_val_acc"]),
                      f"{s['params'] / t['params']:.3f}x params")
    table.add_row(f"student ({summary['mode']})", f"{s['params']:,}", _pct(s["best_val_acc"]), _pct(s["last_val_acc"]),
                  f"{s['params'] / t['params']:.3f}x params")
    console.print(table)
    if b is not None:
        gain = 100 * (s["best_val_acc"] - b["best_val_acc"])
        console.print(f"Distillation gain over the student alone: {gain:+.2f} points (best val acc, same seed).")
    console.print(f"Teacher-student agreement: {_pct(s.get('agreement'))}; outputs in {summary['run_dir']}")
