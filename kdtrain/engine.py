"""The one training loop, for the teacher (CE only) and the student (CE + KD + feature terms).

Per step: student forward (and teacher forward without grad, eval mode) under one autocast
context, loss math in float32, a GradScaler only for float16. Metrics are summed on the device
and read once per epoch, so the step has no host-device sync.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from kdtrain.checkpoint import save_checkpoint
from kdtrain.data import TensorSet
from kdtrain.features import FeatureHook
from kdtrain.losses import ce_loss, feature_loss, kd_loss, total_loss

log = logging.getLogger("kdtrain")


@dataclass
class FitSpec:
    epochs: int
    batch_size: int
    lr: float
    seed: int
    optimizer: Any  # OptimizerConfig-like
    scheduler: Any  # SchedulerConfig-like
    weights: dict[str, float]  # ce, kd, feat
    temperature: float = 4.0
    label: str = "student"  # shown in progress lines
    progress: str = "auto"  # auto | bar | log | off
    checkpoint_dir: Path | None = None
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)  # stored in every checkpoint (config, ...)


class DeviceBatches:
    """Batches by indexing a tensor that lives on the training device (no DataLoader, no copies per step)."""

    def __init__(self, data: TensorSet, batch_size: int, device: torch.device, shuffle: bool, seed: int = 0):
        self.x, self.y = data.x.to(device), data.y.to(device)
        self.batch_size, self.shuffle, self.device = batch_size, shuffle, device
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n, b = len(self.y), self.batch_size
        # A trailing batch of one sample is dropped when shuffling: BatchNorm cannot train on it.
        return n // b if self.shuffle and n % b == 1 else math.ceil(n / b)

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.x[idx], self.y[idx]


def lr_factor(sched: Any, epoch: float, total_epochs: int) -> float:
    """Learning-rate multiplier at fractional `epoch` (the schedule is stepped every batch)."""
    if sched.warmup_epochs > 0 and epoch < sched.warmup_epochs:
        return (epoch + 1e-3) / sched.warmup_epochs
    if sched.name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch / total_epochs, 1.0)))
    if sched.name == "multistep":
        return sched.gamma ** sum(epoch >= m for m in sched.milestones)
    return 1.0


def make_optimizer(params: list[Tensor], opt: Any, lr: float) -> torch.optim.Optimizer:
    if opt.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=opt.momentum, nesterov=opt.nesterov, weight_decay=opt.weight_decay)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on a GPU that supports it, else fp16 (with a GradScaler); off on CPU and MPS."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


@torch.no_grad()
def predict(model: nn.Module, data: TensorSet, device: torch.device, amp_dtype: torch.dtype | None, batch_size: int = 512) -> Tensor:
    """Class predictions (on the CPU) for every sample, in eval mode."""
    was_training = model.training
    model.eval()
    preds = []
    for x, _ in DeviceBatches(data, batch_size, device, shuffle=False):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            preds.append(model(x).argmax(1))
    model.train(was_training)
    return torch.cat(preds).cpu()


def evaluate(
    model: nn.Module, data: TensorSet, device: torch.device, amp_dtype: torch.dtype | None, reference: Tensor | None
) -> dict[str, Any]:
    """Top-1 accuracy, per-class accuracy and top-1 agreement with `reference` predictions (the teacher's)."""
    pred = predict(model, data, device, amp_dtype)
    correct = pred == data.y
    classes = int(data.y.max()) + 1
    per_class = [correct[data.y == c].float().mean().item() if (data.y == c).any() else float("nan") for c in range(classes)]
    out = {"val_acc": correct.float().mean().item(), "per_class": per_class}
    if reference is not None:
        out["agreement"] = (pred == reference).float().mean().item()
    return out


def _rng_state(batches: DeviceBatches) -> dict[str, Any]:
    # Tensors and plain Python values only, so the checkpoint loads with weights_only=True.
    return {"torch": torch.get_rng_state(), "batches": batches.generator.get_state(), "python": list(random.getstate()[1])}


def fit(
    model: nn.Module,
    train: TensorSet,
    val: TensorSet,
    spec: FitSpec,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    teacher: nn.Module | None = None,
    adapter: nn.Module | None = None,
    teacher_val_pred: Tensor | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    augment: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """Train `model` for `spec.epochs`; return {"best_val_acc", "last_val_acc", "best_epoch", "history"}."""
    w = spec.weights
    needs_teacher = w["kd"] > 0 or w["feat"] > 0
    if needs_teacher and teacher is None:
        raise ValueError("a teacher is needed for the KD and feature terms")
    if teacher is not None:
        teacher.eval().requires_grad_(False)  # frozen: eval-mode BatchNorm, no grad
    hooks = (FeatureHook(model, "student"), FeatureHook(teacher, "teacher")) if w["feat"] > 0 else None
    adapter = adapter if adapter is not None else nn.Identity()
    params = [p for p in list(model.parameters()) + list(adapter.parameters()) if p.requires_grad]
    optimizer = make_optimizer(params, spec.optimizer, spec.lr)
    batches = DeviceBatches(train, spec.batch_size, device, shuffle=True, seed=spec.seed)
    steps_per_epoch = len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(spec.scheduler, step / steps_per_epoch, spec.epochs)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    show_bar = spec.progress == "bar" or (spec.progress == "auto" and sys.stderr.isatty())

    history: list[dict[str, Any]] = []
    best = {"val_acc": -1.0, "epoch": 0}
    for epoch in range(1, spec.epochs + 1):
        model.train()
        adapter.train()
        # Running sums on the device: [samples, labelled, correct, total, ce, kd, feat].
        sums = torch.zeros(7, device=device)
        start = time.perf_counter()
        bar = tqdm(batches, desc=f"{spec.label} {epoch}/{spec.epochs}", leave=False, disable=not show_bar, file=sys.stderr)
        for x, y in bar:
            if augment is not None:
                x = augment(x)  # the teacher sees the same augmented batch as the student
            with autocast:
                logits = model(x)
                teacher_logits = None
                if needs_teacher:
                    with torch.no_grad():
                        teacher_logits = teacher(x)
            terms: dict[str, Tensor] = {"ce": ce_loss(logits, y)}
            if w["kd"] > 0:
                terms["kd"] = kd_loss(logits, teacher_logits, spec.temperature)
            if hooks is not None:
                with autocast:
                    adapted = adapter(hooks[0].pop())
                terms["feat"] = feature_loss(adapted, hooks[1].pop())
            loss = total_loss(terms, w)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            with torch.no_grad():
                labelled = y >= 0
                n = torch.tensor(float(len(y)), device=device)
                sums += torch.stack([
                    n,
                    labelled.sum().float(),
                    ((logits.argmax(1) == y) & labelled).sum().float(),
                    loss.detach().float() * n,
                    terms["ce"].detach() * n,
                    terms.get("kd", torch.zeros((), device=device)).detach() * n,
                    terms.get("feat", torch.zeros((), device=device)).detach() * n,
                ])
        totals = sums.tolist()  # the one sync of the epoch
        seconds = time.perf_counter() - start
        bar.close()
        result = evaluate(model, val, device, amp_dtype, teacher_val_pred)
        row: dict[str, Any] = {
            "epoch": epoch,
            "loss": totals[3] / totals[0],
            "ce": totals[4] / totals[0],
            "kd": totals[5] / totals[0],
            "feat": totals[6] / totals[0],
            "lr": optimizer.param_groups[0]["lr"],
            "train_acc": totals[2] / max(totals[1], 1.0),
            "val_acc": result["val_acc"],
            "agreement": result.get("agreement", float("nan")),
            "samples_per_sec": totals[0] / seconds,
            "epoch_seconds": seconds,
            "per_class": result["per_class"],
        }
        history.append(row)
        improved = row["val_acc"] > best["val_acc"]
        if improved:
            best = {"val_acc": row["val_acc"], "epoch": epoch}
        if spec.checkpoint_dir is not None:
            state = {
                "model": model.state_dict(),
                "adapter": adapter.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "step": epoch * steps_per_epoch,
                "best_val_acc": best["val_acc"],
                "rng": _rng_state(batches),
                **spec.checkpoint_extra,
            }
            save_checkpoint(state, spec.checkpoint_dir / "last.pt")
            if improved:
                save_checkpoint(state, spec.checkpoint_dir / "best.pt")
        if on_epoch is not None:
            on_epoch(row)
        if spec.progress != "off":
            log.info(
                "%s epoch %d/%d  loss %.4f  train_acc %.4f  val_acc %.4f  %.0f samples/s",
                spec.label, epoch, spec.epochs, row["loss"], row["train_acc"], row["val_acc"], row["samples_per_sec"],
            )
    if hooks is not None:
        for h in hooks:
            h.remove()
    return {"best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "last_val_acc": history[-1]["val_acc"], "history": history}
