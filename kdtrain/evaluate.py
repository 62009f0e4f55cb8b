"""`kdtrain-eval RUN_DIR [dataset.KEY=VALUE ...]`: evaluate a finished run's student (or its teacher).

Reports top-1/top-5 accuracy, expected calibration error (15 equal-width confidence bins), negative
log-likelihood, per-class accuracy, the confusion matrix and the top-1 agreement between student
and teacher (when the teacher's weights are still there). Writes a JSON file, a confusion-matrix
PNG (when matplotlib is installed: pip install kdtrain[plots]) and a table on the terminal.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from kdtrain.checkpoint import atomic_write
from kdtrain.data import DataSet
from kdtrain.data.batches import make_batches
from kdtrain.errors import UserError, one_line_errors
from kdtrain.report import pct
from kdtrain.rundir import add_trust_flag, build_splits, load_student, load_teacher, note, open_run, resolve_device

TOOL = "kdtrain-eval"
ECE_BINS = 15


@torch.no_grad()
@torch.no_grad()
def logits_of(model: nn.Module, data: DataSet, device: torch.device, batch_size: int = 512) -> Tensor:
    """float32 logits on the CPU for every sample of `data`, in eval mode (no autocast: exact metrics)."""
    model = model.to(device).eval()
    return torch.cat([model(x).float().cpu() for x, _, _ in make_batches(data, batch_size, device, False).epoch()])


def expected_calibration_error(probs: Tensor, y: Tensor, bins: int = ECE_BINS) -> float:
    """sum over bins of |bin| / N * |accuracy(bin) - mean confidence(bin)|; bins split (0, 1] evenly."""
    conf, pred = probs.max(1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.float().mean() * (correct[inside].mean() - conf[inside].mean()).abs()
    return float(ece)


def metrics(
    logits: Tensor, y: Tensor, num_classes: int, reference: Tensor | None = None, names: list[str] | None = None
) -> dict[str, Any]:
    """Classification metrics of `logits` (N, C) against labels `y` (N,); `reference`: another model's top-1."""
    probs = logits.float().softmax(1)
    pred = probs.argmax(1)
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices
    correct = pred == y
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    confusion.index_put_((y, pred), torch.ones_like(y), accumulate=True)
    per_class = []
    for c in range(num_classes):
        support = int((y == c).sum())
        per_class.append(
            {
                "class": c,
                "name": names[c] if names and c < len(names) else None,
                "support": support,
                "acc": correct[y == c].float().mean().item() if support else None,
            }
        )
    return {
        "samples": len(y),
        "top1": correct.float().mean().item(),
        "top5": (topk == y[:, None]).any(1).float().mean().item(),
        "top5_k": k,
        "ece": expected_calibration_error(probs, y),
        "ece_bins": ECE_BINS,
        "nll": torch.nn.functional.cross_entropy(logits.float(), y).item(),
        "agreement": None if reference is None else (pred == reference).float().mean().item(),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def plot_confusion(confusion: list[list[int]], names: list[str] | None, title: str, path: Path) -> bool:
    """Row-normalised confusion matrix as a PNG; False (and a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note(TOOL, "matplotlib is not installed, so no confusion-matrix PNG (pip install kdtrain[plots])")
        return False
    counts = torch.tensor(confusion, dtype=torch.float64)
    rows = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(confusion)
    labels = names or [str(i) for i in range(n)]
    size = max(4.0, min(0.45 * n + 2, 24.0))
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if n <= 30:  # beyond that, tick labels and counts are unreadable
        ax.set_xticks(range(n), labels, rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), labels)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    if counts[i, j]:
                        ax.text(
                            j,
                            i,
                            int(counts[i, j]),
                            ha="center",
                            va="center",
                            fontsize=8,
                            color="white" if rows[i, j] > 0.5 else "black",
                        )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return True


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    m = report["metrics"]
    table = Table(title=f"kdtrain-eval: {report['role']} ({report['model']}) on {report['dataset']} {report['split']}")
    for col in ("samples", "top-1", f"top-{m['top5_k']}", "ECE", "NLL", "agreement"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{m['samples']:,}",
        pct(m["top1"]),
        pct(m["top5"]),
        f"{m['ece']:.4f}",
        f"{m['nll']:.4f}",
        pct(m["agreement"]),
    )
    console.print(table)
    per_class = Table(title="per-class accuracy")
    per_class.add_column("class")
    per_class.add_column("support", justify="right")
    per_class.add_column("acc", justify="right")
    for row in m["per_class"]:
        label = str(row["class"]) if row["name"] in (None, str(row["class"])) else f"{row['class']} ({row['name']})"
        per_class.add_row(label, str(row["support"]), pct(row["acc"]))
    console.print(per_class)
    if report["agreement_with"] is None:
        console.print("Agreement: not computed (the other model's weights are not available).")
    console.print(f"Weights: {report['weights']}")
    console.print(f"Written: {report['json']}" + (f", {report['confusion_png']}" if report["confusion_png"] else ""))


def default_json(run_dir: Path, teacher: bool, checkpoint: str | None, split: str) -> Path:
    """eval.json for the student's final weights on val; other choices get a suffix so nothing is overwritten."""
    tags = []
    if teacher:
        tags.append("teacher")
    elif checkpoint is not None:
        tags.append(checkpoint if checkpoint in ("best", "last") else Path(checkpoint).stem)
    if split != "val":
        tags.append(split)
    return run_dir / ("eval" + "".join(f"-{t}" for t in tags) + ".json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=TOOL,
        description="Evaluate a finished kdtrain run's student (or its teacher) on the run's dataset.",
        epilog="Examples: kdtrain-eval outputs/runs/DAY/TIME; kdtrain-eval RUN --checkpoint best --split train; "
        "kdtrain-eval RUN dataset.root=/data/cifar",
    )
    p.add_argument("run_dir", help="the run dir that kdtrain wrote (its hydra.run.dir)")
    p.add_argument("overrides", nargs="*", help="dataset.KEY=VALUE overrides of the run's dataset config")
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="best|last|PATH",
        help="student weights: best or last checkpoint, or a .pt/.safetensors file (default: student.safetensors)",
    )
    p.add_argument("--teacher", action="store_true", help="evaluate the teacher this run distilled from instead")
    p.add_argument(
        "--split",
        choices=("val", "train"),
        default="val",
        help="val, or train: the labelled samples of the student's training set",
    )
    p.add_argument("--json", type=Path, default=None, help="where to write the results (default: RUN_DIR/eval.json)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    add_trust_flag(p)
    args = p.parse_intermixed_args(argv)
    if args.teacher and args.checkpoint is not None:
        p.error("--checkpoint picks student weights; it cannot be combined with --teacher")
    return args


def evaluate_run(args: argparse.Namespace) -> dict[str, Any]:
    run = open_run(args.run_dir)
    device = resolve_device(args.device)
    splits, dataset = build_splits(run, args.overrides)
    data = splits.val
    if args.split == "train":
        data = splits.train.subset(splits.train.y >= 0)
        note(
            TOOL,
            f"train: the {len(data)} labelled samples of the student's training set "
            "(dataset.labelled_per_class=null evaluates on every training sample)",
        )
    if len(data) == 0:
        raise UserError(f"the {args.split} split has no labelled samples to evaluate on")
    student = load_student(run, args.checkpoint, splits, dataset, args.trust_model_code)
    if student.num_classes != splits.num_classes or tuple(student.in_shape) != tuple(splits.in_shape):
        raise UserError(
            f"the dataset now has {splits.num_classes} classes of shape {tuple(splits.in_shape)} but the student "
            f"was trained on {student.num_classes} of shape {tuple(student.in_shape)}; drop the dataset overrides"
        )
    if [round(v, 6) for v in splits.mean] != [round(v, 6) for v in student.mean]:
        note(
            TOOL,
            f"the dataset's normalisation (mean {splits.mean}) differs from the student's training data "
            f"(mean {student.mean}); accuracy may suffer",
        )
    teacher = load_teacher(run, student.num_classes, student.in_shape, args.trust_model_code)
    if args.teacher and teacher is None:
        raise UserError(
            f"the teacher of {run.path} is gone (its store folder or checkpoint no longer exists); "
            "retrain it with the same config, or evaluate the student"
        )
    if teacher is None:
        note(TOOL, "the run's teacher weights are not available, so no teacher-student agreement")

    student_logits = logits_of(student.model, data, device)
    teacher_logits = logits_of(teacher[0], data, device) if teacher is not None else None
    if args.teacher:
        logits, other, role, name, weights = (
            teacher_logits,
            student_logits,
            "teacher",
            str(run.cfg.teacher.name),
            teacher[1],
        )
    else:
        logits, other, role, name, weights = student_logits, teacher_logits, "student", student.name, student.weights
    reference = None if other is None else other.argmax(1)
    result = metrics(logits, data.y, student.num_classes, reference, student.class_names)

    out = args.json or default_json(run.path, args.teacher, args.checkpoint, args.split)
    png = out.with_name(out.stem + "-confusion.png")
    title = f"{role} {name}, {run.cfg.dataset.name} {args.split}: top-1 {100 * result['top1']:.2f}%"
    png_written = plot_confusion(result["confusion"], student.class_names, title, png)
    report = {
        "run_dir": str(run.path),
        "role": role,
        "model": name,
        "weights": str(weights),
        "checkpoint": args.checkpoint or "final",
        "dataset": str(run.cfg.dataset.name),
        "dataset_overrides": list(args.overrides),
        "split": args.split,
        "agreement_with": None if other is None else ("student" if args.teacher else "teacher"),
        "metrics": result,
        "class_names": student.class_names,
        "json": str(out),
        "confusion_png": str(png) if png_written else None,
    }
    atomic_write(out, lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    return report


@one_line_errors(TOOL)
def main(argv: list[str] | None = None) -> None:
    """Entry point of kdtrain-eval."""
    print_report(evaluate_run(parse_args(argv)))


if __name__ == "__main__":
    main()
