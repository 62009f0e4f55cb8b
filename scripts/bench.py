"""Training throughput of kdtrain against a plain PyTorch loop doing the same math.

    python scripts/bench.py --case digits --device cpu --epochs 10 --json bench_digits.json
    python scripts/bench.py --case cifar --device cuda --amp bf16 --channels-last --json bench_cifar.json

Four ways to train the same student for one epoch, timed in the same process, interleaved round by
round (the order rotates every round), each figure the median over `--epochs` epochs after one
warm-up epoch (the first round, dropped: allocator, cuDNN autotuning, lazy init):

  plain          a hand-written loop done right: DataLoader over a TensorDataset of the same tensors
                 (shuffled, same batch size; pinned memory and non_blocking copies on CUDA), the
                 teacher's forward pass every step (eval mode, no grad, same autocast), CE + KD from
                 kdtrain.losses with the mode's weights, the same optimizer and per-step schedule,
                 no .item() per step;
  engine         kdtrain.engine.fit with teacher_cache off (device-resident batches, teacher every step);
  cached         kdtrain.engine.fit with the teacher-output cache (built once before the rounds; its
                 build time is reported apart, it is paid once per teacher and dataset);
  student_alone  kdtrain.engine.fit in mode none (CE with weight 1, no teacher): the floor.

Ratios: engine_vs_plain = engine / plain samples/s; default_vs_plain = cached / plain samples/s (the
default soft-mode run: cache + device-resident data); cached_vs_student_alone = cached epoch time /
student-alone epoch time (1.0 means the teacher costs nothing any more).

Cases: `digits` is the default config (cnn teacher -> mlp student, digits, soft mode, batch 64,
no augmentation); `cifar` is resnet56 -> resnet20 on random 3x32x32 tensors with 100 classes
(CIFAR-100-shaped; `--samples`, batch 64). The teachers are freshly initialised: the speed of a
forward pass does not depend on the weights. The thread count is torch's default (not changed).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdtrain.data import TensorSet
from kdtrain.engine import FitSpec, fit, lr_factor, make_optimizer
from kdtrain.losses import ce_loss, kd_loss, total_loss
from kdtrain.models import build_model, count_params

NAMES = ("plain", "engine", "cached", "student_alone")


@dataclass
class Setup:
    teacher: nn.Module
    make_student: Callable[[], nn.Module]
    train: TensorSet
    val: TensorSet
    cfg: Any  # the composed kdtrain config (recipe, weights, temperature)
    weights: dict[str, float]
    description: str
    classes: int = 10
    in_shape: tuple[int, ...] = (1, 8, 8)


def compose(overrides: list[str]) -> Any:
    import hydra

    from kdtrain.config import register_schema

    register_schema()
    with hydra.initialize_config_module(config_module="kdtrain.conf", version_base="1.3"):
        return hydra.compose("config", overrides=overrides)


def setup(case: str, device: torch.device, samples: int) -> Setup:
    from omegaconf import OmegaConf

    from kdtrain.config import effective_weights
    from kdtrain.data import build_dataset

    if case == "digits":
        cfg = compose([])
        splits = build_dataset(cfg.dataset)
        train, val, classes, in_shape = splits.train, splits.val, splits.num_classes, splits.in_shape
    else:
        cfg = compose(["teacher=resnet56", "student=resnet20"])
        g = torch.Generator().manual_seed(0)
        classes, in_shape = 100, (3, 32, 32)
        train = TensorSet(
            torch.randn(samples, *in_shape, generator=g), torch.randint(0, classes, (samples,), generator=g)
        )
        val = TensorSet(torch.randn(256, *in_shape, generator=g), torch.randint(0, classes, (256,), generator=g))
    torch.manual_seed(0)
    teacher = build_model(OmegaConf.to_container(cfg.teacher, resolve=True), classes, in_shape, "teacher")
    teacher = teacher.to(device).eval().requires_grad_(False)

    def make_student() -> nn.Module:
        torch.manual_seed(1)
        return build_model(OmegaConf.to_container(cfg.student, resolve=True), classes, in_shape, "student").to(device)

    s = make_student()
    desc = (
        f"{cfg.teacher.name} ({count_params(teacher):,} params) -> {cfg.student.name} ({count_params(s):,} params), "
        f"{len(train):,} training samples {tuple(in_shape)}, {classes} classes, "
        f"batch {cfg.batch_size}, mode {cfg.mode.value}"
    )
    return Setup(teacher, make_student, train, val, cfg, effective_weights(cfg), desc, classes, tuple(in_shape))


def spec(cfg: Any, label: str, channels_last: bool | None) -> FitSpec:
    kwargs = {}
    if "channels_last" in inspect.signature(FitSpec).parameters:
        kwargs["channels_last"] = channels_last
    return FitSpec(
        epochs=1,
        batch_size=int(cfg.batch_size),
        lr=float(cfg.lr),
        seed=0,
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        label=label,
        progress="off",
        **kwargs,
    )


class PlainLoop:
    """The hand-written loop (see the module docstring); `epoch()` trains one epoch and returns its seconds."""

    def __init__(self, s: Setup, device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool):
        self.device, self.cfg, self.weights, self.channels_last = device, s.cfg, s.weights, channels_last
        self.student, self.teacher = s.make_student(), s.teacher
        if channels_last:
            self.student.to(memory_format=torch.channels_last)
            self.teacher.to(memory_format=torch.channels_last)
        pin = device.type == "cuda"
        self.loader = DataLoader(
            TensorDataset(s.train.x, s.train.y),
            batch_size=int(s.cfg.batch_size),
            shuffle=True,
            pin_memory=pin,
            generator=torch.Generator().manual_seed(0),
        )
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(params, s.cfg.optimizer, float(s.cfg.lr))
        steps, epochs = len(self.loader), 100
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(s.cfg.scheduler, step / steps, epochs)
        )
        self.autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
        self.samples = len(s.train)

    def epoch(self) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.student.train()
        self.teacher.eval()
        total = torch.zeros((), device=self.device)
        for x, y in self.loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast:
                logits = self.student(x)
                with torch.no_grad():
                    teacher_logits = self.teacher(x)
            terms = {"ce": ce_loss(logits, y)}
            if self.weights["kd"] > 0:
                terms["kd"] = kd_loss(logits, teacher_logits, float(self.cfg.temperature))
            loss = total_loss(terms, self.weights)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total += loss.detach() * len(y)  # summed on the device, read once per epoch
        float(total)
        return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_runner(
    s: Setup,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    distill: bool,
    label: str,
    channels_last: bool | None,
    **fit_kwargs: Any,
) -> Callable[[], float]:
    """One epoch of kdtrain.engine.fit per call, on a student kept across calls; returns its epoch seconds.
    `distill`: the mode's loss terms (else CE alone, the student without a teacher)."""
    from kdtrain.terms import LossTerms, resolve
    from kdtrain.terms import Setup as TermSetup

    student = s.make_student()
    terms = None
    if distill:
        setup = TermSetup(student, s.teacher, s.train, s.classes, s.in_shape, device, s.cfg)
        terms = LossTerms(resolve(s.cfg), setup).to(device)

    def run() -> float:
        result = fit(
            student, s.train, s.val, spec(s.cfg, label, channels_last), device, amp_dtype, terms=terms, **fit_kwargs
        )
        return float(result["history"][-1]["epoch_seconds"])

    return run


