"""The one training loop, for the teacher (CE only) and the student (a weighted sum of loss terms,
kdtrain.terms; the loop knows none of them by name).

Per step (`_Training.train_epoch`): forward (student, and the teacher without grad in eval mode, or
its cache: `TeacherSource`) under one autocast context, the loss terms (float32 math), the
non-finite flag, the optimizer step (fused; a GradScaler only for float16), the meters (`Meters`).
Nothing in a step waits for the device: a non-finite loss drops its step's update on the device (the
fused optimizer's found_inf), metrics are summed on the device, and the flags are read every
POLL_STEPS steps and at the epoch's end. With a teacher cache (teacher_cache.py) the teacher's forward
pass is skipped: its logits and features are looked up by sample index. Under autocast the live
teacher runs as a copy cast once to the autocast dtype. On CUDA: cuDNN autotuning, channels_last for
conv nets, optionally torch.compile on the student with static shapes (checkpoints hold the uncompiled
module's weights).

Every epoch ends with checkpoints/last.pt holding everything to continue exactly (weights, optimizer,
schedule, scaler, RNG states, data order, metrics history); SIGINT/SIGTERM (under `stop_on_signals`)
end the current step (under torchrun: the step at which all ranks next read the step log) and write a
mid-epoch checkpoint that resumes at the next step.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from kdtrain import distributed
from kdtrain.checkpoint import load_checkpoint, load_into, save_checkpoint
from kdtrain.data import DataSet, StreamSet
from kdtrain.data.batches import STREAM_EVAL_BATCH, Batches, StreamBatches, make_batches
from kdtrain.errors import UserError
from kdtrain.features import Capture
from kdtrain.teacher_cache import TeacherCache
from kdtrain.terms import Batch, LossTerms, ce_only

log = logging.getLogger("kdtrain")

# nan_policy=skip: more than this share of an epoch's steps skipped is a console warning (all of them: an error).
SKIP_WARN_SHARE = 0.1
# The steps' non-finite and signal flags are read on the host every this many steps (and at an epoch's end):
# the one host sync of the training loop, instead of one a step.
POLL_STEPS = 16


@dataclass
class FitSpec:
    epochs: int
    batch_size: int
    lr: float
    seed: int
    optimizer: Any  # OptimizerConfig-like
    scheduler: Any  # SchedulerConfig-like
    label: str = "student"  # shown in progress lines
    progress: str = "auto"  # auto | bar | log | off
    checkpoint_dir: Path | None = None
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)  # stored in every checkpoint (config, ...)
    nan_policy: str = "stop"  # a non-finite loss: stop (raise UserError) | skip (drop the step, count it)
    distributed: bool = (
        True  # under torchrun, train across the ranks (False: this process alone, e.g. rank 0's teacher)
    )
    channels_last: bool | None = None  # None: on CUDA for models with conv layers (faster convs, tensor cores)
    compile: bool = False  # torch.compile the student's forward pass (static shapes: the last batch is dropped)


def plain_schedule(sched: Any) -> Any:
    """The scheduler config as plain values, for `lr_factor` at every step (an OmegaConf attribute read
    costs ~10 us, and LambdaLR reads several a step: a sixth of a digits step)."""
    if isinstance(sched, DictConfig):
        return SimpleNamespace(**OmegaConf.to_container(sched, resolve=True))
    return sched


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
    """SGD or AdamW, fused (one kernel for every parameter, and a `found_inf` flag that drops a step on the
    device) where torch has fused kernels for the parameters: CUDA and CPU."""
    fused = supports_fused(params)
    if opt.name == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay, fused=fused or None
        )
    sgd = torch.optim.SGD(
        params,
        lr=lr,
        momentum=opt.momentum,
        nesterov=opt.nesterov,
        weight_decay=opt.weight_decay,
        fused=fused or None,
    )
    prepare_fused(sgd)
    return sgd


def supports_fused(params: list[Tensor]) -> bool:
    return bool(params) and all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for p in params)


def prepare_fused(optimizer: torch.optim.Optimizer) -> None:
    """Make a fused optimizer's state fit its kernels (after building it, and after loading a checkpoint that
    may come from a non-fused one).

    SGD: a zero momentum buffer for every parameter that has none. The fused kernel fails on a parameter
    without one among others that have one (a term or layer whose first gradient comes later, as after
    FitNets' hint stage), and a first step dropped by `found_inf` would leave the buffers uninitialised.
    With dampening 0 a zero buffer gives the same first step as torch's (buffer = gradient).
    AdamW: the step counts live on the parameters' device (a non-fused checkpoint keeps them on the CPU)."""
    for group in optimizer.param_groups:
        if not group.get("fused"):
            continue
        for p in group["params"]:
            if isinstance(optimizer, torch.optim.SGD) and group["momentum"] != 0:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, Tensor):
                optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 on a GPU that supports it, else fp16 (with a GradScaler); off on CPU and MPS."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def wants_channels_last(choice: bool | None, device: torch.device, model: nn.Module | None) -> bool:
    """channels_last: as chosen, or (None) on CUDA for a model with conv layers."""
    if choice is not None:
        return choice
    return (
        device.type == "cuda"
        and model is not None
        and any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    )


