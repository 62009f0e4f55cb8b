"""A finished run dir read back for `kdtrain-eval`, `kdtrain-export` and `kdtrain-predict`.

Everything is rebuilt from what the run wrote: the resolved config (`.hydra/config.yaml`), the
student's weights with their metadata (`student.safetensors`), the checkpoints and `summary.json`.
Weights load through `kdtrain.checkpoint` (safetensors, or `torch.load(weights_only=True)`), and a
model spec read from these files may name registered models only (a `custom` `_target_` is refused
unless the user passes --trust-model-code), so no file can run code.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from kdtrain.checkpoint import load_into, load_state_dict_file
from kdtrain.data import StreamSet
from kdtrain.data.batches import EVAL_CROP
from kdtrain.errors import UserError

STUDENT_FILE = "student.safetensors"
CHECKPOINTS = ("best", "last")
# Metadata keys run.py writes into student.safetensors (JSON strings).
META_KEYS = ("model", "num_classes", "in_shape", "mean", "std")


@dataclass
class Run:
    path: Path
    cfg: DictConfig  # the resolved config the run was trained with
    summary: dict[str, Any] | None  # None while the run is unfinished


@dataclass
class Student:
    """A model ready for inference (eval mode, CPU) and what is needed to feed it."""

    model: nn.Module
    weights: Path
    name: str
    num_classes: int
    in_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    class_names: list[str] | None = None
    crop: float = 1.0  # the evaluation crop: images resized to cover in_shape / crop, then centre-cropped


def note(tool: str, message: str) -> None:
    print(f"{tool}: note: {message}", file=sys.stderr)


def add_trust_flag(parser: Any) -> None:
    """--trust-model-code: allow a custom model (`_target_`, code that is imported and called) named in a file."""
    parser.add_argument(
        "--trust-model-code",
        action="store_true",
        help="allow a custom model (_target_) named in the run's config or the weights' metadata: that imports "
        "and calls code the file names, so only for files you trust (default: refused)",
    )


def open_run(path: str | Path) -> Run:
    """Read a run dir's resolved config (and summary.json when the run finished)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; give the run dir that kdtrain wrote (its hydra.run.dir)")
    config = path / ".hydra" / "config.yaml"
    if not config.is_file():
        raise UserError(
            f"{path} has no .hydra/config.yaml, so it is not a kdtrain run dir; give the folder a kdtrain run wrote"
        )
    try:
        cfg = OmegaConf.load(config)
    except Exception as e:  # YAML syntax errors and the like
        raise UserError(f"{config} cannot be read ({str(e).splitlines()[0]}); restore the file the run wrote") from None
    summary = None
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path / 'summary.json'} is not valid JSON ({e}); restore the file the run wrote"
            ) from None
    return Run(path, cfg, summary)


def dataset_config(run: Run, overrides: list[str]) -> DictConfig:
    """The run's dataset config, typed by the schema, with `dataset.KEY=VALUE` overrides applied."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from kdtrain.config import DatasetConfig

    schema = OmegaConf.structured(DatasetConfig)
    OmegaConf.set_struct(schema, False)  # keys added at training time with +dataset.KEY=... are kept
    ds = OmegaConf.merge(schema, run.cfg.dataset)
    OmegaConf.set_struct(ds, True)
    for text in overrides:
        try:
            override = OverridesParser.create().parse_overrides([text])[0]
        except OverrideParseException as e:
            raise UserError(f"cannot parse {text!r}: {str(e).splitlines()[0]}; write dataset.KEY=VALUE") from None
        key = override.key_or_group
        if not key.startswith("dataset.") or override.is_delete():
            raise UserError(
                f"{text!r} is not a dataset override; only the run's dataset settings can be changed here, "
                "e.g. dataset.root=/data/cifar (the student stays the one the run trained)"
            )
        sub = key[len("dataset.") :]
        try:
            if override.is_add():
                with open_dict(ds):
                    OmegaConf.update(ds, sub, override.value(), merge=True)
            else:
                OmegaConf.update(ds, sub, override.value(), merge=True)
        except OmegaConfBaseException as e:
            reason = str(e).splitlines()[0]
            if "not in" in reason:
                raise UserError(
                    f"{key} is not a dataset setting; check the spelling (the run's settings: "
                    f"{', '.join('dataset.' + str(k) for k in ds)})"
                ) from None
            raise UserError(f"{text} is not accepted: {reason}") from None
    return ds


def build_splits(run: Run, overrides: list[str]) -> tuple[Any, DictConfig]:
    """The run's dataset rebuilt (with overrides) through the dataset registry, and its config."""
    from kdtrain.data import build_dataset

    dataset = dataset_config(run, overrides)
    return build_dataset(dataset), dataset


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_MNIST_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def class_names(dataset: Any, splits: Any = None) -> list[str] | None:
    """Class names when known: a `class_names`/`classes` attribute of the splits, the fixed names of the
    built-in datasets, or imagefolder's sorted train/ subfolders (when dataset.root is still there)."""
    for attr in ("class_names", "classes"):
        names = getattr(splits, attr, None)
        if names:
            return [str(n) for n in names]
    name = str(dataset.name)
    if name in ("digits", "mnist"):
        return [str(i) for i in range(10)]
    if name == "cifar10":
        return list(CIFAR10_NAMES)
    if name == "fashion_mnist":
        return list(FASHION_MNIST_NAMES)
    if name == "imagefolder" and dataset.get("root"):
        train = Path(str(dataset.root)).expanduser() / "train"
        if train.is_dir():  # the same rule as kdtrain.data.imagefolder: sorted subfolders, hidden ones skipped
            return sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith(".")) or None
    return None


