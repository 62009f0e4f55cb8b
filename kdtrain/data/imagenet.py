"""ILSVRC2012 (ImageNet-1k) from its folders: `dataset.root` holds train/<wnid>/*.JPEG and val/<wnid>/*.JPEG.

* The layout of torchvision's reference scripts: the validation images sorted into one folder per class,
  like train/. ImageNet's val/ comes flat (50,000 files, labels in a separate file); a flat val/ is an
  error that says how to sort it.
* Classes: the subfolders of train/ (the WordNet ids, sorted: index 0 is n01440764, as in torchvision).
  Their readable names come from LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca" per line) when
  dataset.root holds it; they are the class names of the run's outputs (kdtrain-predict's `class` column).
* Everything else is imagefolder's (kdtrain/data/imagefolder.py): the listing and its errors, image size
  (224 when null), channels and normalisation (ImageNet's mean / std).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from kdtrain.data import Splits, register, register_shape
from kdtrain.data.common import splits_from_sources
from kdtrain.data.imagefolder import classes_of, folder_shape, folder_source, image_extensions, split_dir
from kdtrain.errors import UserError

HOLDS = "ILSVRC2012's train/<wnid>/*.JPEG and val/<wnid>/*.JPEG (val sorted into class folders)"
SYNSETS = "LOC_synset_mapping.txt"
DEFAULT_SIZE = 224


def _dirs(cfg: DictConfig) -> tuple[Path, Path]:
    train_dir, val_dir = split_dir(cfg, "train", HOLDS), split_dir(cfg, "val", HOLDS)
    extensions = image_extensions()
    flat = [p for p in val_dir.iterdir() if p.is_file() and p.name.lower().endswith(extensions)]
    if flat and not any(p.is_dir() for p in val_dir.iterdir()):
        raise UserError(
            f"{val_dir} holds its {len(flat)} images directly ({flat[0].name}, ...), not in class folders: sort them "
            "into val/<wnid>/ as torchvision's reference scripts expect, e.g. with valprep.sh from "
            "github.com/soumith/imagenetloader.torch, or by the labels of LOC_val_solution.csv"
        )
    return train_dir, val_dir


def readable_names(root: Path, wnids: list[str]) -> list[str]:
    """The names of `wnids` from root/LOC_synset_mapping.txt ("tench, Tinca tinca"); the wnids themselves
    when the file is absent, and a wnid the file lacks keeps its id."""
    path = root / SYNSETS
    if not path.is_file():
        return list(wnids)
    names: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            raise UserError(
                f"{path} line {number} is not '<wnid> <name>' ({line.strip()!r}); fix or delete the file "
                "(it is optional: without it the classes are named by their folders)"
            )
        names[parts[0]] = parts[1]
    return [names.get(w, w) for w in wnids]


@register("imagenet")
def imagenet(cfg: DictConfig) -> Splits:
    train_dir, val_dir = _dirs(cfg)
    classes = classes_of(train_dir)
    train, val = folder_source(train_dir, classes, True), folder_source(val_dir, classes, False)
    splits = splits_from_sources(cfg, train, val, len(classes), default_size=DEFAULT_SIZE)
    splits.class_names = readable_names(train_dir.parent, classes)
    return splits


@register_shape("imagenet")
def _imagenet_shape(cfg: DictConfig) -> tuple[int, tuple[int, int, int]]:
    return folder_shape(cfg, *_dirs(cfg), default_size=DEFAULT_SIZE)
