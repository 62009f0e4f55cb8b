"""`kdtrain-predict MODEL FOLDER --out preds.csv`: classify every image in a folder with a student.

MODEL is a run dir, a student `.safetensors` with kdtrain metadata, an exported TorchScript `.pt`
or an `.onnx` file (both with the `model.json` that kdtrain-export writes beside them), or an export
folder. Images (.png, .jpg, .jpeg, .bmp, .gif, .webp; searched recursively) are preprocessed as
recorded: converted to grayscale for a 1-channel model (RGB for 3), resized to cover the model's
input size and centre-cropped to it, scaled to [0, 1] and normalised with the training mean/std.
An image that cannot be read is skipped with a warning on stderr and left out of the CSV; a folder
without any image is an error.

The CSV has the columns path, pred (class id), prob (its softmax probability) and, when the class
names are known, class. Loading runs no code from the model file: safetensors and ONNX are data,
and a model spec read from a file may name registered models only (a custom `_target_` needs
--trust-model-code); a TorchScript file holds a TorchScript program (no Python pickle), so only load
exports you trust.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdtrain.errors import UserError, one_line_errors
from kdtrain.rundir import add_trust_flag, checked_shapes, load_student, load_student_file, open_run, resolve_device

TOOL = "kdtrain-predict"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
SIDECAR = "model.json"


def preprocessing_spec(
    in_shape: tuple[int, int, int] | list[int], mean: list[float], std: list[float], crop: float = 1.0
) -> dict[str, Any]:
    """How an image file becomes the model's input; recorded in model.json so it can be redone without kdtrain.
    `crop` < 1 (a student trained on the stream path, evaluated at size / 0.875 then centre-cropped): every
    image is resized to cover round(h / crop) x round(w / crop) first."""
    c, h, w = (int(v) for v in in_shape)
    colour = {1: "grayscale (PIL mode L)", 3: "RGB"}.get(c, f"{c} channels")
    color = {1: "L", 3: "RGB"}.get(c)
    cover_w, cover_h = round(w / crop), round(h / crop)
    resize = (
        f"if its size is not {w} x {h} (width x height): resize it, keeping its aspect ratio, so that it covers "
        f"{w} x {h} (bilinear), then crop the centre {w} x {h}"
        if crop == 1
        else f"resize it, keeping its aspect ratio, so that it covers {cover_w} x {cover_h} (width x height, "
        f"bilinear), then crop the centre {w} x {h}"
    )
    return {
        "color": color,  # PIL mode: L (grayscale) for 1 channel, RGB for 3
        "size": [h, w],
        "resize": "cover-then-center-crop",  # scale (keeping the aspect) to cover h x w, crop the centre
        **({"crop": crop} if crop != 1 else {}),  # cover h / crop x w / crop first
        "interpolation": "bilinear",
        "scale": 1 / 255,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "steps": [
            f"decode the image and convert it to {colour}",
            resize,
            "scale 8-bit pixel values to [0, 1] (divide by 255)",
            "normalise each channel: (x - mean[c]) / std[c]",
            f"stack as float32 of shape (batch, {c}, {h}, {w})",
        ],
    }


def load_image(path: Path, spec: dict[str, Any]) -> Tensor:
    """One image file as a normalised (C, H, W) float32 tensor, per `spec` (see preprocessing_spec)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert(spec["color"])
        h, w = spec["size"]
        crop = float(spec.get("crop", 1.0))
        if img.size != (w, h) or crop != 1:
            # As kdtrain's imagefolder dataset does: no distortion of non-square images.
            cover_w, cover_h = round(w / crop), round(h / crop)
            scale = max(cover_w / img.width, cover_h / img.height)
            new_w, new_h = max(cover_w, round(img.width * scale)), max(cover_h, round(img.height * scale))
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
            left, top = (new_w - w) // 2, (new_h - h) // 2
            img = img.crop((left, top, left + w, top + h))
        arr = np.asarray(img, dtype=np.float32) * float(spec["scale"])
    x = torch.from_numpy(arr.reshape(h, w, -1)).permute(2, 0, 1)
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32).view(-1, 1, 1)
    return ((x - mean) / std).contiguous()