@torch.no_grad()
def predict(
    model: nn.Module, data: DataSet, device: torch.device, amp_dtype: torch.dtype | None, batch_size: int = 512
) -> Tensor:
    """Class predictions (on the CPU) for every sample, in eval mode."""
    was_training = model.training
    model.eval()
    preds = []
    if isinstance(data, StreamSet):
        batch_size = min(batch_size, STREAM_EVAL_BATCH)
    for x, _, _ in make_batches(data, batch_size, device, shuffle=False).epoch():
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            preds.append(model(x).argmax(1))
    model.train(was_training)
    return torch.cat(preds).cpu()


def evaluate(
    model: nn.Module, data: DataSet, device: torch.device, amp_dtype: torch.dtype | None, reference: Tensor | None
) -> dict[str, Any]:
    """Top-1 accuracy, per-class accuracy and top-1 agreement with `reference` predictions (the teacher's)."""
    pred = predict(model, data, device, amp_dtype)
    correct = pred == data.y
    classes = int(data.y.max()) + 1
    per_class = [
        correct[data.y == c].float().mean().item() if (data.y == c).any() else float("nan") for c in range(classes)
    ]
    out = {"val_acc": correct.float().mean().item(), "per_class": per_class}
    if reference is not None:
        out["agreement"] = (pred == reference).float().mean().item()
    return out


def _rng_state(batches: Batches, device: torch.device) -> dict[str, Any]:
    # Tensors and plain Python values only, so the checkpoint loads with weights_only=True.
    state = {
        "torch": torch.get_rng_state(),
        "batches": batches.generator.get_state(),
        "python": list(random.getstate()[1]),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any], batches: Batches, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    batches.generator.set_state(state["batches"])
    random.setstate((3, tuple(state["python"]), None))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


class Interrupted(Exception):
    """SIGINT / SIGTERM arrived: the current step was finished and, for a run with checkpoints, last.pt written."""

    def __init__(self, signum: int, checkpoint: Path | None, where: str):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at {where}")
        self.signum, self.checkpoint, self.where = signum, checkpoint, where


class _StopRequest:
    signum: int | None = None  # set by the signal handler; the loop reads it after every step (a Python value)


STOP = _StopRequest()


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While active, SIGINT and SIGTERM make the training loop stop after the current step, write
    checkpoints/last.pt and raise Interrupted, instead of killing the process mid-write.

    The handler only records the signal and puts the previous handlers back, so a second Ctrl-C
    acts as usual (stops at once; atomic writes still leave no torn file).
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        STOP.signum = signum
        for s, h in previous.items():
            signal.signal(s, h)

    STOP.signum = None
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        STOP.signum = None


@dataclass
class Resume:
    """A checkpoint to continue from (see checkpoint.load_training_checkpoint)."""

    path: Path
    state: dict[str, Any]


def _finite(tensors: list[Tensor]) -> bool:
    floats = [t.isfinite().all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(floats).all()) if floats else True


