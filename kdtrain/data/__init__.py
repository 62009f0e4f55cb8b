"""Dataset registry. A builder turns the `dataset` config into `Splits`.

Datasets that fit in memory are held as tensors (`TensorSet`): the engine keeps them on the
training device and takes batches by indexing, with no DataLoader in the hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from kdtrain.errors import UserError
from kdtrain.registry import Registry


@dataclass
class TensorSet:
    """Inputs (N, C, H, W) float32, already normalised, and labels (N,) int64; -1 marks an unlabelled sample."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, keep: Tensor) -> TensorSet:
        return TensorSet(self.x[keep], self.y[keep])


@dataclass
class StreamSet:
    """Images read from `source` on demand (the stream path; see kdtrain/data/sources.py): sample i is
    source row `rows[i]`, with label `y[i]` (-1 marks an unlabelled sample)."""

    source: Any  # kdtrain.data.sources.ImageSource
    rows: Tensor  # int64 (N,)
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, keep: Tensor) -> StreamSet:
        return StreamSet(self.source, self.rows[keep], self.y[keep])


@dataclass
class Splits:
    train: TensorSet  # the student's transfer set (labels hidden by labelled_per_class, classes by exclude_classes)
    teacher_train: TensorSet  # labelled training samples of every class: what the teacher learns from
    val: TensorSet
    num_classes: int
    in_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    # Random augmentation applied to each training batch on the device (e.g. crop + flip); None: none.
    augment: Callable[[Tensor], Tensor] | None = None
    class_names: list[str] | None = None  # by class index, when the dataset names its classes


# Dataset keys added after teachers and baselines were first stored (dataset=hf's): left out of the store keys
# while at their defaults, so the teachers and baselines stored before are still found.
LATER_KEYS = ("path", "data_files", "train_split", "val_split", "image_column", "label_column")


def data_identity(cfg: DictConfig, leave_out: set[str]) -> dict[str, Any]:
    """The dataset config `cfg` as plain data for a store key: without `leave_out`, nor the later keys at their
    defaults."""
    from kdtrain.config import DatasetConfig

    defaults = OmegaConf.structured(DatasetConfig)
    data = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in data.items() if k not in leave_out and not (k in LATER_KEYS and v == defaults[k])}


def _import_builtin_datasets() -> None:
    from kdtrain.data import digits, hf, imagefolder, imagenet, vision  # noqa: F401  (register themselves)


Builder = Callable[[DictConfig], Splits]
DATASETS: Registry[Builder] = Registry("dataset", _import_builtin_datasets)
register = DATASETS.register


def known_datasets() -> list[str]:
    return DATASETS.names()


def build_dataset(cfg: DictConfig) -> Splits:
    return DATASETS.get(cfg.name, "dataset")(cfg)


def make_transfer_set(train: TensorSet, num_classes: int, cfg: DictConfig) -> tuple[TensorSet, TensorSet]:
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
    student = TensorSet(train.x, student_y)
    if excluded:
        student = student.subset(~torch.isin(y, torch.tensor(excluded)))
    return student, train.subset(labelled)


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