@dataclass
class Predictor:
    logits: Callable[[Tensor], Any]  # (N, C, H, W) float32 -> (N, classes) logits, tensor or numpy
    spec: dict[str, Any]
    num_classes: int
    class_names: list[str] | None
    description: str


def _sidecar(model: Path) -> dict[str, Any]:
    for path in (model.with_suffix(".json"), model.parent / SIDECAR):
        if path.is_file():
            try:
                meta = json.loads(path.read_text())
            except (json.JSONDecodeError, RecursionError) as e:
                raise UserError(f"{path} is not valid JSON ({e}); re-export with kdtrain-export") from None
            missing = [k for k in ("in_shape", "mean", "std", "num_classes") if k not in meta]
            if missing:
                raise UserError(f"{path} lacks {', '.join(missing)}; re-export the model with kdtrain-export")
            checked_shapes(meta, path)
            return meta
    raise UserError(
        f"{model} needs its {SIDECAR} (input shape, normalisation) beside it; copy it from the "
        "kdtrain-export folder or re-export"
    )


def _torch_predictor(student: Any, device: torch.device, description: str) -> Predictor:
    model = student.model.to(device).eval()

    @torch.no_grad()
    def run(x: Tensor) -> Tensor:
        return model(x.to(device)).float().cpu()

    spec = preprocessing_spec(student.in_shape, student.mean, student.std, student.crop)
    return Predictor(run, spec, student.num_classes, student.class_names, description)


def _from_sidecar(meta: dict[str, Any], logits: Callable[[Tensor], Any], description: str) -> Predictor:
    spec = meta.get("preprocessing") or preprocessing_spec(meta["in_shape"], meta["mean"], meta["std"])
    return Predictor(logits, spec, int(meta["num_classes"]), meta.get("class_names"), description)


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive holds its program under code/; a checkpoint holds only data.pkl (read as a zip, "
    "no unpickling)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in name or name.startswith("code/") for name in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_predictor(model: str | Path, device: torch.device, trust_model_code: bool = False) -> Predictor:
    """Anything kdtrain can predict with, by what `model` is (see the module docstring);
    `trust_model_code`: a custom model named in a run's config or the weights' metadata may be built."""
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / ".hydra" / "config.yaml").is_file():
            return _torch_predictor(load_student(open_run(path), trust=trust_model_code), device, f"run {path}")
        for name in ("model.onnx", "model.pt", "model.pt2"):
            if (path / name).is_file() and (path / SIDECAR).is_file():
                return load_predictor(path / name, device)
        raise UserError(
            f"{path} is neither a kdtrain run dir nor a kdtrain-export folder; give one of those, "
            "a student .safetensors, a .pt or an .onnx file"
        )
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a run dir, a student .safetensors, or an exported .pt/.onnx")
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        raise UserError(
            f"{path} is a torch.export program, which loads through pickle and could run code, so kdtrain does "
            "not load it; give the run dir, its student.safetensors or model.onnx (kdtrain-export --format onnx), "
            "or load it in your own code with torch.export.load if you trust its source"
        )
    if suffix == ".safetensors":
        return _torch_predictor(load_student_file(path, trust_model_code), device, f"weights {path}")
    if suffix == ".onnx":
        meta = _sidecar(path)
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("predicting with an .onnx model needs onnxruntime; pip install kdtrain[onnx]") from None
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            raise UserError(
                f"{path} is not a loadable ONNX model ({str(e).splitlines()[0][:200]}); re-export it"
            ) from None
        name = session.get_inputs()[0].name
        return _from_sidecar(meta, lambda x: session.run(None, {name: x.numpy()})[0], f"ONNX {path}")
    if suffix in (".pt", ".pth", ".ts"):
        if not _is_torchscript(path):
            raise UserError(
                f"{path} is not a TorchScript export (a training checkpoint, or corrupt); give the run dir, or "
                "export the student with kdtrain-export and give its model.pt"
            )
        meta = _sidecar(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream, still loads
                module = torch.jit.load(str(path), map_location=device)
        except Exception as e:  # not a TorchScript archive (e.g. a training checkpoint), or corrupt
            raise UserError(
                f"{path} is not a TorchScript model ({str(e).strip().splitlines()[0][:160]}); "
                "give the model.pt that kdtrain-export wrote, or the run dir"
            ) from None
        module.eval()

        @torch.no_grad()
        def run(x: Tensor) -> Tensor:
            return module(x.to(device)).float().cpu()

        return _from_sidecar(meta, run, f"TorchScript {path}")
    raise UserError(f"{path} has an unknown suffix; give a run dir, a .safetensors, a TorchScript .pt or an .onnx file")


def find_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; give a folder of images (.png, .jpg, ...)")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise UserError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}, searched recursively)")
    return images


