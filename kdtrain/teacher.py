"""The teacher: loaded from `teacher.checkpoint`, or trained once and kept in the teacher store.

The store holds one folder per teacher, named by a hash of everything that determines it
(architecture, dataset and split, labels, training recipe and seed, training precision), so a
second run or every job of a sweep reuses it. A file lock makes parallel jobs wait for one training
instead of each training their own. A folder is checked before it is reused (its weights' sha256,
recorded in meta.json, and finite weights): a damaged or incomplete one is trained again, and temp
folders left by a killed training are removed. With teacher_train.epochs=0 (or a pretrained teacher
whose classifier already has the dataset's classes) the teacher is stored as loaded, never trained;
the finetune recipe may train the classifier alone first (freeze_backbone_epochs).
"""

from __future__ import annotations

import contextlib
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

from kdtrain.checkpoint import atomic_write, file_sha256, load_into, load_state_dict_file, non_finite, save_weights
from kdtrain.collapse import collapse_epoch, warn
from kdtrain.data import Splits, data_identity
from kdtrain.engine import FitSpec, evaluate, fit
from kdtrain.errors import UserError, WriteError, write_error, write_problem
from kdtrain.features import classifier_name
from kdtrain.locks import file_lock
from kdtrain.models import build_model, count_params

log = logging.getLogger("kdtrain")

# Bump when a change to the code would train a different teacher from the same config.
# 2: the key covers the training precision (amp); meta.json records the weights' sha256.
RECIPE_VERSION = 2
WEIGHTS = "teacher.safetensors"
# Dataset keys that do not change what the teacher learns from.
NOT_TEACHER_DATA = {"exclude_classes", "download"}


def precision(amp_dtype: torch.dtype | None) -> str:
    """The autocast precision a model trains in: off, bfloat16 or float16."""
    return str(amp_dtype).replace("torch.", "") if amp_dtype else "off"


def teacher_identity(cfg: DictConfig, amp: str) -> dict[str, Any]:
    """Everything that determines a trained teacher, as plain data; `amp`: its precision (see `precision`)."""
    model = {k: v for k, v in OmegaConf.to_container(cfg.teacher, resolve=True).items() if k != "checkpoint"}
    dataset = data_identity(OmegaConf.to_container(cfg.dataset, resolve=True))
    data = {k: v for k, v in dataset.items() if k not in NOT_TEACHER_DATA}
    recipe = OmegaConf.to_container(cfg.teacher_train, resolve=True)
    # Keys added later leave the identity (and so the stored teachers' folders) unchanged at their defaults.
    recipe.pop("use_fitting_pretrained", None)  # decides whether to train, not how
    if not recipe.get("freeze_backbone_epochs"):
        recipe.pop("freeze_backbone_epochs", None)
    if recipe["epochs"] == 0:  # used as loaded: only the seed (of a fresh head, if any) matters
        recipe = {"epochs": 0, "seed": recipe["seed"]}
    return {"version": RECIPE_VERSION, "model": model, "dataset": data, "recipe": recipe, "amp": amp}


def teacher_key(cfg: DictConfig, amp: str) -> str:
    blob = json.dumps(teacher_identity(cfg, amp), sort_keys=True).encode()
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
    collapsed = None  # unknown for a teacher trained elsewhere
    if checkpoint:
        path = Path(str(checkpoint)).expanduser()
        state = load_state_dict_file(path, "teacher.checkpoint")  # a kdtrain .pt's own checksum is checked here
        expected = sidecar_sha256(path)
        if expected is not None and file_sha256(path) != expected:
            raise UserError(
                f"teacher.checkpoint {path} fails the sha256 recorded beside it: the file changed after it was "
                "written (a bit flip or a partial copy); use an intact copy"
            )
        bad = non_finite(state)
        if bad:
            raise UserError(
                f"teacher.checkpoint {path} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}); "
                "a teacher that diverged cannot teach: use a checkpoint of a finite teacher"
            )
        load_into(model, state, "teacher.checkpoint", path)
        source = str(path)
        log.info("teacher: loaded %s", path)
    else:
        cfg = _as_loaded_if_fitting(cfg, model, splits.num_classes)
        folder = _from_store(cfg, splits, model, device, amp_dtype)
        source = str(folder)
        # A teacher the store could not keep (a str: kept in memory) has no stored metrics to check.
        metrics = folder / "metrics.jsonl" if isinstance(folder, Path) else None
        text = metrics.read_text() if metrics is not None and metrics.is_file() else ""
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        epoch = collapse_epoch(rows, splits.num_classes)
        if epoch is not None:
            warn("teacher", epoch, splits.num_classes, "teacher_train.lr", float(cfg.teacher_train.lr))
        collapsed = epoch is not None
    model.to(device).eval().requires_grad_(False)
    val_acc = evaluate(model, splits.val, device, amp_dtype, None)["val_acc"]
    info = {"name": str(cfg.teacher.name), "val_acc": val_acc, "params": count_params(model), "source": source}
    return model, {**info, "collapsed": collapsed}


