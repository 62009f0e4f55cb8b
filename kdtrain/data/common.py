"""Shared steps of the image datasets: where the files are, uint8 images to normalised tensors, `Splits`
(from tensors, or from image sources: kdtrain/data/sources.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor

from kdtrain.data import Splits, TensorSet, make_transfer_set
from kdtrain.data.augment import make_augment
from kdtrain.data.sources import BadImage, ImageSource, is_gray
from kdtrain.errors import UserError

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

CHUNK = 4096  # images converted at a time, so a resize never holds a second float copy of the dataset


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


def to_normalised(x: Tensor, size: int, mean: list[float], std: list[float]) -> Tensor:
    """uint8 images (N, C, H, W) to float32 in [0, 1], resized to size x size when they differ, then normalised."""
    n, c = x.shape[:2]
    out = torch.empty((n, c, size, size), dtype=torch.float32)
    m = torch.tensor(mean).view(1, c, 1, 1)
    s = torch.tensor(std).view(1, c, 1, 1)
    for i in range(0, n, CHUNK):
        chunk = x[i : i + CHUNK].float().div_(255.0)
        if chunk.shape[-2:] != (size, size):
            chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[i : i + CHUNK] = (chunk - m) / s
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
    """Splits of images read from sources: each image scaled so its shorter side is `dataset.image_size`
    (`default_size` when null), then centre-cropped to a square. Channels: 1 when every image is grayscale,
    else 3 (grayscale images become RGB with equal channels); ImageNet's mean / std for 3 channels, 0.5 / 0.5
    for 1. An image that cannot be read stops the run with its name."""
    size = image_size(cfg, default_size)
    loaded = [[_square(source, i, size) for i in range(len(source))] for source in (train, val)]
    channels = 1 if all(gray for images in loaded for _, gray in images) else 3
    mean, std = ([0.5], [0.5]) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    train_set, val_set = (
        TensorSet(to_normalised(_stack([a for a, _ in images], channels), size, mean, std), source.labels)
        for images, source in zip(loaded, (train, val))
    )
    return make_splits(cfg, train_set, val_set, num_classes, mean, std, pad=4, flip=True)


def _square(source: ImageSource, i: int, size: int) -> tuple[np.ndarray, bool]:
    """(uint8 array (size, size) for grayscale or (size, size, 3), is grayscale) of image i."""
    try:
        img = source.read(i)
    except BadImage as e:
        raise UserError(f"{e}; replace or delete it") from None
    gray = is_gray(img)
    img = img.convert("L" if gray else "RGB")
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8), gray


def _stack(arrays: list[np.ndarray], channels: int) -> Tensor:
    """uint8 (N, C, H, W) from per-image arrays; grayscale ones repeated when channels == 3."""
    out = np.empty((len(arrays), channels, *arrays[0].shape[:2]), dtype=np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # a (H, W) broadcasts over 3 channels
    return torch.from_numpy(out)