# Normalisation layers keep float32 weights in a teacher cast to the autocast dtype: eval-mode BatchNorm
# takes a bf16/fp16 input with float32 statistics (cuDNN requires that pairing), and autocast runs
# LayerNorm/GroupNorm in float32 anyway.
_FLOAT_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def cast_frozen(teacher: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of the frozen teacher with its weights in the autocast `dtype`, normalisation layers aside, so
    autocast does not cast the same weights again at every step (the caller's teacher is left as it is)."""
    cast = copy.deepcopy(teacher).to(dtype)
    for m in cast.modules():
        if isinstance(m, _FLOAT_NORMS):
            m.float()
    return cast


class TeacherSource:
    """Where the teacher's outputs come from at a step: a forward pass of the frozen teacher (hooks
    capture its features), or the teacher cache looked up by sample index. It also prepares the
    step's inputs: with a cache of augmented views, each sample's input is one of its cached views
    (drawn per step), so student and teacher still see the same input."""

    def __init__(
        self,
        terms: LossTerms,
        teacher: nn.Module | None,
        cache: TeacherCache | None,
        augment: Callable[[Tensor], Tensor] | None,
        amp_dtype: torch.dtype | None = None,
    ):
        self.needed, self.augment = terms.needs_teacher, augment
        self.cache = cache if self.needed else None
        self.teacher = teacher if self.needed and self.cache is None else None
        if self.teacher is not None and amp_dtype is not None:
            self.teacher = cast_frozen(self.teacher, amp_dtype)
        self.layers = terms.layers("teacher")
        if self.needed and teacher is None and cache is None:
            raise ValueError(f"a teacher is needed for the {', '.join(terms.names)} terms")
        if self.cache is not None:
            if self.cache.views and augment is None:
                raise ValueError("a teacher cache of augmented views needs the augmentation that replays them")
            if len(self.cache.features) != len(self.layers):
                raise ValueError(
                    f"the teacher cache holds {len(self.cache.features)} feature layers, the terms read "
                    f"{len(self.layers)}"
                )
        self.capture = (
            Capture(self.teacher, self.layers, "teacher") if self.teacher is not None and self.layers else None
        )

    def inputs(self, x: Tensor, idx: Tensor) -> tuple[Tensor, Tensor | None]:
        """(the batch input, each sample's cached view or None)."""
        if self.cache is not None and self.cache.views:
            view = self.cache.draw_views(len(idx))  # one of each sample's K cached views, replayed exactly
            return self.augment.at(x, *self.cache.view_params(idx, view)), view
        if self.augment is not None:
            return self.augment(x), None  # the teacher sees the same augmented batch as the student
        return x, None

    def outputs(self, x: Tensor, idx: Tensor, view: Tensor | None) -> tuple[Tensor | None, dict[str, Tensor]]:
        """(teacher logits, teacher features by module path), or (None, {}) when no term needs the teacher."""
        if self.cache is not None:
            logits, feats = self.cache.lookup(idx, view)  # no teacher forward pass
            return logits, dict(zip(self.layers, feats))
        if self.teacher is None:
            return None, {}
        with torch.no_grad():
            logits = self.teacher(x)
        return logits, dict(zip(self.layers, self.capture.pop())) if self.capture is not None else {}

    def close(self) -> None:
        if self.capture is not None:
            self.capture.remove()


class Meters:
    """Running sums of an epoch on the device, read once at its end: [samples, labelled, correct,
    total loss, one per metrics column of the terms (ce, kd, feat, then the others)], each times the
    batch size (a mid-epoch checkpoint stores them; the first 7 are the layout before loss terms)."""

    def __init__(self, columns: list[str], device: torch.device):
        self.columns, self.device = columns, device
        self.sums = torch.zeros(4 + len(columns), device=device)

    def losses(self, loss: Tensor, values: dict[str, Tensor]) -> Tensor:
        """A step's [total loss, one value per column] (0 for a term not computed), float32 on the device."""
        zero = torch.zeros((), device=self.device)
        return torch.stack([loss.detach().float(), *(values.get(c, zero).detach().float() for c in self.columns)])

    def add(self, logits: Tensor, y: Tensor, losses: Tensor, ok: Tensor) -> None:
        """Add a step's counts and `losses` (see `losses`) when `ok` (a bool tensor: the step updated the
        weights), without leaving the device."""
        with torch.no_grad():
            labelled = y >= 0
            counts = torch.stack([labelled.sum(), ((logits.argmax(1) == y) & labelled).sum()]).float()
            n = torch.full((1,), float(len(y)), device=self.device)  # a fill kernel, not a host-to-device copy
            self.sums += torch.where(ok, torch.cat([n, counts, losses * len(y)]), 0.0)

    @staticmethod
    def row(columns: list[str], totals: list[float]) -> dict[str, float]:
        """The loss columns of a metrics row from an epoch's totals: per-sample means (NaN when every step
        was skipped: no training loss to report)."""
        samples = totals[0] or float("nan")
        return {"loss": totals[3] / samples, **{c: v / samples for c, v in zip(columns, totals[4:])}}


def _step_input(x: Tensor, channels_last: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class _Training:
    """One `fit` call's state: the student's forward (DDP / compiled), the loss terms, optimizer, schedule,
    scaler, data, teacher source and hooks; `state()` is what a checkpoint holds."""

    def __init__(
        self,
        model: nn.Module,
        train: DataSet,
        spec: FitSpec,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        terms: LossTerms,
        teacher: nn.Module | None,
        teacher_cache: TeacherCache | None,
        augment: Callable[[Tensor], Tensor] | None,
    ):
        self.model, self.spec, self.device, self.terms = model, spec, device, terms
        if teacher is not None:
            teacher.eval().requires_grad_(False)  # frozen: eval-mode BatchNorm, no grad
        self.source = TeacherSource(terms, teacher, teacher_cache, augment, amp_dtype)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: cuDNN picks the fastest kernels once
        self.channels_last = wants_channels_last(spec.channels_last, device, model)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
            if self.source.teacher is not None:
                self.source.teacher.to(memory_format=torch.channels_last)
        self.ddp = spec.distributed and distributed.enabled() and torch.distributed.is_initialized()
        self.world, self.rank = (distributed.world_size(), distributed.rank()) if self.ddp else (1, 0)
        if self.ddp:
            for t in [*terms.parameters(), *terms.buffers()]:  # every rank starts from rank 0's term state
                torch.distributed.broadcast(t.data, src=0)
        # The training forwards, built when first needed (`forward_at`): `model` (the original module) is what
        # is checkpointed, evaluated and returned, so its state dict has no `_orig_mod.` or `module.` prefixes.
        self.forwards: dict[bool, nn.Module] = {}
        self.student_capture = Capture(model, terms.layers("student"), "student") if terms.layers("student") else None
        # The terms' parameters are training state: optimised, checkpointed and resumed with the student.
        self.params = [p for p in list(model.parameters()) + list(terms.parameters()) if p.requires_grad]
        self.optimizer = make_optimizer(self.params, spec.optimizer, spec.lr)
        self.fused = bool(self.optimizer.param_groups[0]["fused"])
        # compile=true: every batch has one shape (the smaller last batch is dropped), so nothing recompiles.
        self.batches = make_batches(
            train,
            spec.batch_size,
            device,
            shuffle=True,
            seed=spec.seed,
            rank=self.rank,
            world=self.world,
            drop_last=spec.compile,
        )
        self.steps_per_epoch = steps = len(self.batches)
        schedule = plain_schedule(spec.scheduler)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(schedule, step / steps, spec.epochs)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
        self.autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
        # Only rank 0 writes checkpoints and metrics.
        self.last_path = spec.checkpoint_dir / "last.pt" if spec.checkpoint_dir is not None and self.rank == 0 else None
        self.history: list[dict[str, Any]] = []
        self.best = {"val_acc": -1.0, "epoch": 0}

    def forward_at(self, epoch: int) -> nn.Module:
        """The student's training forward at `epoch` (built once per kind, compiled when asked).

        Under torchrun, DDP finds the parameters that get gradients from the logits, so while a term in
        force is still off (FitNets' hint stage, a later `start_epoch`) the loss may come from a hooked
        activation alone and the layers after it never get the gradients DDP waits for. Until every term is
        on, the plain student trains and `update` averages all gradients by hand after backward (DDP's
        BatchNorm buffers are rank 0's again when it takes over); then DDP overlaps that with backward."""
        wrap = self.ddp and not self.terms.some_off(epoch)
        if wrap not in self.forwards:
            forward = self.model
            if wrap:
                forward = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            # Static shapes (dynamic=False): with the last batch dropped, one graph serves every step.
            self.forwards[wrap] = torch.compile(forward, dynamic=False) if self.spec.compile else forward
        return self.forwards[wrap]

    def step(
        self, forward: nn.Module, x: Tensor, y: Tensor, idx: Tensor, epoch: int
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Forward and loss terms of one batch: (student logits, loss, each term's value)."""
        x, view = self.source.inputs(x, idx)
        x = _step_input(x, self.channels_last)
        with self.autocast:
            logits = forward(x)
            teacher_logits, teacher_feats = self.source.outputs(x, idx, view)
            student_feats = (
                dict(zip(self.terms.layers("student"), self.student_capture.pop())) if (self.student_capture) else {}
            )
            batch = Batch(logits, y, idx, epoch, teacher_logits, student_feats, teacher_feats)
            values, loss = self.terms(batch)
        return logits, loss, values

    def update(self, loss: Tensor, found_inf: Tensor, batch_size: int, i: int, by_hand: bool) -> None:
        """Backward and optimizer step; the step is dropped when `found_inf` (a float tensor, 1 or 0) is 1,
        decided on the device: the fused optimizers take the flag as GradScaler passes theirs."""
        if self.ddp:
            # DDP averages gradients over ranks; weighting each rank's mean loss by its share of the
            # global batch makes that average the gradient of the global batch's mean.
            loss = loss * (batch_size * self.world / self.batches.global_size(i))
        if self.scaler.is_enabled():
            # float16: GradScaler drops a step whose gradients are not finite; a NaN factor makes them so
            # whenever found_inf is set (a non-finite loss can have finite gradients).
            loss = loss * torch.where(found_inf > 0, torch.nan, 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.ddp:  # the parameters DDP does not average: the terms', or all of them outside DDP
            distributed.average_gradients(self.params if by_hand else list(self.terms.parameters()))
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.fused:
            self.optimizer.found_inf = found_inf
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not found_inf.item():  # an optimizer without fused kernels here: one host sync a step
            self.optimizer.step()
        else:
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" when step 1 is dropped
                warnings.simplefilter("ignore")
                self.scheduler.step()
            return
        self.scheduler.step()  # the schedule follows the batches, updated or not

    def clear_hooks(self) -> None:
        """Hooks keep nothing past a step: drop what evaluation forwards captured."""
        if self.student_capture is not None:
            self.student_capture.values = [None] * len(self.student_capture.paths)

    def close(self) -> None:
        if self.student_capture is not None:
            self.student_capture.remove()
        self.source.close()
        self.batches.close()  # the stream path's worker processes

    def term_states(self) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        """(`adapter`: the feat term's state, as before; `terms`: every other term's state that is not empty)."""
        states = {name: term.state_dict() for name, term in self.terms.terms.items()}
        adapter = states.pop("feat", {})
        return adapter, {name: sd for name, sd in states.items() if sd}

    def state(self, epoch_done: int, step: int, partial: dict[str, Any] | None) -> dict[str, Any]:
        adapter, terms = self.term_states()
        return {
            "model": self.model.state_dict(),
            "adapter": adapter,
            "terms": terms,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch_done,  # completed epochs
            "step": step,  # optimizer steps taken (skipped ones included)
            "best_val_acc": self.best["val_acc"],
            "best_epoch": self.best["epoch"],
            "rng": _rng_state(self.batches, self.device),
            "history": self.history,  # the metrics rows of the completed epochs
            # Set in a mid-epoch checkpoint: how far into epoch `epoch + 1` it is, with that epoch's data
            # order (the batch generator's state at its start) and running sums, so resume continues exactly.
            "partial": partial,
            "world_size": self.world,  # a checkpoint from N ranks resumes on M (see _restore)
            **self.spec.checkpoint_extra,
        }

    def train_epoch(self, epoch: int, partial: dict[str, Any] | None) -> tuple[list[float], float, int]:
        """One epoch from its first step (or where `partial` stopped): (the meters' totals over every rank,
        seconds, skipped steps). A SIGINT/SIGTERM ends it after the current step (under torchrun: at the next
        read of the step log, on every rank at the same step) with a mid-epoch checkpoint.

        No step waits for the device: each step's non-finite flag drops its update on the device
        (`update`'s found_inf) and goes to a step log on the device with the step's losses; the log is read
        every POLL_STEPS steps and at the epoch's end (with the metrics: one host sync), which counts the
        dropped steps (nan_policy=skip) or raises naming the first bad step and term (stop: from that step
        on every update is dropped, and nothing is saved before the read)."""
        spec, batches = self.spec, self.batches
        self.model.train()
        self.terms.train()
        forward, by_hand = self.forward_at(epoch), self.ddp and self.terms.some_off(epoch)
        order = batches.generator.get_state()  # this epoch's data order, for a mid-epoch checkpoint
        meters = Meters(self.terms.columns, self.device)
        first, skipped, seconds_before = 0, 0, 0.0
        if partial is not None:
            order, first, skipped, seconds_before = (
                partial["order"],
                partial["batches"],
                partial["skipped"],
                partial["seconds"],
            )
            batches.generator.set_state(order)
            if self.rank == 0:  # the saved sums are all ranks' together
                meters.sums[: len(partial["sums"])] = partial["sums"].to(self.device)
        step_log = _StepLog(first, len(self.terms.columns), self.device)
        tripped = torch.zeros((), device=self.device)  # nan_policy=stop: a bad step was seen (device-side)
        start = time.perf_counter()
        show_bar = spec.progress == "bar" or (spec.progress == "auto" and sys.stderr.isatty())
        bar = tqdm(
            batches.epoch(first),
            desc=f"{spec.label} {epoch}/{spec.epochs}",
            leave=False,
            disable=not show_bar,
            file=sys.stderr,
            initial=first,
            total=self.steps_per_epoch,
        )
        for i, (x, y, idx) in enumerate(bar, start=first):
            logits, loss, values = self.step(forward, x, y, idx, epoch)
            losses = meters.losses(loss, values)
            flags = _step_flags(losses[0], self.ddp)
            if spec.nan_policy == "skip":
                found_inf = flags[0]
            else:
                found_inf = tripped = torch.maximum(tripped, flags[0])
            self.update(loss, found_inf, len(idx), i, by_hand)
            meters.add(logits, y, losses, found_inf == 0)
            step_log.add(flags, losses)
            last = i + 1 == self.steps_per_epoch
            signalled = not self.ddp and STOP.signum is not None  # one process: seen on the host at once
            if not (step_log.full or last or signalled):
                continue
            if last:
                sums = distributed.all_reduce_sum(meters.sums) if self.ddp else meters.sums
                rows, totals = step_log.read(sums)
            else:
                rows, _ = step_log.read()
            bad = [s for s, row in rows if row[0]]
            if bad and spec.nan_policy != "skip":
                bar.close()
                row = dict(rows)[bad[0]]
                named = dict(zip(self.terms.columns, row[3:]))
                _stop_non_finite(spec, named, epoch, bad[0] + 1, self.steps_per_epoch, self.last_path)
            skipped += len(bad)
            signum = max((int(row[1]) for _, row in rows), default=0) if self.ddp else 0
            if signum and STOP.signum is None:
                STOP.signum = signum  # another rank's signal
            if (signalled or signum) and not last:
                bar.close()
                self._save_mid_epoch(epoch, i, order, meters, skipped, seconds_before + time.perf_counter() - start)
                raise Interrupted(STOP.signum, self.last_path, f"epoch {epoch}, step {i + 1}/{self.steps_per_epoch}")
        bar.close()
        return totals, seconds_before + time.perf_counter() - start, skipped

    def _save_mid_epoch(self, epoch: int, i: int, order: Tensor, meters: Meters, skipped: int, seconds: float) -> None:
        all_sums = distributed.all_reduce_sum(meters.sums.clone()) if self.ddp else meters.sums
        if self.last_path is not None:
            done = {"batches": i + 1, "order": order, "sums": all_sums.cpu(), "skipped": skipped, "seconds": seconds}
            save_checkpoint(self.state(epoch - 1, (epoch - 1) * self.steps_per_epoch + i + 1, done), self.last_path)

    def save_epoch(self, epoch: int, improved: bool) -> None:
        if self.last_path is None:
            return
        ckpt = self.state(epoch, epoch * self.steps_per_epoch, None)
        # last.pt first: a crash before best.pt is written leaves a last.pt that knows it is the
        # best epoch, and resume writes best.pt from it (_repair_best).
        save_checkpoint(ckpt, self.last_path)
        if improved:
            save_checkpoint(ckpt, self.last_path.with_name("best.pt"))


def fit(
    model: nn.Module,
    train: DataSet,
    val: DataSet,
    spec: FitSpec,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    terms: LossTerms | None = None,
    teacher: nn.Module | None = None,
    teacher_val_pred: Tensor | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    augment: Callable[[Tensor], Tensor] | None = None,
    resume: Resume | None = None,
    teacher_cache: TeacherCache | None = None,
) -> dict[str, Any]:
    """Train `model` on the loss `terms` (default: CE alone) for `spec.epochs` (continuing from `resume`
    when given); return {"best_val_acc", "last_val_acc", "best_epoch", "history"} over every epoch,
    resumed ones included.

    With `teacher_cache`, the teacher's logits and features come from the cache by sample index
    instead of a forward pass (see TeacherSource)."""
    terms = terms if terms is not None else LossTerms(ce_only())
    t = _Training(model, train, spec, device, amp_dtype, terms, teacher, teacher_cache, augment)
    if t.rank != 0:
        on_epoch = None
    partial: dict[str, Any] | None = None
    if resume is not None:
        partial = _restore(resume, t)
        log.info(
            "%s: resuming from %s after epoch %d%s",
            spec.label,
            resume.path,
            len(t.history),
            f" and {partial['batches']} of {t.steps_per_epoch} steps of epoch {len(t.history) + 1}" if partial else "",
        )
    if resume is not None and t.last_path is not None:
        _repair_best(resume, t.last_path.with_name("best.pt"))
    try:
        for epoch in range(len(t.history) + 1, spec.epochs + 1):
            for s in terms.specs:
                if s.start_epoch == epoch > 1 and s.weight > 0:
                    log.info("%s: the %s term is on from epoch %d", spec.label, s.name, epoch)
            totals, seconds, skipped = t.train_epoch(epoch, partial)
            partial = None
            bad_images = t.batches.take_bad_reads()
            if t.ddp and isinstance(t.batches, StreamBatches):  # each rank read its own share
                bad_images = int(distributed.all_reduce_sum(torch.tensor([float(bad_images)], device=device)).item())
            _check_skipped(spec, skipped, t.steps_per_epoch, epoch, t.last_path)
            if not _finite([*model.state_dict().values(), *terms.state_dict().values()]):
                # A finite loss with an update that overflowed: the weights are lost, keep the last checkpoint.
                raise UserError(
                    f"{spec.label}: the weights became non-finite in epoch {epoch} (an update overflowed); "
                    f"{_keep_note(t.last_path)}; {_nan_hint(spec)}"
                )
            result = evaluate(model, val, device, amp_dtype, teacher_val_pred)
            t.clear_hooks()
            row: dict[str, Any] = {
                "epoch": epoch,
                **Meters.row(terms.columns, totals),
                "lr": t.optimizer.param_groups[0]["lr"],
                "train_acc": totals[2] / max(totals[1], 1.0),
                "val_acc": result["val_acc"],
                "agreement": result.get("agreement", float("nan")),
                "samples_per_sec": totals[0] / seconds,
                "epoch_seconds": seconds,
                "skipped_steps": skipped,
                "bad_images": bad_images,  # unreadable images replaced in their batches (bad_images=skip)
                "per_class": result["per_class"],
            }
            improved = row["val_acc"] > t.best["val_acc"]
            if improved:
                t.best = {"val_acc": row["val_acc"], "epoch": epoch}
            # The row is written before the checkpoint: a crash between the two leaves a row that
            # resume drops (it keeps the rows of the epochs the checkpoint holds, from its history).
            if on_epoch is not None:
                on_epoch(row)
            t.history.append(row)
            t.save_epoch(epoch, improved)
            if spec.progress != "off":
                log.info(
                    "%s epoch %d/%d  loss %.4f  train_acc %.4f  val_acc %.4f  %.0f samples/s%s",
                    spec.label,
                    epoch,
                    spec.epochs,
                    row["loss"],
                    row["train_acc"],
                    row["val_acc"],
                    row["samples_per_sec"],
                    f"  ({skipped} non-finite steps skipped)" if skipped else "",
                )
            if _stop_requested(t.ddp, device) and epoch < spec.epochs:
                raise Interrupted(STOP.signum, t.last_path, f"the end of epoch {epoch}")
    finally:
        t.close()
    return {
        "best_val_acc": t.best["val_acc"],
        "best_epoch": t.best["epoch"],
        "last_val_acc": t.history[-1]["val_acc"],
        "history": t.history,
    }


def _restore(resume: Resume, t: _Training) -> dict[str, Any] | None:
    """Load a checkpoint's training state into `t` (history and best too); return the mid-epoch state or None."""
    s, path, spec, steps_per_epoch = resume.state, resume.path, t.spec, t.steps_per_epoch
    load_into(t.model, s["model"], "resume", path)
    # Checkpoints before loss terms hold the feat term's adapters under `adapter` only.
    saved = {"feat": s.get("adapter", {}), **s.get("terms", {})}
    for name, term in t.terms.terms.items():
        load_into(term, saved.get(name, {}), f"resume (the {name} loss term's state)", path)
    # The current recipe's hyper-parameters (lr, momentum, ...) win over the saved ones, so a run
    # can be resumed with e.g. a lower lr; with the same config they are the same values.
    optimizer, scheduler, scaler = t.optimizer, t.scheduler, t.scaler
    recipe = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(s["optimizer"])
        scheduler.load_state_dict(s["scheduler"])
        if scaler.is_enabled() and s["scaler"]:
            scaler.load_state_dict(s["scaler"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(
            f"resume {path}: its optimizer state does not fit this run ({str(e).splitlines()[0][:150]}); "
            "resume with the settings it was trained with"
        ) from None
    scheduler.base_lrs = [spec.lr] * len(optimizer.param_groups)
    lr = spec.lr * lr_factor(spec.scheduler, scheduler.last_epoch / steps_per_epoch, spec.epochs)
    for group, own in zip(optimizer.param_groups, recipe):
        group.update(own, initial_lr=spec.lr, lr=lr)
    prepare_fused(optimizer)
    _set_rng_state(s["rng"], t.batches, t.device)
    t.history = [dict(row) for row in s["history"]]
    if len(t.history) != int(s["epoch"]):
        raise UserError(
            f"resume {path} is inconsistent (epoch {s['epoch']} but {len(t.history)} metrics rows); use another "
            "checkpoint"
        )
    t.best = {"val_acc": float(s.get("best_val_acc", -1.0)), "epoch": int(s.get("best_epoch", 0))}
    partial = s.get("partial")
    saved_world = int(s.get("world_size", 1))
    if partial is not None and saved_world != t.batches.world:
        # Another number of ranks means other global batches: replay the interrupted epoch from its
        # start, in the same order (at most that epoch's progress is recomputed).
        log.info(
            "resume: saved by %d rank(s), continuing on %d: epoch %d restarts from its first step",
            saved_world,
            t.batches.world,
            len(t.history) + 1,
        )
        partial = {"batches": 0, "order": partial["order"], "sums": torch.zeros(0), "skipped": 0, "seconds": 0.0}
    if partial is not None and partial["batches"] >= steps_per_epoch:
        raise UserError(
            f"resume {path} stopped at step {partial['batches']} of an epoch of {steps_per_epoch} steps; "
            "resume with the batch_size and data it was trained with"
        )
    return partial


def _repair_best(resume: Resume, best_path: Path) -> None:
    """Write best.pt from the checkpoint resumed from when that checkpoint is the end of the best epoch
    but best.pt does not hold it (a crash came between the epoch's last.pt and best.pt writes)."""
    s = resume.state
    epoch = int(s["epoch"])
    if s.get("partial") is not None or epoch == 0 or int(s.get("best_epoch", 0)) != epoch:
        return
    if best_path.is_file():
        try:
            if int(load_checkpoint(best_path, "best.pt").get("epoch", -1)) == epoch:
                return
        except UserError:  # unreadable or failing its checksum: replaced by the good copy below
            pass
    log.info("resume: %s does not hold the best epoch (%d); writing it from %s", best_path, epoch, resume.path)
    save_checkpoint(s, best_path)


def _step_flags(loss: Tensor, ddp: bool) -> Tensor:
    """[the loss is not finite, a SIGINT/SIGTERM arrived] as floats on the device, nothing read on the host.
    Under torchrun both are the maximum over the ranks (one small all-reduce a step, which on NCCL the host
    does not wait for), so every rank drops the same steps and stops at the same one; in one process the
    signal is seen on the host at once and the flag is the loss's alone."""
    bad = (~torch.isfinite(loss)).float()
    if not ddp:
        return bad.unsqueeze(0)
    flags = torch.stack([bad, torch.full((), float(STOP.signum or 0), device=loss.device)])  # a fill, not a copy
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return flags


class _StepLog:
    """Each step's flags (`_step_flags`) and losses (`Meters.losses`) on the device since the last read:
    one row per step, [non-finite, signal, total loss, one value per metrics column], read on the host
    every POLL_STEPS steps, not every step."""

    def __init__(self, first: int, columns: int, device: torch.device):
        self.rows = torch.zeros(POLL_STEPS, 3 + columns, device=device)
        self.first, self.n = first, 0  # the step index of rows[0], the rows written

    @property
    def full(self) -> bool:
        return self.n == POLL_STEPS

    def add(self, flags: Tensor, losses: Tensor) -> None:
        self.rows[self.n, : len(flags)] = flags
        self.rows[self.n, 2:] = losses
        self.n += 1

    def read(self, extra: Tensor | None = None) -> tuple[list[tuple[int, list[float]]], list[float]]:
        """((step index, [flags..., losses...]) per step logged, `extra` read along (one host sync)); empties it."""
        values = self.rows[: self.n].flatten()
        flat = (torch.cat([values, extra]) if extra is not None else values).tolist()
        width, n = self.rows.shape[1], self.n
        rows = [(self.first + k, flat[k * width : (k + 1) * width]) for k in range(n)]
        self.first, self.n = self.first + n, 0
        return rows, flat[n * width :]


def _stop_requested(ddp: bool, device: torch.device) -> bool:
    """A SIGINT/SIGTERM reached this rank (or, under torchrun, any rank)."""
    if not ddp:
        return STOP.signum is not None
    flag = torch.tensor([float(STOP.signum or 0)], device=device)  # NCCL reduces device tensors only
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    signum = int(flag.item())
    if signum and STOP.signum is None:
        STOP.signum = signum
    return bool(signum)


def _check_skipped(spec: FitSpec, skipped: int, steps: int, epoch: int, last_path: Path | None) -> None:
    """nan_policy=skip: an epoch with every step skipped trained nothing (an error); more than
    SKIP_WARN_SHARE of its steps skipped is a warning on the console."""
    if skipped == steps:
        lr = "teacher_train.lr" if spec.label == "teacher" else "lr"
        raise UserError(
            f"{spec.label}: every step of epoch {epoch} had a non-finite loss and was skipped (nan_policy=skip), "
            f"so nothing trains; {_keep_note(last_path)}; lower {lr} or check the teacher and the data for "
            "non-finite values"
        )
    if skipped > SKIP_WARN_SHARE * steps:
        log.warning(
            "%s: %d of %d steps of epoch %d had a non-finite loss and were skipped (nan_policy=skip, more than "
            "%.0f %%); the run is barely training: lower the learning rate",
            spec.label,
            skipped,
            steps,
            epoch,
            100 * SKIP_WARN_SHARE,
        )


def _keep_note(last_path: Path | None) -> str:
    if last_path is None:
        return "nothing is saved for it"
    if last_path.is_file():
        return f"{last_path} keeps the last good state (the end of the previous epoch)"
    return "no checkpoint was written yet"


def _nan_hint(spec: FitSpec) -> str:
    lr = "teacher_train.lr" if spec.label == "teacher" else "lr"
    again = f", then continue with resume={spec.checkpoint_dir.parent}" if spec.checkpoint_dir is not None else ""
    return f"lower {lr} (now {spec.lr:g}) or set nan_policy=skip{again}"


def _stop_non_finite(
    spec: FitSpec, terms: dict[str, float], epoch: int, batch: int, steps_per_epoch: int, last_path: Path | None
) -> None:
    """nan_policy=stop: raise naming the step and the term. last.pt is left as it is: it holds the end
    of the previous epoch, whose weights were checked finite before it was written."""
    bad = ", ".join(f"{name}={value:g}" for name, value in terms.items() if not math.isfinite(value)) or "the total"
    raise UserError(
        f"{spec.label}: the loss went non-finite at epoch {epoch}, step {batch}/{steps_per_epoch} ({bad}); "
        f"{_keep_note(last_path)}; {_nan_hint(spec)}"
    )
