"""The teacher: loaded from `teacher.checkpoint`, or trained once and kept in the teacher store.

The store holds one folder per teacher, named by a hash of everything that determines it
(architecture, dataset and split, labels, training recipe and seed), so a second run or every
job of a sweep reuses it. A file lock makes parallel jobs wait for one training instead of
each training their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kdtrain.checkpoint import atomic_write, file_lock, load_into, load_state_dict_file, save_weights
from kdtrain.data import Splits
from kdtrain.engine import FitSpec, evaluate, fit
from kdtrain.errors import UserError
from kdtrain.models import build_model, count_params

log = logging.getLogger("kdtrain")

# Bump when a change to the code would train a different teacher from the same config.
RECIPE_VERSION = 1
# Dataset keys that do not change what the teacher learns from.
NOT_TEACHER_DATA = {"exclude_classes", "download"}


def teacher_identity(cfg: DictConfig) -> dict[str, Any]:
    """Everything that determines a trained teacher, as plain data."""
    model = {k: v for k, v in OmegaConf.to_container(cfg.teacher, resolve=True).items() if k != "checkpoint"}
    data = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items() if k not in NOT_TEACHER_DATA}
    recipe = OmegaConf.to_container(cfg.teacher_train, resolve=True)
    return {"version": RECIPE_VERSION, "model": model, "dataset": data, "recipe": recipe}


def teacher_key(cfg: DictConfig) -> str:
    blob = json.dumps(teacher_identity(cfg), sort_keys=True).encode()
    return f"{cfg.teacher.name}-{cfg.dataset.name}-{hashlib.sha256(blob).hexdigest()[:12]}"


def get_teacher(
    cfg: DictConfig, splits: Splits, device: torch.device, amp_dtype: torch.dtype | None
) -> tuple[nn.Module, dict[str, Any]]:
    """Return the frozen teacher (eval mode, on `device`) and {name, val_acc, params, source}."""
    torch.manual_seed(int(cfg.teacher_train.seed))  # the teacher's initial weights depend on its own seed only
    model = build_model(
        OmegaConf.to_container(cfg.teacher, resolve=True), splits.num_classes, splits.in_shape, "teacher"
    )
    checkpoint = cfg.teacher.get("checkpoint")
    if checkpoint:
        path = Path(str(checkpoint)).expanduser()
        load_into(model, load_state_dict_file(path, "teacher.checkpoint"), "teacher.checkpoint", path)
        source = str(path)
        log.info("teacher: loaded %s", path)
    else:
        source = str(_from_store(cfg, splits, model, device, amp_dtype))
    model.to(device).eval().requires_grad_(False)
    val_acc = evaluate(model, splits.val, device, amp_dtype, None)["val_acc"]
    return model, {"name": str(cfg.teacher.name), "val_acc": val_acc, "params": count_params(model), "source": source}


def _from_store(
    cfg: DictConfig, splits: Splits, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None
) -> Path:
    store = Path(cfg.teacher_store).expanduser()
    folder = store / teacher_key(cfg)
    weights = folder / "teacher.safetensors"
    with file_lock(store / f".{folder.name}.lock"):
        if weights.is_file():
            log.info("teacher: reusing %s (trained earlier with the same architecture, data and recipe)", folder)
        else:
            log.info("teacher: none stored for this config; training it once into %s", folder)
            _train_into(cfg, splits, model, device, amp_dtype, folder)
    load_into(model, load_state_dict_file(weights, "stored teacher"), "stored teacher", weights)
    return folder


def _train_into(
    cfg: DictConfig, splits: Splits, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None, folder: Path
) -> None:
    t = cfg.teacher_train
    if t.batch_size > len(splits.teacher_train):
        raise UserError(
            f"teacher_train.batch_size={t.batch_size} is larger than the teacher's training set "
            f"({len(splits.teacher_train)} labelled samples); lower it"
        )
    model.to(device)
    spec = FitSpec(
        epochs=int(t.epochs),
        batch_size=int(t.batch_size),
        lr=float(t.lr),
        seed=int(t.seed),
        optimizer=t.optimizer,
        scheduler=t.scheduler,
        label="teacher",
        progress=cfg.progress.value,
        distributed=False,  # rank 0 alone, the others wait
    )
    start = time.time()
    rows: list[str] = []
    result = fit(
        model,
        splits.teacher_train,
        splits.val,
        spec,
        device,
        amp_dtype,
        on_epoch=lambda row: rows.append(json.dumps({k: v for k, v in row.items() if k != "per_class"})),
        augment=splits.augment,
    )
    # Build the folder beside its final place, then rename: a crash never leaves a half teacher.
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model.state_dict(), tmp / "teacher.safetensors")
    (tmp / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    meta = {
        **teacher_identity(cfg),
        "val_acc": result["last_val_acc"],
        "params": count_params(model),
        "seconds": time.time() - start,
    }
    atomic_write(tmp / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
    os.replace(tmp, folder)
