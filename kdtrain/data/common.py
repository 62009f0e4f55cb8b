"""Shared steps of the image datasets: where the files are, uint8 images to normalised tensors, `Splits`
(from tensors, or from image sources: kdtrain/data/sources.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from kdtrain.data import IMAGENET_MEAN, IMAGENET_STD, Splits, StreamSet, TensorSet, make_transfer_set
from kdtrain.data.augment import make_augment
from kdtrain.data.batches import Decode, loader
from kdtrain.data.sources import GRAY_MODES, BadImage, ImageSource
from kdtrain.errors import UserError

log = logging.getLogger("kdtrain")

CHUNK = 4096  # images resized at a time, so a resize never holds a float copy of the dataset
DECODE_BATCH = 64  # images a decoding worker hands back at a time (memory path)


def dataset_root(cfg: DictConfig, holds: str) -> Path:
    """`dataset.root` as a Path; `holds` says what the folder must contain (for the error message)."""
    if cfg.root is None:
        raise UserError(f"dataset={cfg.name} reads files: set dataset.root=PATH, the folder that holds {holds}")
    return Path(str(cfg.root)).expanduser()


def image_size(cfg: DictConfig, default: int) -> int:
    """`dataset.image_size`, or the dataset's own size when it is null."""
    if cfg.image_size is None:
        return default
    if cfg.image_size < 1:
        raise UserError(f"dataset.image_size={cfg.image_size} is out of range: give a size in pixels >= 1, or null")
    return int(cfg.image_size)


