"""Throughput and peak memory of kdtrain's image loaders, against a plain torchvision loop.

    python scripts/bench_data.py --json bench_data.json
    python scripts/bench_data.py --device cuda --model teacher=torchvision --model teacher.arch=resnet18 --json b.json

1. Generates a folder of JPEGs: --images (default 4,000) of --size px (256) in --classes (10) class folders,
   --val-fraction (20 %) of each class in val/, the rest in train/ (smooth random colour fields with mild
   noise, JPEG quality 90), and a second folder of the first --small (1,000) of them (hard links, same split).
2. Training throughput at --image-size (128), over --epochs (3) epochs; a run's figure is the median over
   epochs 2..E (epoch 1 starts the worker processes); --rounds R runs each way R times, alternating which
   goes first, and reports the median run:
     stream  `python -m kdtrain dataset=imagefolder dataset.root=DIR dataset.loader=stream ...` in a subprocess;
             samples/s from its metrics.jsonl (`samples_per_sec`: the training pass, evaluation excluded);
     plain   this script (--plain) in a subprocess: torchvision's ImageFolder + DataLoader (the same workers
             and batch size, shuffled, persistent workers, pinned memory on CUDA) with the same transforms
             (RandomResizedCrop + horizontal flip, then to float and normalised), the same teacher and student
             (kdtrain.models.build_model on the same composed config), the teacher run every step, CE + KD
             (kdtrain.losses) with the same weights and temperature, the same optimizer and per-step schedule,
             the same autocast and, on CUDA, channels_last and cuDNN autotuning, as kdtrain uses them.
   ratio = stream / plain (the goal: >= 1.0).
3. Peak memory of one-epoch kdtrain runs with dataset.loader=stream and dataset.loader=memory on the --small
   and the --images folder: the peak, over the run, of the kdtrain process's resident set plus the private
   pages of all its descendants (the DataLoader workers; pages they share with it count once), polled from
   /proc every 0.1 s. The stream path's peak should not grow with the dataset (within 100 MB);
   the memory path holds every image as uint8 (3 x 128 x 128 B = 48 KiB each).

The teacher is used as loaded (teacher_train.epochs=0: freshly initialised; speed does not depend on the
weights), the student-alone baseline is off. The default models are kdtrain's mlp as teacher and student,
cheap next to the decoding, so the loaders are what is measured; --model replaces them with kdtrain
overrides (on a GPU: --model teacher=torchvision --model student=torchvision, two resnet18). The JSON
(--json) is rewritten after every step; the exit status is 1 when any step failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The default models: kdtrain's mlp as teacher and student, cheap next to decoding a JPEG, so the loaders are
# what is measured (a conv teacher at 128 px on a CPU would make the models the bottleneck of both ways).
SMALL_MODELS = ("teacher=mlp", "student=mlp")


def generate(root: Path, images: int, size: int, classes: int, val_fraction: float, seed: int = 0) -> dict[str, int]:
    """root/{train,val}/c<k>/<n>.jpg: `images` JPEGs in `classes` classes (class k gets images // classes, the
    first ones k < images % classes one more), `val_fraction` of each class in val/; returns the counts."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for k in range(classes):
        n = images // classes + (k < images % classes)
        n_val = round(n * val_fraction)
        for i in range(n):
            split = "val" if i < n_val else "train"
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
                (size, size), Image.BICUBIC
            )
            pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-8, 9, (size, size, 3), dtype=np.int16)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
            counts[split] += 1
    return counts


def subset(src: Path, dst: Path, images: int, classes: int, val_fraction: float) -> dict[str, int]:
    """dst: hard links to the first `images` images of src, per class and split as `generate` splits them."""
    counts = {"train": 0, "val": 0}
    for k in range(classes):
        n = images // classes + (k < images % classes)
        n_val = round(n * val_fraction)
        for split, take in (("val", n_val), ("train", n - n_val)):
            for path in sorted((src / split / f"c{k}").glob("*.jpg"), key=lambda p: int(p.stem))[:take]:
                target = dst / split / f"c{k}" / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, target)
                counts[split] += 1
    return counts