def _as_loaded_if_fitting(cfg: DictConfig, model: nn.Module, num_classes: int) -> DictConfig:
    """`cfg` with teacher_train.epochs=0 when the pretrained teacher's classifier already has the
    dataset's classes (it loaded with the weights: no head was replaced) and use_fitting_pretrained is
    on; the choice is logged either way."""
    t = cfg.teacher_train
    fits = bool(getattr(model, "head_pretrained", False))
    if t.epochs == 0:
        if fits:
            log.info(
                "teacher: teacher_train.epochs=0, used as loaded (its pretrained classifier has %d classes)",
                num_classes,
            )
        else:
            log.warning(
                "teacher: teacher_train.epochs=0 uses the teacher as loaded, but its classifier was not loaded from "
                "pretrained weights for these %d classes (it is untrained); for a pretrained backbone with a new "
                "classifier use teacher_train=finetune",
                num_classes,
            )
        return cfg
    if not fits:
        return cfg
    if not t.use_fitting_pretrained:
        log.info(
            "teacher: its pretrained classifier already has the dataset's %d classes; training it anyway "
            "(teacher_train.use_fitting_pretrained=false)",
            num_classes,
        )
        return cfg
    log.info(
        "teacher: its pretrained classifier already has the dataset's %d classes, so it is used as loaded, not "
        "trained (teacher_train.use_fitting_pretrained=false trains it with teacher_train's recipe)",
        num_classes,
    )
    return OmegaConf.merge(cfg, {"teacher_train": {"epochs": 0}})


def sidecar_sha256(path: Path) -> str | None:
    """The sha256 recorded beside a weights file: PATH.sha256 (sha256sum's format), or for a teacher
    store's teacher.safetensors its meta.json; None when there is none."""
    sums = path.with_name(path.name + ".sha256")
    if sums.is_file():
        words = sums.read_text().split()
        return words[0].lower() if words else None
    meta = path.with_name("meta.json")
    if path.name == WEIGHTS and meta.is_file():
        try:
            recorded = json.loads(meta.read_text()).get("sha256")
        except (json.JSONDecodeError, AttributeError):
            return None
        return recorded if isinstance(recorded, str) else None
    return None


def _from_store(
    cfg: DictConfig, splits: Splits, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None
) -> Path | str:
    store = Path(cfg.teacher_store).expanduser()
    folder = store / teacher_key(cfg, precision(amp_dtype))
    weights = folder / WEIGHTS
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(store / f".{folder.name}.lock", f"the stored teacher {folder.name}"))
            _remove_stale(store, folder.name)  # under the lock only
        except OSError as e:
            problem = write_problem(e, store)
            if problem is None:
                raise
            # A read-only (or full) store, a shared one say: a stored teacher is complete (it is renamed
            # into place whole), so reading it needs no lock; a teacher to train is kept in memory (below).
            log.info("teacher: the store %s is %s; using it without its lock", store, problem)
        state, problem = _stored(folder)
        if state is not None:
            log.info("teacher: reusing %s (trained earlier with the same architecture, data and recipe)", folder)
        else:
            if problem is None:
                what = "training it once" if cfg.teacher_train.epochs > 0 else "storing it as loaded"
                log.info("teacher: none stored for this config; %s into %s", what, folder)
            else:
                log.warning("teacher: the stored %s %s; training it again", folder, problem)
            if not _train_into(cfg, splits, model, device, amp_dtype, folder):
                return f"{folder} (not stored: kept in memory for this run)"  # the model holds the weights
            state = load_state_dict_file(weights, "stored teacher")
    load_into(model, state, "stored teacher", weights)
    return folder


