"""Dataset registry. A builder turns the `dataset` config into `Splits`.

Datasets that fit in memory are held as tensors (`TensorSet`): the engine keeps them on the
training device and takes batches by indexing, with no DataLoader in the hot path. Larger image
datasets are read from disk batch by batch (`StreamSet`). `kdtrain.data.batches.make_batches`
makes the batches of either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from kdtrain.errors import UserError
from kdtrain.registry import Registry

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass
class TensorSet:
    """Inputs x (N, ...) and labels y (N,) int64; -1 marks an unlabelled sample.

    x is float32, already normalised; or, for images, uint8 pixels (N, C, H, W) with the `mean` / `std`
    that normalise them per batch on the training device (a quarter of float32's memory)."""

    x: Tensor
    y: Tensor
    mean: list[float] | None = None  # set when x holds uint8 pixels
    std: list[float] | None = None

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, keep: Tensor) -> TensorSet:
        return TensorSet(self.x[keep], self.y[keep], self.mean, self.std)


class Normalise:
    """uint8 pixels (B, C, H, W) to float32 (x / 255 - mean) / std, on the device the pixels are on
    (the constants are copied there once, not every batch)."""

    def __init__(self, mean: list[float], std: list[float]):
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, -1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        if self.scale.device != x.device:
            self.scale, self.shift = self.scale.to(x.device), self.shift.to(x.device)
        return torch.addcmul(self.shift, x.float(), self.scale)


@dataclass
class StreamSet:
    """Images read from `source` on demand (the stream path; see kdtrain/data/sources.py): sample i is
    source row `rows[i]`, with label `y[i]` (-1 marks an unlabelled sample).

    Each image is decoded as `channels` (1: grayscale, 3: RGB) and transformed to `size` x `size`: the
    training transform (RandomResizedCrop + horizontal flip) when `augment`, else the evaluation one
    (resize to size / 0.875, centre crop); see kdtrain/data/batches.py. `workers` processes read and
    decode (0: the main process); `bad_images` says what an unreadable image does: fail | skip."""

    source: Any  # kdtrain.data.sources.ImageSource
    rows: Tensor  # int64 (N,)
    y: Tensor
    size: int = 32
    channels: int = 3
    mean: list[float] = dataclasses.field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = dataclasses.field(default_factory=lambda: list(IMAGENET_STD))
    augment: bool = False
    workers: int = 0
    bad_images: str = "fail"

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, keep: Tensor) -> StreamSet:
        return dataclasses.replace(self, rows=self.rows[keep], y=self.y[keep])

    def transform(self) -> dict[str, Any]:
        """The settings that decide a sample's pixels besides the image itself (for cache keys)."""
        return {
            "size": self.size,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "augment": self.augment,
        }


DataSet = TensorSet | StreamSet


@dataclass
class Splits:
    train: DataSet  # the student's transfer set (labels hidden by labelled_per_class, classes by exclude_classes)
    teacher_train: DataSet  # labelled training samples of every class: what the teacher learns from
    val: DataSet
    num_classes: int
    in_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    # Random augmentation applied to each training batch on the device (e.g. crop + flip); None: none
    # (a StreamSet augments as it decodes: StreamSet.augment).
    augment: Callable[[Tensor], Tensor] | None = None
    left_out: int = 0  # unreadable images left out when decoding (memory path, dataset.bad_images=skip)
    class_names: list[str] | None = None  # by class index, when the dataset names its classes


def _import_builtin_datasets() -> None:
    from kdtrain.data import digits, hf, imagefolder, imagenet, vision  # noqa: F401  (register themselves)


Builder = Callable[[DictConfig], Splits]
DATASETS: Registry[Builder] = Registry("dataset", _import_builtin_datasets)
register = DATASETS.register


# Dataset keys added with the stream path: at their defaults they are left out of the identities of stored
# teachers, baselines and teacher caches, which so stay what they were before the keys existed.
LOADER_KEYS = ("loader", "memory_budget_gb", "bad_images")
# The same for the keys of dataset=hf (kdtrain/data/hf.py).
HF_KEYS = ("path", "data_files", "train_split", "val_split", "image_column", "label_column")


def data_identity(dataset: dict[str, Any]) -> dict[str, Any]:
    """The dataset config as it decides the samples, for identities: LOADER_KEYS and HF_KEYS at their defaults and
    `workers` (which never changes a sample) left out."""
    from kdtrain.config import DatasetConfig

    default = DatasetConfig()
    return {
        k: v
        for k, v in dataset.items()
        if k != "workers" and not (k in LOADER_KEYS + HF_KEYS and v == getattr(default, k))
    }


def known_datasets() -> list[str]:
    return DATASETS.names()


def build_dataset(cfg: DictConfig) -> Splits:
    return DATASETS.get(cfg.name, "dataset")(cfg)


def make_transfer_set(train: DataSet, num_classes: int, cfg: DictConfig) -> tuple[DataSet, DataSet]:
    """Apply `labelled_per_class` and `exclude_classes` to a labelled training set.

    Returns (student transfer set, teacher training set). The teacher learns from the labelled
    samples only (it gets no labels the student lacks) but from every class: hiding classes is
    a property of the student's data (Hinton et al. 2015's "no 3s in the transfer set").
    """
    y = train.y
    excluded = [int(c) for c in cfg.exclude_classes]
    bad = [c for c in excluded if not 0 <= c < num_classes]
    if bad:
        raise UserError(
            f"dataset.exclude_classes holds {bad[0]}, not a class of {cfg.name}; classes are 0..{num_classes - 1}"
        )
    if len(excluded) >= num_classes:
        raise UserError("dataset.exclude_classes hides every class; leave at least one")
    labelled = torch.ones(len(y), dtype=torch.bool)
    if cfg.labelled_per_class is not None:
        labelled = torch.zeros(len(y), dtype=torch.bool)
        gen = torch.Generator().manual_seed(int(cfg.split_seed))
        for c in range(num_classes):
            idx = torch.nonzero(y == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)][: int(cfg.labelled_per_class)]
            labelled[idx] = True
    student_y = torch.where(labelled, y, torch.full_like(y, -1))
    student = dataclasses.replace(train, y=student_y)
    if excluded:
        student = student.subset(~torch.isin(y, torch.tensor(excluded)))
    return student, train if bool(labelled.all()) else train.subset(labelled)  # no copy of a fully labelled set


# Cheap (num_classes, in_shape) of a dataset config, without reading its samples (for kdtrain-inspect).
ShapeFn = Callable[[DictConfig], tuple[int, tuple[int, int, int]]]
DATASET_SHAPES: Registry[ShapeFn] = Registry("dataset shape", _import_builtin_datasets)
register_shape = DATASET_SHAPES.register


def dataset_shape(cfg: DictConfig) -> tuple[int, tuple[int, int, int]]:
    """(num_classes, in_shape) of the dataset `cfg` names; a dataset without a shape function is built."""
    if cfg.name in DATASET_SHAPES:
        return DATASET_SHAPES.get(cfg.name, "dataset")(cfg)
    splits = build_dataset(cfg)
    return splits.num_classes, splits.in_shape