# --- peak memory of a process tree ------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces: fields after the last ")"
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _memory_bytes(pid: int, private_only: bool) -> int:
    """`pid`'s resident set, or (`private_only`) its private pages alone (0 once it is gone)."""
    keys = ("Private_Clean:", "Private_Dirty:") if private_only else ("Rss:",)
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0
    return sum(int(line.split()[1]) * 1024 for line in lines if line.startswith(keys))


class TreeMemory:
    """Polls the memory of a process tree in a thread: the process's resident set plus its descendants'
    private pages (what a forked DataLoader worker shares with it counts once); `peak` is the largest seen.
    Unlike PSS, this does not depend on how many other processes on the machine map the same libraries."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval, self.peak, self.peak_processes = pid, interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            tree, pids, i = _children(), [self.pid], 0
            while i < len(pids):
                pids += tree.get(pids[i], [])
                i += 1
            total = sum(_memory_bytes(p, private_only=p != self.pid) for p in pids)
            if total > self.peak:
                self.peak, self.peak_processes = total, len(pids)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(cmd: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run `cmd` (its output to `log`), polling its process tree's memory; raises on a non-zero exit."""
    # kdtrain as this process imports it; this checkout last, for a run without PYTHONPATH. The subprocess runs
    # in the log's folder: `python -m` puts its working directory first on sys.path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)}
    env.pop("HYDRA_FULL_ERROR", None)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        memory = TreeMemory(proc.pid)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        finally:
            memory.stop()
    if rc != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {rc}; the end of {log}:\n{tail}")
    return {
        "peak_mb": memory.peak / 2**20,
        "processes_at_peak": memory.peak_processes,
        "wall_seconds": time.perf_counter() - start,
    }


# --- the two ways --------------------------------------------------------------------------------------


def kdtrain_overrides(args: argparse.Namespace, root: Path, loader: str, epochs: int) -> list[str]:
    return [
        "dataset=imagefolder",
        f"dataset.root={root}",
        f"dataset.image_size={args.image_size}",
        f"dataset.loader={loader}",
        f"dataset.workers={args.workers}",
        f"epochs={epochs}",
        f"batch_size={args.batch_size}",
        f"device={args.device}",
        f"amp={args.amp}",
        "teacher_train.epochs=0",
        "baseline=false",
        "progress=log",
        *args.model,
    ]


def run_kdtrain(args: argparse.Namespace, root: Path, loader: str, epochs: int, work: Path, tag: str) -> dict[str, Any]:
    run_dir = work / f"run_{tag}"
    cmd = [sys.executable, "-m", "kdtrain", *kdtrain_overrides(args, root, loader, epochs)]
    cmd += [f"hydra.run.dir={run_dir}", f"teacher_store={work / 'teachers'}"]
    result = run_measured(cmd, work / f"{tag}.log", args.timeout)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [float(r["samples_per_sec"]) for r in rows]
    return {**result, "samples_per_sec_per_epoch": rates, "samples_per_sec": statistics.median(rates[1:] or rates)}


def run_plain(args: argparse.Namespace, root: Path, epochs: int, work: Path, tag: str) -> dict[str, Any]:
    out = work / f"{tag}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain", str(root), "--plain-out", str(out)]
    cmd += [f"--epochs={epochs}", f"--image-size={args.image_size}", f"--workers={args.workers}"]
    cmd += [f"--batch-size={args.batch_size}", f"--device={args.device}", f"--amp={args.amp}"]
    cmd += [f"--model={m}" for m in args.model]
    result = run_measured(cmd, work / f"{tag}.log", args.timeout)
    rates = json.loads(out.read_text())["samples_per_sec_per_epoch"]
    return {**result, "samples_per_sec_per_epoch": rates, "samples_per_sec": statistics.median(rates[1:] or rates)}


