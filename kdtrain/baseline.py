"""The student alone: what a user gets without a teacher, the baseline every gain is measured against.

It trains on the labelled samples only (a transfer set's unlabelled samples are of no use without a
teacher), with the run's student, optimizer, schedule and seed, and as many optimizer steps as the
distilled student: each epoch draws `len(transfer set)` samples from the labelled ones (each labelled
sample repeated about len(transfer set) / len(labelled) times), so a batch holds `batch_size` labelled
samples and the epochs, the schedule and the per-epoch curves line up with the student's.

It is fully determined by the student, the data and labels, the recipe, the seed and the numerics
(autocast, device type), not by the teacher, so it is trained once and kept in a store beside the
teachers (`<teacher_store>/baselines/<key>/`, key = a hash of all that), under a file lock: later
runs and every job of a sweep (over temperature, mode, ...) reuse it. While it trains it writes
checkpoints into `<store>/.<key>.partial/`; an interrupted baseline continues from there, exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kdtrain import distributed
from kdtrain.checkpoint import (
    atomic_write,
    file_sha256,
    load_into,
    load_state_dict_file,
    load_training_checkpoint,
    save_weights,
)
from kdtrain.data import DataSet, Splits, data_identity
from kdtrain.engine import FitSpec, Resume, fit, predict
from kdtrain.errors import UserError, write_problem
from kdtrain.locks import file_lock

log = logging.getLogger("kdtrain")

# Bump when a change to the code would train a different baseline from the same config.
BASELINE_VERSION = 1
# Dataset keys that do not change what the student alone learns from.
NOT_BASELINE_DATA = {"download"}
WEIGHTS = "baseline.safetensors"


def labelled_only(train: DataSet) -> DataSet:
    """The labelled samples of a transfer set, repeated in turn to the transfer set's size (the same
    optimizer steps per epoch as a student trained on the whole set); the set itself when every sample
    is labelled."""
    keep = torch.nonzero(train.y >= 0).flatten()
    if len(keep) == len(train):
        return train
    return train.subset(keep[torch.arange(len(train)) % len(keep)])


def baseline_identity(cfg: DictConfig, amp_dtype: torch.dtype | None, device: torch.device) -> dict[str, Any]:
    """Everything that determines the student alone, as plain data."""
    dataset = data_identity(OmegaConf.to_container(cfg.dataset, resolve=True))
    data = {k: v for k, v in dataset.items() if k not in NOT_BASELINE_DATA}
    recipe = {
        "epochs": int(cfg.epochs),
        # Under torchrun rank 0 trains it alone on the global batch (see obtain).
        "batch_size": int(cfg.batch_size) * distributed.world_size(),
        "lr": float(cfg.lr),
        "seed": int(cfg.seed),
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True),
        "nan_policy": cfg.nan_policy.value,
        "compile": bool(cfg.compile),
    }
    return {
        "version": BASELINE_VERSION,
        "student": OmegaConf.to_container(cfg.student, resolve=True),
        "dataset": data,
        "recipe": recipe,
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        "device": device.type,
    }


def baseline_key(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True).encode()
    return f"{identity['student']['name']}-{identity['dataset']['name']}-{hashlib.sha256(blob).hexdigest()[:12]}"


def obtain(
    cfg: DictConfig,
    splits: Splits,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    build: Callable[[], nn.Module],
    spec: FitSpec,
) -> tuple[nn.Module, dict[str, Any], Path | str]:
    """The student alone from the store, trained (or continued) first when it is not there.

    `build()` makes the untrained student (after seeding), `spec` is its recipe (CE only). Returns the
    model (on `device`), the stored result {best_val_acc, best_epoch, last_val_acc, history, seconds,
    reused} and the store folder (a note instead when the store cannot be written: this run trains its own).
    Rank 0 alone calls this (the other ranks wait)."""
    identity = baseline_identity(cfg, amp_dtype, device)
    store = Path(cfg.teacher_store).expanduser() / "baselines"
    folder = store / baseline_key(identity)
    model = build()
    try:
        return _from_store(identity, splits, model, device, amp_dtype, spec, folder)
    except OSError as e:
        problem = write_problem(e, store)
        if problem is None:
            raise
    # Derived data degrades: a store that is full or not writable gets no baseline; this run trains its own.
    log.warning("baseline: the store %s is %s; training the student alone in memory for this run", store, problem)
    model = build()
    spec.checkpoint_dir, spec.distributed = None, False
    result = fit(model, labelled_only(splits.train), splits.val, spec, device, amp_dtype)
    kept = {k: result[k] for k in ("best_val_acc", "best_epoch", "last_val_acc", "history")}
    source = f"{folder} (not stored: kept in memory for this run)"
    return model, {**kept, "labelled": int((splits.train.y >= 0).sum()), "reused": False}, source


def _from_store(
    identity: dict[str, Any],
    splits: Splits,
    model: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    spec: FitSpec,
    folder: Path,
) -> tuple[nn.Module, dict[str, Any], Path]:
    store = folder.parent
    with file_lock(store / f".{folder.name}.lock", f"the stored baseline {folder.name}"):
        result, problem = _stored(folder)
        reused = result is not None
        if reused:
            log.info("baseline: reusing %s (trained earlier with the same student, data, recipe and seed)", folder)
        else:
            if problem is not None:
                log.warning("baseline: the stored %s %s; training it again", folder, problem)
                shutil.rmtree(folder)
            _train_into(identity, splits, model, device, amp_dtype, spec, folder)
            result = json.loads((folder / "result.json").read_text())
    weights = folder / WEIGHTS
    load_into(model, load_state_dict_file(weights, "stored baseline"), "stored baseline", weights)
    return model.to(device), {**result, "reused": reused}, folder


def _stored(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the result of a sound store folder, None), else (None, what is wrong; None: there is no folder)."""
    if not folder.exists():
        return None, None
    try:
        result = json.loads((folder / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None, "has no readable result.json (damaged)"
    weights = folder / WEIGHTS
    if not weights.is_file() or file_sha256(weights) != result.get("sha256"):
        return None, f"fails its checksum ({WEIGHTS} is missing or changed after it was stored)"
    return result, None


def _train_into(
    identity: dict[str, Any],
    splits: Splits,
    model: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    spec: FitSpec,
    folder: Path,
) -> None:
    partial = folder.with_name(f".{folder.name}.partial")
    last = partial / "checkpoints" / "last.pt"
    resume = None
    if last.is_file():
        try:
            resume = Resume(last, load_training_checkpoint(last, {"baseline": identity})[0])
            log.info("baseline: continuing the interrupted training in %s", partial)
        except UserError as e:  # our own file, damaged: start it again rather than stop every later run
            log.warning("baseline: %s; training it again from the start", e)
            shutil.rmtree(partial, ignore_errors=True)
    if resume is None:
        log.info("baseline: none stored for this student, data, recipe and seed; training it once into %s", folder)
    spec.checkpoint_dir = partial / "checkpoints"
    spec.checkpoint_extra = {"config": {"baseline": identity}}
    spec.distributed = False  # rank 0 alone, the others wait
    # No teacher predictions: its stored metrics do not depend on a teacher (agreement is left empty).
    result = fit(model, labelled_only(splits.train), splits.val, spec, device, amp_dtype, resume=resume)
    # Build the folder beside its final place, then rename: a crash never leaves a half baseline.
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model.state_dict(), tmp / WEIGHTS)
    out = {
        "sha256": file_sha256(tmp / WEIGHTS),
        **{k: result[k] for k in ("best_val_acc", "best_epoch", "last_val_acc", "history")},
        "identity": identity,
        "labelled": int((splits.train.y >= 0).sum()),
        "seconds": sum(row["epoch_seconds"] for row in result["history"]),  # training passes, resumed ones included
    }
    atomic_write(tmp / "result.json", lambda p: p.write_text(json.dumps(_finite_or_null(out), indent=2)))
    os.replace(tmp, folder)
    shutil.rmtree(partial, ignore_errors=True)


def _finite_or_null(value: Any) -> Any:
    """`value` with NaN and infinities as None (JSON has no NaN), e.g. the rows' empty agreement."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def agreement(
    model: nn.Module, val: DataSet, device: torch.device, amp_dtype: torch.dtype | None, teacher_pred: Tensor
) -> float:
    """Top-1 agreement of `model` with the teacher's validation predictions."""
    return (predict(model, val, device, amp_dtype) == teacher_pred).float().mean().item()
