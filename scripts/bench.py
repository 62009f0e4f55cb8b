"""Training throughput of kdtrain against plain PyTorch loops doing the same math, for one setting.

    python scripts/bench.py --case digits --device cpu --epochs 10 --json bench_digits.json
    python scripts/bench.py --case cifar100_kd --device cuda --amp bf16 --channels-last --syncs --profile

Ways to train the same student, timed in one process, interleaved round by round (the order rotates
every round); each figure is the median training time of one epoch over the measured rounds:

  plain_index    a hand-written loop done right: the training tensors on the device, a fresh
                 permutation on the device each epoch, batches gathered by indexing (what kdtrain's
                 DeviceBatches does); teacher forward every step (eval mode, no grad, same autocast);
                 CE + KD from kdtrain.losses with the mode's weights; the same optimizer and per-step
                 schedule; the loss summed on the device, read once per epoch;
  plain_loader   the same loop fed by a DataLoader the careful way: a BatchSampler so each batch is
                 one gather from a TensorDataset (not 64 single-sample reads and a collate), pinned
                 memory and non_blocking copies on CUDA;
  engine         kdtrain.engine.fit with the teacher run every step (teacher_cache=off);
  cached         kdtrain.engine.fit with the teacher-output cache (`--views K` augmented views per
                 sample for an augmented case); built once before the rounds, its build time
                 reported apart;
  student_alone  kdtrain.engine.fit in mode none (CE with weight 1, no teacher): the floor.

Round 0 warms up (cuDNN autotuning, torch.compile, allocator) on a slice of the training set that
holds every batch shape of a full epoch; rounds 1..--epochs are full epochs. `--budget S` stops
adding rounds when the next one would end past S seconds from the start (at least one is measured).
`--syncs` counts host syncs per training step: `aten::_local_scalar_dense` calls (.item(), bool(t),
float(t)) from the profiler on any device, plus, on CUDA, the warnings of
torch.cuda.set_sync_debug_mode("warn") (every blocking copy or synchronisation); each is counted over
runs of k and 2k steps and differenced, so per-run costs (setup, evaluation) cancel. `--profile`
records a torch.profiler summary of the top kernels (CUDA) or ops (CPU) over a few steps per way.
The projected time of a full run of the case's config (its `epochs`, e.g. 240 for the CIFAR-100
recipe) is epochs x (training epoch + one evaluation over the validation set).

Cases: `digits` is the default config (cnn teacher -> mlp student, digits, soft mode, batch 64, no
augmentation); `cifar` is resnet56 -> resnet20 on random 3x32x32 tensors with 100 classes (batch
64, no augmentation; `--samples`, default 2048); `cifar100_kd` is the CIFAR-100 KD recipe
(experiment=cifar100_resnet32x4_resnet8x4_kd: resnet32x4 -> resnet8x4, batch 64, SGD, random crop +
flip on the device) on random CIFAR-shaped tensors (default 50,000 training and 10,000 validation
samples, as CIFAR-100). The teachers are freshly initialised: the speed of a forward pass does not
depend on the weights. The thread count is torch's default (not changed).

The JSON (`--json`) is rewritten after every round, so a run stopped from outside keeps what it
measured; the exit status is 1 when any way failed (the others are still measured and reported).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from kdtrain.data import TensorSet
from kdtrain.engine import FitSpec, evaluate, fit, lr_factor, make_optimizer, plain_schedule
from kdtrain.losses import ce_loss, kd_loss, total_loss
from kdtrain.models import build_model, count_params

WAYS = ("plain_index", "plain_loader", "engine", "cached", "student_alone")
CASES = ("digits", "cifar", "cifar100_kd")
ALONE = {"ce": 1.0, "kd": 0.0, "feat": 0.0}


@dataclass
class Setup:
    teacher: nn.Module
    make_student: Callable[[], nn.Module]
    train: TensorSet  # on the training device
    train_host: TensorSet  # the same tensors on the CPU (for the DataLoader way)
    val: TensorSet  # on the CPU (kdtrain.engine.evaluate compares with CPU predictions)
    augment: Any  # the case's batch augmentation (a kdtrain CropFlip) or None
    cfg: Any  # the composed kdtrain config (recipe, weights, temperature, epochs)
    weights: dict[str, float]
    description: str

    def head(self, n: int | None) -> TensorSet:
        """The first `n` training samples (all when None), on the device."""
        return self.train if n is None else TensorSet(self.train.x[:n], self.train.y[:n])


def compose(overrides: list[str]) -> Any:
    import hydra

    from kdtrain.config import register_schema

    register_schema()
    with hydra.initialize_config_module(config_module="kdtrain.conf", version_base="1.3"):
        return hydra.compose("config", overrides=overrides)


def random_set(n: int, in_shape: tuple[int, int, int], classes: int, g: torch.Generator) -> TensorSet:
    return TensorSet(torch.randn(n, *in_shape, generator=g), torch.randint(0, classes, (n,), generator=g))


def setup(
    case: str, device: torch.device, samples: int | None, val_samples: int | None, batch_size: int | None = None
) -> Setup:
    from omegaconf import OmegaConf

    from kdtrain.config import effective_weights
    from kdtrain.data import build_dataset

    augment = None
    if case == "digits":
        cfg = compose([])
        splits = build_dataset(cfg.dataset)
        train, val, classes, in_shape = splits.train, splits.val, splits.num_classes, splits.in_shape
    else:
        from kdtrain.data.augment import make_augment
        from kdtrain.data.vision import CIFAR100_MEAN, CIFAR100_STD

        if case == "cifar":
            cfg, default_n, default_val = compose(["teacher=resnet56", "student=resnet20"]), 2048, 256
        else:  # the recipe's pair, hyper-parameters and augmentation (crop with 4-pixel padding + flip)
            cfg, default_n, default_val = compose(["experiment=cifar100_resnet32x4_resnet8x4_kd"]), 50_000, 10_000
            augment = make_augment(CIFAR100_MEAN, CIFAR100_STD, pad=4, flip=True)
        g = torch.Generator().manual_seed(0)
        classes, in_shape = 100, (3, 32, 32)
        train = random_set(samples or default_n, in_shape, classes, g)
        val = random_set(val_samples or default_val, in_shape, classes, g)
    if batch_size is not None:
        cfg.batch_size = batch_size
    torch.manual_seed(0)
    teacher = build_model(OmegaConf.to_container(cfg.teacher, resolve=True), classes, in_shape, "teacher")
    teacher = teacher.to(device).eval().requires_grad_(False)

    def make_student() -> nn.Module:
        torch.manual_seed(1)
        return build_model(OmegaConf.to_container(cfg.student, resolve=True), classes, in_shape, "student").to(device)

    s = make_student()
    desc = (
        f"{cfg.teacher.name} ({count_params(teacher):,} params) -> {cfg.student.name} ({count_params(s):,} params), "
        f"{len(train):,} training samples {tuple(in_shape)}, {len(val):,} validation, {classes} classes, "
        f"batch {cfg.batch_size}, mode {cfg.mode.value}, augment {'crop+flip' if augment else 'off'}"
    )
    train_dev = TensorSet(train.x.to(device), train.y.to(device))
    return Setup(teacher, make_student, train_dev, train, val, augment, cfg, effective_weights(cfg), desc)


def steps_per_epoch(n: int, b: int) -> int:
    """Batches per shuffled epoch, as DeviceBatches counts them (a trailing single sample is dropped)."""
    return n // b if n % b == 1 else math.ceil(n / b)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainLoop:
    """The hand-written loops (see the module docstring); `epoch(n)` trains one epoch on the first `n`
    samples (all when None) and returns its seconds."""

    def __init__(
        self,
        s: Setup,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        channels_last: bool,
        compile: bool,
        loader: bool,
    ):
        self.s, self.device, self.channels_last, self.loader = s, device, channels_last, loader
        self.batch_size = int(s.cfg.batch_size)
        self.student = s.make_student()
        if channels_last:
            self.student.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.student) if compile else self.student
        self.optimizer = make_optimizer(list(self.student.parameters()), s.cfg.optimizer, float(s.cfg.lr))
        steps, epochs = steps_per_epoch(len(s.train), self.batch_size), int(s.cfg.epochs)
        schedule = plain_schedule(s.cfg.scheduler)  # as the engine does: no config reads at every step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(schedule, step / steps, epochs)
        )
        self.autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    def batches(self, n: int) -> Iterator[tuple[Tensor, Tensor]]:
        b, steps = self.batch_size, steps_per_epoch(n, self.batch_size)
        if not self.loader:
            x, y = self.s.train.x, self.s.train.y
            order = torch.randperm(n, device=self.device)
            for i in range(steps):
                idx = order[i * b : (i + 1) * b]
                yield x[idx], y[idx]
            return
        data = TensorDataset(self.s.train_host.x[:n], self.s.train_host.y[:n])
        sampler = BatchSampler(RandomSampler(data), b, drop_last=steps < math.ceil(n / b))
        pin = self.device.type == "cuda"
        # batch_size=None with a BatchSampler: the dataset is indexed with each batch's index list (one gather).
        for x, y in DataLoader(data, batch_size=None, sampler=sampler, pin_memory=pin):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def epoch(self, n: int | None = None) -> float:
        teacher, weights, cfg = self.s.teacher, self.s.weights, self.s.cfg
        sync(self.device)
        start = time.perf_counter()
        self.student.train()
        total = torch.zeros((), device=self.device)
        for x, y in self.batches(n or len(self.s.train)):
            if self.s.augment is not None:
                x = self.s.augment(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.autocast:
                logits = self.forward(x)
                with torch.no_grad():
                    teacher_logits = teacher(x)
            terms = {"ce": ce_loss(logits, y)}
            if weights["kd"] > 0:
                terms["kd"] = kd_loss(logits, teacher_logits, float(cfg.temperature))
            loss = total_loss(terms, weights)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total += loss.detach() * len(y)  # summed on the device, read once per epoch
        float(total)
        return time.perf_counter() - start


class EngineWay:
    """kdtrain.engine.fit, one epoch per call on a student kept across calls; `epoch(n)` returns the
    engine's own epoch time (the training loop, without the evaluation that follows it)."""

    def __init__(
        self,
        s: Setup,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        weights: dict[str, float],
        label: str,
        channels_last: bool,
        compile: bool,
        teacher_cache: Any = None,
    ):
        self.s, self.device, self.amp_dtype, self.cache = s, device, amp_dtype, teacher_cache
        self.teacher = s.teacher if weights["kd"] > 0 or weights["feat"] > 0 else None
        self.student = s.make_student()
        cfg = s.cfg
        self.terms = None  # CE alone (the student without a teacher), else the mode's loss terms
        if self.teacher is not None:
            from kdtrain.terms import LossTerms, resolve
            from kdtrain.terms import Setup as TermSetup

            shape, classes = tuple(s.train.x.shape[1:]), int(s.train.y.max()) + 1
            setup = TermSetup(self.student, self.teacher, s.train, classes, shape, device, cfg)
            self.terms = LossTerms(resolve(cfg), setup).to(device)
        self.spec = FitSpec(
            epochs=1,
            batch_size=int(cfg.batch_size),
            lr=float(cfg.lr),
            seed=0,
            optimizer=cfg.optimizer,
            scheduler=cfg.scheduler,
            label=label,
            progress="off",
            channels_last=channels_last,  # the same choice as the plain loops (on CUDA the engine's default is on)
            compile=compile,
        )

    def epoch(self, n: int | None = None, val: TensorSet | None = None) -> float:
        result = fit(
            self.student,
            self.s.head(n),
            val if val is not None else self.s.val,
            self.spec,
            self.device,
            self.amp_dtype,
            terms=self.terms,
            teacher=self.teacher,
            augment=self.s.augment,
            teacher_cache=self.cache,
        )
        return float(result["history"][-1]["epoch_seconds"])


