"""Shared steps of the image datasets: where the files are, uint8 images to normalised tensors, `Splits`."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from kdtrain.data import Splits, TensorSet, make_transfer_set
from kdtrain.data.augment import make_augment
from kdtrain.errors import UserError

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
