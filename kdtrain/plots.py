"""PNG plots of a run (`curves.png`) and of a sweep (`sweep_<param>.png`), written at the end.

matplotlib is optional (`pip install kdtrain[plots]`): without it each function logs one line and
writes nothing. It is imported lazily and used without pyplot (no global backend, no display).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from kdtrain.checkpoint import atomic_write

log = logging.getLogger("kdtrain")

LOSS_TERMS = ("loss", "ce", "kd", "feat")  # always in the metrics; the other terms in force are in summary["loss"]


def _figure(*size: float):
    """A matplotlib Figure on the Agg canvas, or None (with a note) when matplotlib is absent."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.info("plots: matplotlib is not installed, so no PNG is written (pip install kdtrain[plots])")
        return None
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: Path, summary: dict[str, Any] | None = None) -> Path | None:
    """`run_dir/curves.png`: validation accuracy per epoch (student, student alone, teacher) and each loss term."""
    run_dir = Path(run_dir)
    rows = _rows(run_dir / "metrics.jsonl")
    if not rows:
        return None
    if summary is None and (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    fig = _figure(11, 4)
    if fig is None:
        return None
    acc, loss = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows]
    mode = (summary or {}).get("mode", "student")
    acc.plot(epochs, [r["val_acc"] for r in rows], marker="o", label=f"student ({mode})")
    base = _rows(run_dir / "baseline" / "metrics.jsonl")
    if base:
        acc.plot(
            [r["epoch"] for r in base], [r["val_acc"] for r in base], marker="s", label="student alone (mode=none)"
        )
    teacher = (summary or {}).get("teacher") or {}
    if teacher.get("val_acc") is not None:
        acc.axhline(teacher["val_acc"], color="black", linestyle="--", label=f"teacher ({teacher.get('name', '')})")
    acc.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy")
    acc.legend(loc="best", fontsize="small")
    acc.grid(alpha=0.3)
    terms = list(LOSS_TERMS) + [t for t in (summary or {}).get("loss") or {} if t not in LOSS_TERMS]
    for term in terms:
        values = [r.get(term) for r in rows]
        if any(v for v in values):  # terms the mode switches off stay 0: not drawn
            loss.plot(epochs, [float("nan") if v is None else v for v in values], marker=".", label=term)
    loss.set(xlabel="epoch", ylabel="mean training loss", title="loss terms (weighted total and each term)")
    loss.legend()
    loss.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "curves.png"
    atomic_write(out, lambda p: fig.savefig(p, dpi=100, format="png"))
    return out


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def plot_sweep(rows: list[dict[str, Any]], out_dir: Path, teacher_acc: float | None = None) -> list[Path]:
    """`sweep_<param>.png` for each swept numeric parameter: best val accuracy (mean, error bars = std
    over seeds) against it, one line per combination of the other non-seed parameters.

    `rows` are the configuration rows of `kdtrain.sweep.summarise` (each has a `params` dict).
    """
    ok = [r for r in rows if r["n"] > 0]
    keys = sorted({k for r in ok for k in r["params"]})
    numeric = [
        k
        for k in keys
        if len({r["params"].get(k) for r in ok}) > 1
        and all(_number(r["params"][k]) is not None for r in ok if k in r["params"])
    ]
    varying = {k for k in keys if len({r["params"].get(k) for r in ok}) > 1}
    written: list[Path] = []
    for key in numeric:
        fig = _figure(6.5, 4.5)
        if fig is None:
            return written
        ax = fig.subplots()
        lines: dict[tuple, list[dict[str, Any]]] = {}
        for r in ok:
            if key not in r["params"]:
                continue
            others = tuple(sorted((k, v) for k, v in r["params"].items() if k != key and k in varying))
            lines.setdefault(others, []).append(r)
        for others, members in sorted(lines.items()):
            members.sort(key=lambda r: _number(r["params"][key]))
            label = " ".join(f"{k}={v}" for k, v in others) or "all runs"
            ax.errorbar(
                [_number(r["params"][key]) for r in members],
                [r["best_mean"] for r in members],
                yerr=[r["best_std"] or 0.0 for r in members],
                marker="o",
                capsize=3,
                label=label,
            )
        if teacher_acc is not None:
            ax.axhline(teacher_acc, color="black", linestyle="--", label="teacher")
        ax.set(xlabel=key, ylabel="best val accuracy (mean ± std over seeds)", title=f"accuracy against {key}")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = Path(out_dir) / f"sweep_{key.replace('/', '_')}.png"
        atomic_write(out, lambda p, fig=fig: fig.savefig(p, dpi=100, format="png"))  # no torn plot on a crash
        written.append(out)
    return written