def build_cache(
    s: Setup, device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool, views: int
) -> tuple[Any, float]:
    from kdtrain.teacher_cache import TeacherCache

    sync(device)
    start = time.perf_counter()
    cache = TeacherCache.build(
        s.teacher,
        s.train,
        device,
        amp_dtype,
        channels_last=channels_last,
        temperature=float(s.cfg.temperature),
        views=views if s.augment is not None else 0,
        augment=s.augment,
    )
    sync(device)
    return cache, time.perf_counter() - start


def count_syncs(run: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """Host syncs while `run()` runs: `_local_scalar_dense` calls, and on CUDA the sync-debug warnings."""
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    counts = {"local_scalar_dense": sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense")}
    if device.type == "cuda":
        counts["sync_warnings"] = sum("synchroniz" in str(w.message) for w in caught)
    return counts


def syncs_per_step(
    way: PlainLoop | EngineWay, s: Setup, device: torch.device, k: int, val: TensorSet
) -> dict[str, Any]:
    """Host syncs per training step: counts over epochs of k and 2k steps, differenced."""
    b = int(s.cfg.batch_size)

    def run(steps: int) -> Callable[[], Any]:
        return (lambda: way.epoch(steps * b, val)) if isinstance(way, EngineWay) else (lambda: way.epoch(steps * b))

    one, two = count_syncs(run(k), device), count_syncs(run(2 * k), device)
    return {
        "steps": [k, 2 * k],
        "counts": [one, two],
        "per_step": {key: (two[key] - one[key]) / k for key in one},
        "per_run": {key: one[key] - (two[key] - one[key]) for key in one},  # setup + evaluation, once per epoch
    }


def kernel_profile(
    way: PlainLoop | EngineWay, s: Setup, device: torch.device, steps: int, val: TensorSet, top: int = 10
) -> dict[str, Any]:
    """The top kernels (CUDA) or ops (CPU) by self time over an epoch of `steps` steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    n = steps * int(s.cfg.batch_size)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        way.epoch(n, val) if isinstance(way, EngineWay) else way.epoch(n)
        sync(device)
    wall = time.perf_counter() - start

    def self_us(e: Any) -> float:
        if not cuda:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    events = [e for e in prof.key_averages() if (e.device_type == DeviceType.CUDA) == cuda and self_us(e) > 0]
    events.sort(key=self_us, reverse=True)
    busy = sum(self_us(e) for e in events) / 1e6
    return {
        "steps": steps,
        "wall_seconds": wall,  # under the profiler (slower than unprofiled)
        ("device_busy_seconds" if cuda else "cpu_op_seconds"): busy,
        "top": [{"name": e.key[:120], "count": e.count, "self_seconds": self_us(e) / 1e6} for e in events[:top]],
    }


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--case", choices=CASES, default="digits")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--epochs", type=int, default=None, help="measured epochs per way, at most (default: digits 10, else 3)"
    )
    ap.add_argument("--samples", type=int, default=None, help="training samples of a random case (see Cases)")
    ap.add_argument("--val-samples", type=int, default=None, help="validation samples of a random case")
    ap.add_argument("--batch-size", type=int, default=None, help="instead of the config's (e.g. a quick CPU check)")
    ap.add_argument("--amp", choices=("bf16", "off"), default="off", help="autocast dtype for every way (default off)")
    ap.add_argument("--channels-last", action="store_true", help="channels_last for every way (conv nets)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the student of every way")
    ap.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated subset of {','.join(WAYS)}")
    ap.add_argument("--views", type=int, default=4, help="cached views per sample in an augmented case (default 4)")
    ap.add_argument("--budget", type=float, default=None, help="seconds: add no round that would end past this")
    ap.add_argument("--syncs", action="store_true", help="count host syncs per step (engine and plain_index ways)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler summary of the top kernels per way")
    ap.add_argument("--name", default=None, help="the setting's name in the JSON (default: from the flags)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here (rewritten after every round)")
    args = ap.parse_args(argv)
    ways = [w for w in args.ways.split(",") if w]
    if unknown := sorted(set(ways) - set(WAYS)):
        ap.error(f"--ways: unknown {', '.join(unknown)}; choose from {', '.join(WAYS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available on this machine")
    device = torch.device(args.device)
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else None
    epochs = args.epochs or (10 if args.case == "digits" else 3)
    cl = args.channels_last
    name = args.name or "_".join([args.amp if amp_dtype else "fp32"] + ["cl"] * cl + ["compile"] * args.compile)

    s = setup(args.case, device, args.samples, args.val_samples, args.batch_size)
    n, b = len(s.train), int(s.cfg.batch_size)
    steps = steps_per_epoch(n, b)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"[{name}] case {args.case}: {s.description}")
    print(
        f"[{name}] device {device} ({device_name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"amp {args.amp}, channels_last {cl}, compile {args.compile}, ways {','.join(ways)}"
    )
    if cl:
        s.teacher.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # for every way from the start (fit turns it on for itself anyway)
    out: dict[str, Any] = {
        "name": name,
        "case": args.case,
        "description": s.description,
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "amp": args.amp,
        "channels_last": cl,
        "compile": args.compile,
        "samples": n,
        "val_samples": len(s.val),
        "batch_size": b,
        "steps_per_epoch": steps,
        "recipe_epochs": int(s.cfg.epochs),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "command": " ".join(sys.argv),
        "results": {},
        "errors": {},
        "complete": False,
    }

    def save() -> None:
        if args.json:
            load = os.getloadavg() if hasattr(os, "getloadavg") else None
            out["load_average"] = list(load) if load else None
            out["seconds"] = time.perf_counter() - started
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2) + "\n")

    def attempt(way: str, fn: Callable[[], Any]) -> Any:
        """Run `fn`; a failure is recorded against `way` (which leaves the rounds) instead of ending the run."""
        try:
            return fn()
        except Exception as e:  # any failure of one way: record it, measure the others
            traceback.print_exc()
            out["errors"][way] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"[{name}] {way} FAILED: {out['errors'][way]}")
            runners.pop(way, None)
            return None

    runners: dict[str, Callable[..., float]] = {}
    objects: dict[str, PlainLoop | EngineWay] = {}
    makers: dict[str, Callable[[], PlainLoop | EngineWay]] = {
        "plain_index": lambda: PlainLoop(s, device, amp_dtype, cl, args.compile, loader=False),
        "plain_loader": lambda: PlainLoop(s, device, amp_dtype, cl, args.compile, loader=True),
        "engine": lambda: EngineWay(s, device, amp_dtype, s.weights, "engine", cl, args.compile),
        "student_alone": lambda: EngineWay(s, device, amp_dtype, ALONE, "alone", cl, args.compile),
    }
    if "cached" in ways:
        built = attempt("cached", lambda: build_cache(s, device, amp_dtype, cl, args.views))
        if built is not None:
            cache, out["cache_build_seconds"] = built
            out["cache_views"] = cache.views
            print(f"[{name}] teacher cache: {cache.rows:,} rows ({cache.views} views) built in {built[1]:.2f} s")
            makers["cached"] = lambda: EngineWay(
                s, device, amp_dtype, s.weights, "cached", cl, args.compile, teacher_cache=cache
            )
    for way in ways:
        if way in makers and (obj := attempt(way, makers[way])) is not None:
            objects[way], runners[way] = obj, obj.epoch

    times: dict[str, list[float]] = {way: [] for way in runners}

    def finish_results() -> None:
        for way, ts in times.items():
            if ts:
                med = statistics.median(ts)
                out["results"][way] = {
                    "samples_per_sec": n / med,
                    "epoch_seconds": med,
                    "ms_per_step": 1000 * med / steps,
                    "per_epoch_seconds": ts,
                }
        r = {w: v["epoch_seconds"] for w, v in out["results"].items()}
        ratios = {}
        for a, base in (
            ("engine", "plain_index"),
            ("engine", "plain_loader"),
            ("cached", "plain_index"),
            ("plain_loader", "plain_index"),
        ):
            if a in r and base in r:
                ratios[f"{a}_vs_{base}"] = r[base] / r[a]  # speed ratio: > 1 means `a` is faster
        for a in ("engine", "cached"):
            if a in r and "student_alone" in r:
                ratios[f"{a}_step_vs_student_alone_step"] = r[a] / r["student_alone"]  # time ratio
        out["ratios"] = ratios
        eval_s = out.get("eval_seconds") or 0.0
        for v in out["results"].values():
            v["projected_minutes"] = out["recipe_epochs"] * (v["epoch_seconds"] + eval_s) / 60

    # Round 0: warm-up on a slice with every batch shape of a full epoch (full batches and the last one).
    warm = min(n, b * min(20, n // b) + n % b) or n
    print(f"[{name}] warm-up: {warm:,} samples per way")
    for way in list(runners):
        attempt(way, lambda way=way: runners[way](warm))
    if objects:
        # One evaluation over the validation set, as each epoch of a full run ends with (second call timed).
        student = next(iter(objects.values())).student

        def time_eval() -> float:
            sync(device)
            t = time.perf_counter()
            evaluate(student, s.val, device, amp_dtype, None)
            return time.perf_counter() - t

        attempt("evaluation", time_eval)
        out["eval_seconds"] = attempt("evaluation", time_eval)
    save()

    order = list(runners)
    small_val = TensorSet(s.val.x[:b], s.val.y[:b])
    last_round = 0.0
    for r in range(1, epochs + 1):
        elapsed = time.perf_counter() - started
        if r > 1 and args.budget and elapsed + last_round > args.budget:
            print(f"[{name}] budget: {elapsed:.0f} s used, a round takes {last_round:.0f} s: stopping at {r - 1}")
            break
        t = time.perf_counter()
        for way in [w for w in order if w in runners]:
            seconds = attempt(way, runners[way])
            if seconds is not None:
                times[way].append(seconds)
        last_round = time.perf_counter() - t
        order = order[1:] + order[:1]
        print(
            f"[{name}] round {r}/{epochs} ({last_round:.1f} s): "
            + ", ".join(f"{w} {n / ts[-1]:,.0f}/s" for w, ts in times.items() if ts and w in runners)
        )
        finish_results()
        if r == 1:  # the extras come after the first measured round, before any further one
            if args.syncs:
                k = min(8, n // (2 * b))
                out["syncs"] = {}
                for way in ("engine", "cached", "student_alone", "plain_index"):
                    if way in runners and k >= 1:
                        got = attempt(way, lambda way=way, k=k: syncs_per_step(objects[way], s, device, k, small_val))
                        if got is not None:
                            out["syncs"][way] = got
                            print(f"[{name}] host syncs per step, {way}: {got['per_step']}")
            if args.profile:
                out["profile"] = {}
                for way in ("engine", "cached", "plain_index"):
                    if way in runners:
                        p = attempt(
                            way, lambda way=way: kernel_profile(objects[way], s, device, min(20, steps), small_val)
                        )
                        if p is not None:
                            out["profile"][way] = p
                            print(f"[{name}] top kernels, {way} ({p['steps']} steps, {p['wall_seconds']:.2f} s):")
                            for e in p["top"]:
                                print(f"    {e['self_seconds'] * 1e3:9.2f} ms {e['count']:6d}x  {e['name'][:90]}")
        save()

    finish_results()
    print_table(out)
    out["complete"] = True
    save()
    if args.json:
        print(f"wrote {args.json}")
    return 1 if out["errors"] else 0


def print_table(out: dict[str, Any]) -> None:
    res = out["results"]
    base = res.get("plain_index", {}).get("samples_per_sec")
    print(f"\n[{out['name']}] {'way':<15}{'samples/s':>12}{'ms/step':>9}{'vs plain_index':>16}{'full run':>11}")
    for way in WAYS:
        if way in res:
            r = res[way]
            ratio = f"{r['samples_per_sec'] / base:.2f}x" if base else "-"
            print(
                f"[{out['name']}] {way:<15}{r['samples_per_sec']:>12,.0f}{r['ms_per_step']:>9.2f}{ratio:>16}"
                f"{r['projected_minutes']:>9.1f} m"
            )
    if "cache_build_seconds" in out:
        views = f"{out['cache_views']} views per sample" if out["cache_views"] else "no views: deterministic inputs"
        print(f"(the teacher cache, {views}, was built once in {out['cache_build_seconds']:.2f} s)")
    print(
        f"(full run: {out['recipe_epochs']} epochs x (epoch + one evaluation of {out['val_samples']:,} samples, "
        f"{out.get('eval_seconds') or 0:.2f} s))"
    )
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in out.get("ratios", {}).items()))
    for way, e in out["errors"].items():
        print(f"FAILED {way}: {e}")


if __name__ == "__main__":
    sys.exit(main())