def read_meta(path: Path) -> dict[str, Any]:
    """kdtrain's metadata in a .safetensors file, decoded from JSON ({} when it has none)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a run dir or the path of a student .safetensors file")
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path} is not a readable safetensors file ({first[:200]}); it may be truncated or corrupt"
        ) from None
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
        except RecursionError:  # JSON nested thousands deep: not written by kdtrain
            raise UserError(
                f"{path} has metadata {key!r} nested too deeply to read; it was not written by kdtrain: give the "
                "student.safetensors a kdtrain run wrote"
            ) from None
    return meta


def checked_shapes(meta: dict[str, Any], where: Path) -> tuple[int, tuple[int, int, int], list[float], list[float]]:
    """(num_classes, in_shape, mean, std) from kdtrain metadata, checked: one UserError for a bad value."""
    try:
        num_classes = int(meta["num_classes"])
        in_shape = tuple(int(v) for v in meta["in_shape"])
        mean, std = [float(v) for v in meta["mean"]], [float(v) for v in meta["std"]]
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{where} has unusable kdtrain metadata ({e}); use the file kdtrain wrote") from None
    problem = (
        "num_classes must be >= 1"
        if num_classes < 1
        else "in_shape must be 3 sizes >= 1 (channels, height, width)"
        if len(in_shape) != 3 or min(in_shape) < 1
        else f"mean and std must hold one value per channel ({in_shape[0]})"
        if len(mean) != in_shape[0] or len(std) != in_shape[0]
        else "mean and std must be finite and std > 0"
        if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0
        else None
    )
    if problem:
        raise UserError(
            f"{where} has unusable kdtrain metadata ({problem}: num_classes={meta['num_classes']}, "
            f"in_shape={meta['in_shape']}, mean={meta['mean']}, std={meta['std']}); use the file kdtrain wrote"
        )
    return num_classes, in_shape, mean, std  # type: ignore[return-value]


def _build(
    model_cfg: dict[str, Any],
    num_classes: int,
    in_shape: tuple[int, int, int],
    role: str,
    weights: Path,
    what: str,
    source: Path,
    trust: bool,
) -> nn.Module:
    """The model `model_cfg` (read from the file `source`) names, with `weights`; a custom model only if `trust`."""
    from kdtrain.models import build_model

    if model_cfg.get("name") in ("torchvision", "timm"):  # the trained weights replace pretrained ones: skip them
        model_cfg = {**model_cfg, "pretrained": None}
    model = build_model(model_cfg, num_classes, in_shape, role, None if trust else str(source))
    load_into(model, load_state_dict_file(weights, what), what, weights)
    return model.eval().requires_grad_(False)


def load_student_file(path: Path, trust: bool = False) -> Student:
    """A student from a .safetensors file that carries kdtrain's metadata (model config, shapes, normalisation);
    `trust`: the metadata may name a custom model (code to run)."""
    meta = read_meta(path)
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise UserError(
            f"{path} has no kdtrain metadata ({', '.join(missing)} missing); give the student.safetensors "
            "a kdtrain run wrote, or its run dir"
        )
    num_classes, in_shape, mean, std = checked_shapes(meta, path)
    if not isinstance(meta["model"], dict):
        raise UserError(f"{path} has unusable kdtrain metadata (model is not a config); use the file kdtrain wrote")
    model = _build(meta["model"], num_classes, in_shape, "student", path, "student weights", path, trust)
    return Student(
        model,
        path,
        str(meta["model"].get("name")),
        num_classes,
        in_shape,
        mean,
        std,
        meta.get("class_names"),
        float(meta.get("crop", 1.0)),
    )


def student_weights(run: Run, checkpoint: str | None) -> Path:
    """student.safetensors (the final weights) by default; best/last checkpoint, or any weights file."""
    if checkpoint is None:
        path = run.path / STUDENT_FILE
        if path.is_file():
            return path
        last = run.path / "checkpoints" / "last.pt"
        if last.is_file():
            note("kdtrain", f"{run.path} has no {STUDENT_FILE} (unfinished run?); using {last}")
            return last
        raise UserError(
            f"{run.path} holds no student weights ({STUDENT_FILE} or checkpoints/last.pt); "
            "has the run trained for an epoch?"
        )
    if checkpoint in CHECKPOINTS:
        path = run.path / "checkpoints" / f"{checkpoint}.pt"
        if not path.is_file():
            raise UserError(
                f"{run.path} has no checkpoints/{checkpoint}.pt; use --checkpoint best|last|PATH with a file "
                "that exists"
            )
        return path
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise UserError(
            f"--checkpoint {checkpoint} is neither best, last nor an existing file; give best, last or a "
            ".pt/.safetensors path"
        )
    return path


def load_student(
    run: Run,
    checkpoint: str | None = None,
    splits: Any = None,
    dataset: DictConfig | None = None,
    trust: bool = False,
) -> Student:
    """The run's student with `checkpoint`'s weights.

    Shapes and normalisation come from student.safetensors' metadata (what the student was trained
    with), else from `splits` (the rebuilt dataset, from the `dataset` config). `trust`: the run's
    config may name a custom model (code to run).
    """
    weights = student_weights(run, checkpoint)
    final = run.path / STUDENT_FILE
    meta = read_meta(final) if final.is_file() else {}
    if all(k in meta for k in META_KEYS):
        num_classes, in_shape, mean, std = checked_shapes(meta, final)
    elif splits is not None:
        num_classes, in_shape, mean, std = (
            splits.num_classes,
            tuple(splits.in_shape),
            list(splits.mean),
            list(splits.std),
        )
    else:
        raise UserError(
            f"{run.path} has no {STUDENT_FILE} with kdtrain metadata; without it the input shape is unknown"
        )
    model_cfg = OmegaConf.to_container(run.cfg.student, resolve=True)
    model = _build(model_cfg, num_classes, in_shape, "student", weights, "student weights", _config_file(run), trust)
    names = class_names(dataset if dataset is not None else run.cfg.dataset, splits)
    crop = float(meta.get("crop", EVAL_CROP if isinstance(getattr(splits, "val", None), StreamSet) else 1.0))
    return Student(model, weights, str(model_cfg.get("name")), num_classes, in_shape, mean, std, names, crop)


def teacher_weights(run: Run) -> Path | None:
    """Where the run's teacher weights are: summary.json's teacher.source (a store folder or a
    checkpoint file), else teacher.checkpoint or the store key the config implies; None if gone."""
    candidates: list[Path] = []
    source = ((run.summary or {}).get("teacher") or {}).get("source")
    if source:
        candidates.append(Path(source).expanduser())
    if run.cfg.teacher.get("checkpoint"):
        candidates.append(Path(str(run.cfg.teacher.checkpoint)).expanduser())
    else:
        from kdtrain.teacher import teacher_key

        # The key covers the precision the teacher trained in: summary.json's, else each one amp allows.
        amp = (run.summary or {}).get("amp")
        try:
            store = Path(str(run.cfg.teacher_store)).expanduser()
            candidates += [store / teacher_key(run.cfg, a) for a in ([amp] if amp else ["off", "bfloat16", "float16"])]
        except (OmegaConfBaseException, KeyError, AttributeError):  # a config from another kdtrain version
            pass  # summary.json's source (above) is then the only lead
    for candidate in candidates:
        # A relative path is relative to where kdtrain ran: usually here, or an ancestor of the run dir
        # (the default run dir outputs/runs/DAY/TIME sits beside the default store outputs/teachers).
        tries = (
            [candidate]
            if candidate.is_absolute()
            else [candidate, *(a / candidate for a in run.path.resolve().parents)]
        )
        for path in tries:
            if path.is_dir() and (path / "teacher.safetensors").is_file():
                return path / "teacher.safetensors"
            if path.is_file():
                return path
    return None


def load_teacher(
    run: Run, num_classes: int, in_shape: tuple[int, int, int], trust: bool = False
) -> tuple[nn.Module, Path] | None:
    """The teacher the run distilled from (eval mode, CPU), or None when its weights are gone;
    `trust`: the run's config may name a custom model (code to run)."""
    path = teacher_weights(run)
    if path is None:
        return None
    from kdtrain.checkpoint import file_sha256
    from kdtrain.teacher import sidecar_sha256

    expected = sidecar_sha256(path)  # the store's meta.json, or a checkpoint's PATH.sha256
    if expected is not None and file_sha256(path) != expected:
        raise UserError(
            f"the teacher weights {path} fail the sha256 recorded beside them: the file changed after it was "
            "written (corrupt); run kdtrain again with this config to store the teacher anew"
        )
    model_cfg = OmegaConf.to_container(run.cfg.teacher, resolve=True)
    return _build(model_cfg, num_classes, in_shape, "teacher", path, "teacher weights", _config_file(run), trust), path


def _config_file(run: Run) -> Path:
    return run.path / ".hydra" / "config.yaml"


def resolve_device(name: str) -> torch.device:
    from kdtrain.run import resolve_device as resolve

    return resolve(name)