def to_pixels(x: Tensor, size: int) -> Tensor:
    """uint8 images (N, C, H, W) resized to size x size when they differ (bilinear, antialiased, rounded back
    to uint8), else as they are."""
    if x.shape[-2:] == (size, size):
        return x
    out = torch.empty((*x.shape[:2], size, size), dtype=torch.uint8)
    for i in range(0, len(x), CHUNK):
        chunk = F.interpolate(
            x[i : i + CHUNK].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        out[i : i + CHUNK] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def check_labels(y: Tensor, num_classes: int, where: str) -> None:
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise UserError(
            f"{where} holds label {int(y.min()) if int(y.min()) < 0 else int(y.max())}, outside "
            f"0..{num_classes - 1}; the file is corrupt: replace it"
        )


def make_splits(
    cfg: DictConfig,
    train: TensorSet,
    val: TensorSet,
    num_classes: int,
    mean: list[float],
    std: list[float],
    pad: int,
    flip: bool,
) -> Splits:
    """Splits from normalised train / val sets; `pad` and `flip` say how `dataset.augment=true` augments."""
    student, teacher = make_transfer_set(train, num_classes, cfg)
    augment = make_augment(mean, std, pad, flip) if cfg.augment else None
    return Splits(
        train=student,
        teacher_train=teacher,
        val=val,
        num_classes=num_classes,
        in_shape=tuple(train.x.shape[1:]),
        mean=list(mean),
        std=list(std),
        augment=augment,
    )


def splits_from_sources(
    cfg: DictConfig, train: ImageSource, val: ImageSource, num_classes: int, default_size: int
) -> Splits:
    """Splits of images read from sources, on the memory or the stream path (`dataset.loader`; see
    kdtrain/data/batches.py). Channels: 1 when every image is grayscale, else 3 (grayscale images become RGB
    with equal channels); ImageNet's mean / std for 3 channels, 0.5 / 0.5 for 1.

    Memory path: each image scaled so its shorter side is `dataset.image_size` (`default_size` when null),
    centre-cropped, and kept as uint8 (decoded once, by `dataset.workers` processes); `dataset.augment`: the
    on-device random crop (4-pixel padding) + flip. Stream path: the transforms of StreamSet. An unreadable
    image stops the run with its name (`dataset.bad_images=fail`), or is left out (skip)."""
    size = image_size(cfg, default_size)
    workers = decode_workers(cfg)
    skip = cfg.get("bad_images", "fail") == "skip"  # .get: a dataset config written before these keys
    channels = _channels(train, val, skip)
    mean, std = ([0.5], [0.5]) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    if not _use_memory(cfg, (len(train) + len(val)) * channels * size * size):
        kw = {"size": size, "channels": channels, "mean": mean, "std": std, "workers": workers}
        kw["bad_images"] = "skip" if skip else "fail"
        train_set = StreamSet(train, torch.arange(len(train)), train.labels, augment=bool(cfg.augment), **kw)
        val_set = StreamSet(val, torch.arange(len(val)), val.labels, **kw)
        student, teacher = make_transfer_set(train_set, num_classes, cfg)
        return Splits(student, teacher, val_set, num_classes, (channels, size, size), list(mean), list(std))
    train_set, val_set = (_decode_all(source, size, channels, mean, std, workers, skip) for source in (train, val))
    splits = make_splits(cfg, train_set, val_set, num_classes, mean, std, pad=4, flip=True)
    splits.left_out = len(train) + len(val) - len(train_set) - len(val_set)
    return splits


def decode_workers(cfg: DictConfig) -> int:
    """`dataset.workers`, or (null) this process's share of the machine's cores: the ranks of a torchrun
    machine split them."""
    workers = cfg.get("workers")
    if workers is not None:
        return int(workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _use_memory(cfg: DictConfig, nbytes: int) -> bool:
    """loader=memory|stream as chosen; auto: memory when the uint8 pixels fit dataset.memory_budget_gb (logged)."""
    loader = cfg.get("loader", "memory")
    if loader != "auto":
        log.info("data: the %s path (dataset.loader=%s)", loader, loader)
        return loader == "memory"
    budget = float(cfg.memory_budget_gb)
    memory = nbytes <= budget * 1e9
    log.info(
        "data: the %s path (dataset.loader=auto): train + val take %.2f GB as uint8 pixels, %s "
        "dataset.memory_budget_gb=%g",
        "memory" if memory else "stream",
        nbytes / 1e9,
        "within" if memory else "over",
        budget,
    )
    return memory


def _channels(train: ImageSource, val: ImageSource, skip: bool) -> int:
    """1 when every image is grayscale, else 3: the images (their headers, when the source can read them
    alone: FileSource.mode) are looked at until the first colour one."""
    for source in (train, val):
        peek = getattr(source, "mode", None) or (lambda i, source=source: source.read(i).mode)
        for i in range(len(source)):
            try:
                if peek(i) not in GRAY_MODES:
                    return 3
            except BadImage as e:
                if not skip:
                    raise UserError(f"{e}; {FIX_BAD}") from None
    return 1


FIX_BAD = "replace or delete it, or set dataset.bad_images=skip to train on without it"


def _decode_all(
    source: ImageSource, size: int, channels: int, mean: list[float], std: list[float], workers: int, skip: bool
) -> TensorSet:
    """Every image of `source` as uint8 (N, C, size, size), decoded by `workers` processes; with `skip`
    the unreadable ones are left out (each logged)."""
    n = len(source)
    x = torch.empty((n, channels, size, size), dtype=torch.uint8)
    ok = torch.ones(n, dtype=torch.bool)
    plan = [[(i, 0) for i in range(start, min(start + DECODE_BATCH, n))] for start in range(0, n, DECODE_BATCH)]
    decode = Decode(source, torch.arange(n), size, channels, "square")
    for images, idx, bad in loader(decode, plan, min(workers, len(plan)), torch.device("cpu"), persistent=False):
        x[idx] = images
        for i, message in zip(idx.tolist(), bad):
            if message and not skip:
                raise UserError(f"{message}; {FIX_BAD}")
            if message:
                ok[i] = False
                log.warning("bad_images=skip: %s; it is left out", message)
    if not ok.all():
        log.warning("bad_images=skip: %d of %d images cannot be read and are left out", int((~ok).sum()), n)
        if not ok.any():
            raise UserError("no image of the dataset can be read; check its files")
        return TensorSet(x[ok], source.labels[ok], list(mean), list(std))
    return TensorSet(x, source.labels, list(mean), list(std))
