"""Images in folders: `dataset.root` holds `train/` and `val/`, each with one subfolder per class
(torchvision's ImageFolder layout; the classes are the subfolders of `train/`, sorted by name).

* Every image is read with PIL (no code runs from a file) and scaled so its shorter side is
  `dataset.image_size` (32 when null), then centre-cropped to a square.
* Channels are inferred: 1 when every image of train/ and val/ is grayscale (PIL mode "L" or "1"),
  3 otherwise (grayscale images then become RGB with equal channels). Normalisation: ImageNet's
  mean / std for 3 channels, 0.5 / 0.5 for 1.
* A file with an image extension that PIL cannot read (corrupt, truncated, not an image) stops the
  run with an error naming it: skipping it would silently change the dataset. Files with other
  extensions are ignored.
* An empty train/ or val/, a train/ class folder without images, or a val/ class that train/
  lacks is an error.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from kdtrain.data import Splits, register, register_shape
from kdtrain.data.common import _channels, dataset_root, image_size, splits_from_sources
from kdtrain.data.sources import FileSource
from kdtrain.errors import UserError

HOLDS = "train/ and val/ with one subfolder of images per class"


def image_extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS


def split_dir(cfg: DictConfig, split: str, holds: str = HOLDS) -> Path:
    """dataset.root/split, which must exist; `holds` says what dataset.root must hold (for the messages)."""
    root = dataset_root(cfg, holds)
    folder = root / split
    if not root.is_dir():
        raise UserError(f"dataset.root={root} does not exist; set dataset.root to a folder that holds {holds}")
    if not folder.is_dir():
        raise UserError(f"dataset={cfg.name} needs {folder}: dataset.root must hold {holds}")
    return folder


def classes_of(train_dir: Path) -> list[str]:
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{train_dir} has no class subfolders; put each class's images in train/<class>/")
    if len(classes) < 2:  # one class: every prediction is right, nothing is learned
        raise UserError(
            f"{train_dir} has one class subfolder ({classes[0]}); classification needs at least 2: put each "
            "class's images in train/<class>/"
        )
    return classes


def _files(split_dir: Path, classes: list[str], require_each: bool) -> list[tuple[Path, int]]:
    """(image path, class index) for every image file under split_dir/<class>/, in a fixed order."""
    extensions = image_extensions()
    index = {c: i for i, c in enumerate(classes)}
    out: list[tuple[Path, int]] = []
    for folder in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name not in index:
            raise UserError(
                f"{folder} is a class that {split_dir.parent / 'train'} lacks; every val/ class needs a train/ "
                "folder of the same name"
            )
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(extensions))
        if require_each and not files:
            raise UserError(
                f"{folder} holds no images ({', '.join(extensions[:4])}, ...); add some or remove the folder"
            )
        out += [(p, index[folder.name]) for p in files]
    if not out:
        raise UserError(f"{split_dir} holds no images; put each class's images in {split_dir.name}/<class>/")
    return out


@register("imagefolder")
def imagefolder(cfg: DictConfig) -> Splits:
    train_dir, val_dir = split_dir(cfg, "train"), split_dir(cfg, "val")
    classes = classes_of(train_dir)
    train, val = (folder_source(d, classes, require_each) for d, require_each in ((train_dir, True), (val_dir, False)))
    return splits_from_sources(cfg, train, val, len(classes), default_size=32)


def folder_source(split_dir: Path, classes: list[str], require_each: bool) -> FileSource:
    """The images of split_dir/<class>/ as a source (class index = position in `classes`)."""
    files = _files(split_dir, classes, require_each)
    return FileSource([p for p, _ in files], [c for _, c in files])


@register_shape("imagefolder")
def _imagefolder_shape(cfg: DictConfig) -> tuple[int, tuple[int, int, int]]:
    return folder_shape(cfg, split_dir(cfg, "train"), split_dir(cfg, "val"), default_size=32)


def folder_shape(
    cfg: DictConfig, train_dir: Path, val_dir: Path, default_size: int
) -> tuple[int, tuple[int, int, int]]:
    """Classes from train/'s subfolders; channels from the image headers (no pixels decoded; headers are
    read up to the first colour image)."""
    classes = classes_of(train_dir)
    train, val = (folder_source(d, classes, require_each=False) for d in (train_dir, val_dir))
    channels = _channels(train, val, skip=cfg.get("bad_images", "fail") == "skip")
    size = image_size(cfg, default_size)
    return len(classes), (channels, size, size)
