"""`kdtrain-export RUN_DIR --format export|onnx|torchscript|all [--out DIR]`: the student, usable without kdtrain.

Writes `model.pt2` (a torch.export ExportedProgram: `torch.export.load(path).module()`, or AOTInductor for
C++), `model.onnx` (needs pip install kdtrain[onnx]) and, on request, `model.pt` (TorchScript, traced; PyTorch
deprecates TorchScript, kept for libtorch/mobile users who still need it). Each is checked at export time
against the PyTorch student on real batches of two sizes (the batch dimension is dynamic); `model.json`
holds the input shape and dtype, normalisation, preprocessing, number and names of classes, and the parity.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

import kdtrain
from kdtrain.checkpoint import atomic_write
from kdtrain.data.batches import make_batches
from kdtrain.errors import UserError, one_line_errors
from kdtrain.predict import preprocessing_spec
from kdtrain.rundir import add_trust_flag, build_splits, load_student, open_run

TOOL = "kdtrain-export"
FORMATS = ("export", "onnx", "torchscript")
ALL = ("export", "onnx")  # --format all: the two formats that are not deprecated
FILES = {"export": "model.pt2", "onnx": "model.onnx", "torchscript": "model.pt"}
INPUT, OUTPUT = "input", "logits"
ATOL = 1e-4
PARITY_BATCH = 256  # validation samples an export is checked on


def parity_batches(x: Tensor) -> list[Tensor]:
    """Real inputs to check an export on: a full batch and an odd-sized one (tests the dynamic batch)."""
    big = x[: min(len(x), PARITY_BATCH)]
    return [big, x[: min(len(x), 7)]]


def max_abs_diff(run: Any, reference: nn.Module, batches: list[Tensor]) -> float:
    with torch.no_grad():
        return max(float((torch.as_tensor(run(b)).float() - reference(b).float()).abs().max()) for b in batches)


def export_program(model: nn.Module, example: Tensor, path: Path) -> Any:
    """torch.export the model with a dynamic batch dimension, save it as .pt2, and return the reloaded module.

    Reloading our own fresh file is safe; torch.export.load unpickles, so kdtrain never loads a .pt2 it is
    handed (kdtrain-predict refuses them; see predict.py)."""
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as e:  # data-dependent control flow and the like: torch.export cannot capture the model
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"the student cannot be captured by torch.export ({first}); use --format onnx") from None
    atomic_write(path, lambda p: torch.export.save(program, str(p)))
    loaded = torch.export.load(str(path)).module()
    return lambda b: loaded(b)


def export_torchscript(model: nn.Module, example: Tensor, path: Path) -> Any:
    """Trace `model` on `example`, save it, and return the reloaded module (what users will load)."""
    with warnings.catch_warnings(), torch.no_grad():
        # torch deprecates TorchScript in favour of torch.export, but it is still the format that runs
        # without Python (C++ libtorch, mobile); the parity check below guards the result.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, example)
        atomic_write(path, lambda p: torch.jit.save(traced, str(p)))
        loaded = torch.jit.load(str(path), map_location="cpu")
    return lambda b: loaded(b)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("ONNX export needs the onnx and onnxruntime packages; pip install kdtrain[onnx]") from None


def export_onnx(model: nn.Module, example: Tensor, path: Path) -> Any:
    """Export with a dynamic batch dimension; returns an onnxruntime runner for the saved file."""
    _require_onnx()
    import onnxruntime as ort

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _onnx_export(model, example, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda b: session.run(None, {name: b.numpy()})[0]


def _onnx_export(model: nn.Module, example: Tensor, tmp: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # The TorchScript-based exporter is fast and needs no onnxscript; torch 2.9+ deprecates it.
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamo=False,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                opset_version=17,
            )
        except (TypeError, RuntimeError, AttributeError, NotImplementedError):
            # Legacy exporter gone or unable: the torch.export-based one (needs onnxscript).
            try:
                import onnxscript  # noqa: F401
            except ImportError:
                raise UserError("ONNX export with this PyTorch needs onnxscript; pip install kdtrain[onnx]") from None
            batch = torch.export.Dim("batch", min=1)
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # it narrates each step on stdout
                    torch.onnx.export(
                        model,
                        (example,),
                        str(tmp),
                        dynamo=True,
                        input_names=[INPUT],
                        output_names=[OUTPUT],
                        dynamic_shapes=({0: batch},),
                        external_data=False,
                    )
            except Exception as e:  # the model uses something torch.export cannot capture
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise UserError(f"the student cannot be exported to ONNX ({first}); use --format torchscript") from None


def export(
    run_dir: str,
    formats: list[str],
    out: Path | None,
    checkpoint: str | None,
    overrides: list[str],
    atol: float = ATOL,
    trust_model_code: bool = False,
) -> dict[str, Any]:
    """Export the run's student in `formats` into `out`; returns the model.json record.
    `trust_model_code`: a custom model named in the run's config may be built."""
    run = open_run(run_dir)
    if "onnx" in formats:
        _require_onnx()  # before any work
    splits, dataset = build_splits(run, overrides)
    student = load_student(run, checkpoint, splits, dataset, trust_model_code)
    if tuple(splits.in_shape) != tuple(student.in_shape):
        raise UserError(
            f"the dataset's inputs have shape {tuple(splits.in_shape)} but the student takes "
            f"{tuple(student.in_shape)}; drop the dataset overrides"
        )
    out = Path(out) if out is not None else run.path / "export"
    out.mkdir(parents=True, exist_ok=True)
    model = student.model.cpu().eval()
    first, _, _ = next(make_batches(splits.val, PARITY_BATCH, torch.device("cpu"), shuffle=False).epoch())
    batches = parity_batches(first)
    files: dict[str, Any] = {}
    for fmt in formats:
        path = out / FILES[fmt]
        writer = {"export": export_program, "onnx": export_onnx, "torchscript": export_torchscript}[fmt]
        runner = writer(model, batches[0], path)
        diff = max_abs_diff(runner, model, batches)
        if not diff <= atol:  # also catches NaN
            raise UserError(
                f"the {fmt} export {path} does not reproduce the PyTorch student (max abs diff {diff:.3g} > "
                f"{atol:g}); it is left for inspection, but do not deploy it"
            )
        files[fmt] = {
            "file": path.name,
            "parity_max_abs_diff": diff,
            "parity_atol": atol,
            "parity_batches": [len(b) for b in batches],
        }
    c, h, w = student.in_shape
    record = {
        "format_version": 1,
        "producer": f"kdtrain {getattr(kdtrain, '__version__', '')}".strip(),
        "files": files,
        "input": {"name": INPUT, "shape": ["batch", c, h, w], "dtype": "float32", "layout": "NCHW"},
        "output": {
            "name": OUTPUT,
            "shape": ["batch", student.num_classes],
            "dtype": "float32",
            "meaning": "unnormalised class scores; softmax gives probabilities, argmax the class id",
        },
        "in_shape": [c, h, w],
        "num_classes": student.num_classes,
        "class_names": student.class_names,
        "mean": student.mean,
        "std": student.std,
        "preprocessing": preprocessing_spec(student.in_shape, student.mean, student.std, student.crop),
        "student": {
            "name": student.name,
            "config": OmegaConf.to_container(run.cfg.student, resolve=True),
            "weights": str(student.weights),
        },
        "dataset": str(run.cfg.dataset.name),
        "run_dir": str(run.path),
    }
    atomic_write(out / "model.json", lambda p: p.write_text(json.dumps(record, indent=2, default=str) + "\n"))
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=TOOL, description="Export a finished kdtrain run's student (torch.export .pt2, ONNX, TorchScript)."
    )
    p.add_argument("run_dir", help="the run dir that kdtrain wrote (its hydra.run.dir)")
    p.add_argument(
        "overrides", nargs="*", help="dataset.KEY=VALUE overrides of the run's dataset (for the parity batch)"
    )
    p.add_argument(
        "--format",
        choices=(*FORMATS, "all"),
        default="export",
        help="export: model.pt2 (torch.export, default); onnx: model.onnx; torchscript: model.pt (traced, deprecated "
        "by PyTorch); all: export + onnx",
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/export)")
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="best|last|PATH",
        help="student weights: best or last checkpoint, or a .pt/.safetensors file (default: student.safetensors)",
    )
    p.add_argument(
        "--atol",
        type=float,
        default=ATOL,
        help=f"largest logit difference accepted by the parity check (default {ATOL:g})",
    )
    add_trust_flag(p)
    return p.parse_intermixed_args(argv)


@one_line_errors(TOOL)
def main(argv: list[str] | None = None) -> None:
    """Entry point of kdtrain-export."""
    args = parse_args(argv)
    formats = list(ALL) if args.format == "all" else [args.format]
    record = export(args.run_dir, formats, args.out, args.checkpoint, args.overrides, args.atol, args.trust_model_code)
    out = Path(args.out) if args.out is not None else Path(args.run_dir).expanduser() / "export"
    for fmt, info in record["files"].items():
        print(
            f"{fmt}: {out / info['file']} (parity on real batches of {info['parity_batches']}: "
            f"max abs diff {info['parity_max_abs_diff']:.2e} <= {info['parity_atol']:g})"
        )
    print(f"sidecar: {out / 'model.json'} (input {record['input']['shape']}, {record['num_classes']} classes)")


if __name__ == "__main__":
    main()