def predict_folder(predictor: Predictor, folder: Path, out: Path, batch_size: int = 256) -> tuple[int, list[Path]]:
    """Write the CSV; return (rows written, images skipped)."""
    from tqdm import tqdm

    if predictor.spec.get("color") not in ("L", "RGB"):
        raise UserError(
            f"the model takes {predictor.spec.get('color')} images; kdtrain-predict reads 1- or 3-channel images only"
        )
    images = find_images(folder)
    skipped: list[Path] = []
    rows = 0
    names = predictor.class_names
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with (
        open(tmp, "w", newline="") as f,
        tqdm(total=len(images), unit="img", desc=TOOL, file=sys.stderr, disable=None) as bar,
    ):
        writer = csv.writer(f)
        writer.writerow(["path", "pred", "prob"] + (["class"] if names else []))
        for start in range(0, len(images), batch_size):
            paths, tensors = [], []
            for p in images[start : start + batch_size]:
                try:
                    tensors.append(load_image(p, predictor.spec))
                    paths.append(p)
                except Exception as e:  # unreadable, truncated or not really an image: skip it, say so
                    skipped.append(p)
                    tqdm.write(
                        f"{TOOL}: warning: skipped {p}: cannot read it as an image ({str(e)[:120]})", file=sys.stderr
                    )
            bar.update(len(paths) + len(images[start : start + batch_size]) - len(paths))
            if not tensors:
                continue
            logits = torch.as_tensor(predictor.logits(torch.stack(tensors))).float()
            prob, pred = logits.softmax(1).max(1)
            for p, c, q in zip(paths, pred.tolist(), prob.tolist()):
                writer.writerow([str(p), c, f"{q:.6f}"] + ([names[c] if c < len(names) else ""] if names else []))
                rows += 1
    if rows == 0:
        tmp.unlink()
        raise UserError(
            f"none of the {len(images)} images in {folder} could be read; check that they are valid image files"
        )
    tmp.replace(out)
    return rows, skipped


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=TOOL, description="Classify a folder of images with a kdtrain student.")
    p.add_argument(
        "model", help="run dir, student .safetensors, exported model.pt or model.onnx (with model.json beside it)"
    )
    p.add_argument("folder", type=Path, help="folder of images, searched recursively")
    p.add_argument("--out", type=Path, default=Path("preds.csv"), help="CSV to write (default: preds.csv)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto, for PyTorch models (default: cpu)")
    add_trust_flag(p)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    return args


@one_line_errors(TOOL)
def main(argv: list[str] | None = None) -> None:
    """Entry point of kdtrain-predict."""
    args = parse_args(argv)
    predictor = load_predictor(args.model, resolve_device(args.device), args.trust_model_code)
    rows, skipped = predict_folder(predictor, args.folder, args.out, args.batch_size)
    extra = f"; {len(skipped)} unreadable image(s) skipped" if skipped else ""
    print(f"{TOOL}: {rows} predictions by {predictor.description} written to {args.out}{extra}")


if __name__ == "__main__":
    main()