def plain_loop(args: argparse.Namespace) -> None:
    """The plain torchvision loop (see the module docstring); writes its per-epoch samples/s to --plain-out."""
    import hydra
    import torch
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    from kdtrain.config import effective_weights, register_schema
    from kdtrain.data import IMAGENET_MEAN, IMAGENET_STD
    from kdtrain.engine import lr_factor, make_optimizer, wants_channels_last
    from kdtrain.losses import ce_loss, kd_loss, total_loss
    from kdtrain.models import build_model
    from kdtrain.run import resolve_amp

    register_schema()
    root = Path(args.plain)
    with hydra.initialize_config_module(config_module="kdtrain.conf", version_base="1.3"):
        cfg = hydra.compose("config", overrides=kdtrain_overrides(args, root, "stream", args.epochs))
    device = torch.device(args.device)
    amp_dtype = resolve_amp(cfg.amp, device)
    torch.manual_seed(0)
    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.RandomResizedCrop(args.image_size, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    data = ImageFolder(str(root / "train"), transform=transform)
    workers = int(args.workers)
    batches = DataLoader(
        data,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    shape, classes = (3, args.image_size, args.image_size), len(data.classes)
    teacher = build_model(OmegaConf.to_container(cfg.teacher, resolve=True), classes, shape, "teacher").to(device)
    student = build_model(OmegaConf.to_container(cfg.student, resolve=True), classes, shape, "student").to(device)
    teacher.eval().requires_grad_(False)
    channels_last = wants_channels_last(None, device, student)
    if channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    weights, temperature = effective_weights(cfg), float(cfg.temperature)
    optimizer = make_optimizer(list(student.parameters()), cfg.optimizer, float(cfg.lr))
    steps = len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg.scheduler, step / steps, int(cfg.epochs))
    )
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    rates = []
    for _ in range(args.epochs):
        student.train()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, seen = time.perf_counter(), 0
        total = torch.zeros((), device=device)
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                logits = student(x)
                with torch.no_grad():
                    teacher_logits = teacher(x)
            terms = {"ce": ce_loss(logits, y)}
            if weights["kd"] > 0:
                terms["kd"] = kd_loss(logits, teacher_logits, temperature)
            loss = total_loss(terms, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.detach() * len(y)
            seen += len(y)
        float(total)  # wait for the epoch's work (one host sync per epoch)
        rates.append(seen / (time.perf_counter() - start))
        print(f"plain: epoch {len(rates)}: {rates[-1]:.1f} samples/s", flush=True)
    Path(args.plain_out).write_text(json.dumps({"samples_per_sec_per_epoch": rates}) + "\n")


# --- main ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=4000, help="images in the generated folder (default 4,000)")
    ap.add_argument("--small", type=int, default=None, help="images in the small folder (default: a quarter)")
    ap.add_argument("--size", type=int, default=256, help="the JPEGs' side in px (default 256)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--image-size", type=int, default=128, help="dataset.image_size of the runs (default 128)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the throughput runs (the median of 2..E)")
    ap.add_argument("--rounds", type=int, default=1, help="throughput runs of each way, alternating (the median)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="decoding processes (default: the usable cores)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--amp", default="auto", help="kdtrain's amp=, for both ways (default auto)")
    ap.add_argument(
        "--model",
        action="append",
        default=None,
        help="a kdtrain override of the models, repeatable (default: teacher=mlp, student=mlp)",
    )
    ap.add_argument("--skip-memory", action="store_true", help="only the throughput comparison")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess (default 1800)")
    ap.add_argument("--keep", type=Path, default=None, help="generate into (and keep) this folder")
    ap.add_argument("--json", type=Path, default=None, help="write the results here (rewritten after every step)")
    ap.add_argument("--plain", default=None, help=argparse.SUPPRESS)  # internal: run the plain loop on this root
    ap.add_argument("--plain-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.model = args.model if args.model is not None else list(SMALL_MODELS)
    if args.workers is None:
        args.workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.plain:
        plain_loop(args)
        return 0
    small = args.small or max(args.classes * 2, args.images // 4)

    out: dict[str, Any] = {
        "name": "bench_data",
        "command": " ".join(sys.argv if argv is None else ["scripts/bench_data.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),  # the runs' torch threads follow it
        "settings": {
            "images": args.images,
            "small": small,
            "size": args.size,
            "classes": args.classes,
            "val_fraction": args.val_fraction,
            "image_size": args.image_size,
            "epochs": args.epochs,
            "rounds": args.rounds,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "device": args.device,
            "amp": args.amp,
            "model": args.model,
        },
        "results": {},
        "memory": {},
        "errors": {},
        "complete": False,
    }

    def save() -> None:
        out["seconds"] = time.perf_counter() - started
        load = os.getloadavg() if hasattr(os, "getloadavg") else None
        out["load_average"] = list(load) if load else None
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2) + "\n")

    def attempt(step: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as e:  # one step failing: record it, run the others
            traceback.print_exc()
            out["errors"][step] = f"{type(e).__name__}: {str(e).strip()[:3000]}"
            save()
            return None

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        work = Path(tmp)
        big = (args.keep or work) / f"images_{args.images}"
        if not big.exists():
            t0 = time.perf_counter()
            out["generated"] = generate(big, args.images, args.size, args.classes, args.val_fraction)
            print(f"generated {args.images} JPEGs of {args.size} px in {big} in {time.perf_counter() - t0:.0f} s")
        little = work / f"images_{small}"
        out["generated_small"] = subset(big, little, small, args.classes, args.val_fraction)
        save()

        # Rounds alternate which way goes first, so a change in the machine's load hits both alike.
        runs: dict[str, list[dict[str, Any]]] = {"stream": [], "plain": []}
        for r in range(args.rounds):
            for way in ("stream", "plain") if r % 2 == 0 else ("plain", "stream"):
                tag = f"{way}_{r}"
                if way == "stream":
                    got = attempt(tag, lambda t=tag: run_kdtrain(args, big, "stream", args.epochs, work, t))
                else:
                    got = attempt(tag, lambda t=tag: run_plain(args, big, args.epochs, work, t))
                if got:
                    runs[way].append(got)
                    print(f"round {r} {way}: {got['samples_per_sec']:.1f} samples/s, peak {got['peak_mb']:.0f} MB")
                    rates = [run["samples_per_sec"] for run in runs[way]]
                    out["results"][way] = {"samples_per_sec": statistics.median(rates), "runs": runs[way]}
                save()
        if runs["stream"] and runs["plain"]:
            out["ratio"] = out["results"]["stream"]["samples_per_sec"] / out["results"]["plain"]["samples_per_sec"]
            print(f"ratio stream / plain (medians over {args.rounds} rounds): {out['ratio']:.2f}")
        save()

        if not args.skip_memory:
            for loader in ("stream", "memory"):
                for n, root in ((small, little), (args.images, big)):
                    tag = f"{loader}_{n}"
                    got = attempt(
                        f"memory_{tag}", lambda r=root, t=tag, ld=loader: run_kdtrain(args, r, ld, 1, work, t)
                    )
                    if got:
                        out["memory"].setdefault(loader, {})[str(n)] = {
                            "peak_mb": got["peak_mb"],
                            "processes_at_peak": got["processes_at_peak"],
                            "samples_per_sec_epoch1": got["samples_per_sec"],
                            "wall_seconds": got["wall_seconds"],
                        }
                        print(f"memory {loader} on {n} images: peak {got['peak_mb']:.0f} MB")
                    save()
                runs = out["memory"].get(loader, {})
                if len(runs) == 2:
                    out["memory"][loader]["growth_mb"] = runs[str(args.images)]["peak_mb"] - runs[str(small)]["peak_mb"]
        out["complete"] = not out["errors"]
        save()
    if out["errors"]:
        print(f"FAILED: {', '.join(out['errors'])}", file=sys.stderr)
    return 0 if out["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