def _stored(folder: Path) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """(the weights of a sound store folder, None), else (None, what is wrong; None: there is no folder)."""
    weights = folder / WEIGHTS
    if not folder.exists():
        return None, None
    if not weights.is_file():
        return None, f"has no {WEIGHTS} (an incomplete folder)"
    expected = sidecar_sha256(weights)
    if expected is None:
        return None, "has no checksum in its meta.json (damaged, or written by another tool)"
    if file_sha256(weights) != expected:
        return None, f"fails its checksum ({WEIGHTS} changed after it was stored: corrupt)"
    try:
        state = load_state_dict_file(weights, "stored teacher")
    except UserError as e:
        return None, f"cannot be read ({e})"
    bad = non_finite(state)
    if bad:
        return None, f"holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]})"
    return state, None


def _remove_stale(store: Path, key: str) -> None:
    """Remove the temp folders (.KEY.PID.tmp/.old) that a training killed midway left behind.

    Called under the key's lock, which every writer of these folders holds, so a folder whose process
    is gone (or is this one) is not in use."""
    for path in store.glob(f".{key}.*.*"):
        pid = path.name[len(key) + 2 :].split(".")[0]
        if path.suffix not in (".tmp", ".old") or not path.is_dir() or not pid.isdigit():
            continue
        if int(pid) == os.getpid() or not _alive(int(pid)):
            log.info("teacher: removing %s, left by an interrupted training (process %s)", path, pid)
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (PermissionError): not ours to judge
    return True


def _train_into(
    cfg: DictConfig, splits: Splits, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None, folder: Path
) -> bool:
    """Train the teacher into `model` and store it in `folder`; False when it could not be stored (a full
    or read-only store: logged as a warning, the model keeps the weights for this run)."""
    t = cfg.teacher_train
    if t.epochs > 0 and t.batch_size > len(splits.teacher_train):
        raise UserError(
            f"teacher_train.batch_size={t.batch_size} is larger than the teacher's training set "
            f"({len(splits.teacher_train)} labelled samples); lower it"
        )
    model.to(device)
    start = time.time()
    rows = _fit_stages(cfg, splits, model, device, amp_dtype)
    val_acc = rows[-1]["val_acc"] if rows else evaluate(model, splits.val, device, amp_dtype, None)["val_acc"]
    # Build the folder beside its final place, then rename: a crash never leaves a half teacher.
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_weights(model.state_dict(), tmp / WEIGHTS)
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        meta = {
            **teacher_identity(cfg, precision(amp_dtype)),
            "sha256": file_sha256(tmp / WEIGHTS),
            "val_acc": val_acc,
            "params": count_params(model),
            "seconds": time.time() - start,
        }
        atomic_write(tmp / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2)))
        if folder.exists():  # a damaged folder: moved aside, replaced, then deleted
            old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except (OSError, WriteError) as e:
        error = e if isinstance(e, WriteError) else write_error(e, tmp)
        if error is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        # The teacher is trained: losing it to a full store would cost the whole training again.
        log.warning(
            "teacher: not stored (%s); this run goes on with it in memory, and the next run trains it again",
            error,
        )
        return False
    return True


def _fit_stages(
    cfg: DictConfig, splits: Splits, model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None
) -> list[dict[str, Any]]:
    """Train the teacher with teacher_train's recipe; its metrics rows (none for epochs=0).

    With freeze_backbone_epochs=N the classifier trains alone for the first N epochs (a new head
    learns before its gradients reach the pretrained backbone), then every layer for the rest, each
    stage with its own schedule."""
    t = cfg.teacher_train
    frozen = min(int(t.freeze_backbone_epochs), int(t.epochs))
    stages = [(frozen, True), (int(t.epochs) - frozen, False)]
    rows: list[dict[str, Any]] = []
    for epochs, head_only in stages:
        if epochs == 0:
            continue
        head = classifier_name(model, "teacher") if head_only else ""
        for name, p in model.named_parameters():
            p.requires_grad_(not head_only or name.startswith(head + "."))
        if head_only:
            log.info("teacher: training its classifier %s alone for %d epoch(s), the backbone frozen", head, epochs)
        spec = FitSpec(
            epochs=epochs,
            batch_size=int(t.batch_size),
            lr=float(t.lr),
            seed=int(t.seed),
            optimizer=t.optimizer,
            scheduler=t.scheduler,
            label="teacher",
            progress=cfg.progress.value,
            distributed=False,  # rank 0 alone, the others wait
        )
        done = len(rows)
        fit(
            model,
            splits.teacher_train,
            splits.val,
            spec,
            device,
            amp_dtype,
            on_epoch=lambda row, done=done: rows.append(
                {**{k: v for k, v in row.items() if k != "per_class"}, "epoch": done + int(row["epoch"])}
            ),
            augment=splits.augment,
        )
    model.requires_grad_(True)
    return rows