def build_cache(
    s: Setup, device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool
) -> tuple[Any, float]:
    from kdtrain.teacher_cache import TeacherCache

    sync(device)
    start = time.perf_counter()
    cache = TeacherCache.build(
        s.teacher, s.train, device, amp_dtype, channels_last=channels_last, temperature=float(s.cfg.temperature)
    )
    sync(device)
    return cache, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--case", choices=("digits", "cifar"), default="digits")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="measured epochs per way, after one warm-up (default: digits 10, cifar 3)",
    )
    ap.add_argument("--samples", type=int, default=2048, help="training samples of the cifar case (default 2048)")
    ap.add_argument("--amp", choices=("bf16", "off"), default="off", help="autocast dtype for every way (default off)")
    ap.add_argument(
        "--channels-last", action="store_true", help="channels_last memory format for every way (conv nets)"
    )
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available on this machine")
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else None
    epochs = args.epochs or (10 if args.case == "digits" else 3)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # both loops: fixed shapes

    s = setup(args.case, device, args.samples)
    print(f"case {args.case}: {s.description}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"amp {args.amp}, channels_last {args.channels_last}"
    )
    cl = args.channels_last  # on CUDA the engine would pick channels_last itself: pass the same choice as plain
    runners: dict[str, Callable[[], float]] = {}
    plain = PlainLoop(s, device, amp_dtype, args.channels_last)
    runners["plain"] = plain.epoch
    can_cache = "teacher_cache" in inspect.signature(fit).parameters
    off = {"teacher_cache": None} if can_cache else {}
    runners["engine"] = engine_runner(s, device, amp_dtype, True, "engine", cl, teacher=s.teacher, **off)
    cache_seconds = None
    if can_cache:
        cache, cache_seconds = build_cache(s, device, amp_dtype, bool(args.channels_last))
        runners["cached"] = engine_runner(
            s, device, amp_dtype, True, "cached", cl, teacher=s.teacher, teacher_cache=cache
        )
    else:
        print("kdtrain.engine.fit takes no teacher_cache here: the cached way is skipped")
    runners["student_alone"] = engine_runner(s, device, amp_dtype, False, "alone", cl)

    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for r in range(epochs + 1):
        for name in order:
            seconds = runners[name]()
            if r > 0:  # round 0 warms up
                times[name].append(seconds)
        order = order[1:] + order[:1]
        print(
            f"  round {r}/{epochs}{' (warm-up)' if r == 0 else ''}: "
            + ", ".join(f"{n} {len(s.train) / t:,.0f}/s" for n, t in ((n, (times[n] or [0])[-1]) for n in runners) if t)
        )

    results: dict[str, dict[str, Any]] = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        results[name] = {"samples_per_sec": len(s.train) / med, "epoch_seconds": med, "per_epoch_seconds": ts}
    if cache_seconds is not None:
        results["cached"]["cache_build_seconds"] = cache_seconds
    sps = {n: r["samples_per_sec"] for n, r in results.items()}
    ratios = {"engine_vs_plain": sps["engine"] / sps["plain"]}
    if "cached" in sps:
        ratios["cached_vs_student_alone"] = (
            results["cached"]["epoch_seconds"] / results["student_alone"]["epoch_seconds"]
        )
        ratios["default_vs_plain"] = sps["cached"] / sps["plain"]

    print(f"\n{'way':<15}{'samples/s':>12}{'epoch s':>10}{'vs plain':>10}")
    for name in NAMES:
        if name in results:
            r = results[name]
            ratio = r["samples_per_sec"] / sps["plain"]
            print(f"{name:<15}{r['samples_per_sec']:>12,.0f}{r['epoch_seconds']:>10.3f}{ratio:>9.2f}x")
    if cache_seconds is not None:
        print(f"(the cache was built once in {cache_seconds:.2f} s, before the rounds)")
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load:
        print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    if args.json:
        out = {
            "case": args.case,
            "description": s.description,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "amp": args.amp,
            "channels_last": args.channels_last,
            "samples": len(s.train),
            "batch_size": int(s.cfg.batch_size),
            "measured_epochs": epochs,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "load_average": list(load) if load else None,
            "command": " ".join(sys.argv),
            "results": results,
            "ratios": ratios,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
