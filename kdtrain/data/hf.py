"""Any Hugging Face dataset of images through `datasets.load_dataset` (`pip install 'kdtrain[hf]'`).

* `dataset.path` is load_dataset's first argument: a hub name (`ethz/food101`, downloaded once into the
  Hugging Face cache), a local folder of data files (an image folder, parquet files), or a builder name
  (`parquet`, `imagefolder`, ...) with `dataset.data_files`. The key is `path`, as load_dataset calls it,
  because `dataset.name` already picks this builder (`hf`).
* `dataset.train_split` and `dataset.val_split` name the two splits; `dataset.image_column` holds the
  images (an Image feature, encoded bytes, or file paths), `dataset.label_column` the labels: a ClassLabel
  (its names become the class names), integers 0..C-1, or strings (the classes are the sorted strings of
  the training split).
* Offline (`offline=true`, HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1) nothing touches the network: a hub
  dataset comes from the cache, or the run stops saying so.
* Images are decoded by PIL (no code runs from the data); an unreadable one raises BadImage with its
  split and row. Everything else is imagefolder's (kdtrain/data/common.py): the memory or the stream path
  and their transforms at `dataset.image_size` (224 when null), 1 channel when every image is grayscale.
"""

from __future__ import annotations

import io
import os
from contextlib import ExitStack
from typing import Any
from unittest import mock

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from kdtrain.data import Splits, register, register_shape
from kdtrain.data.common import _channels, image_size, splits_from_sources
from kdtrain.data.sources import READ_ERRORS, BadImage
from kdtrain.errors import UserError
from kdtrain.models.hub import is_offline

DEFAULT_SIZE = 224


class HFSource:
    """The images of one split of a Hugging Face dataset (a `datasets.Dataset`), by row."""

    def __init__(self, ds: Any, image_column: str, labels: list[int], where: str):
        import datasets

        if isinstance(ds.features[image_column], datasets.Image):  # encoded bytes / paths: PIL decodes them here
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds, self.column, self.where = ds.select_columns([image_column]), image_column, where
        self.labels = torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, i: int) -> Image.Image:
        try:
            with Image.open(self._file(i)) as img:
                img.load()
                return img
        except READ_ERRORS as e:
            raise BadImage(self.name(i), str(e).strip() or type(e).__name__) from None

    def mode(self, i: int) -> str:
        """Image i's PIL mode, from its header alone (no pixels decoded; used to infer the channels)."""
        try:
            with Image.open(self._file(i)) as img:
                return img.mode
        except READ_ERRORS as e:
            raise BadImage(self.name(i), str(e).strip() or type(e).__name__) from None

    def _file(self, i: int) -> io.BytesIO | str:
        """Row i's encoded image: its bytes, or the path of its file."""
        value = self.ds[i][self.column]
        if isinstance(value, dict):  # an Image feature's {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return io.BytesIO(value)
        if isinstance(value, str):
            return value
        raise BadImage(self.name(i), f"the column holds {type(value).__name__}, not an image, bytes or a path")

    def name(self, i: int) -> str:
        return f"{self.where} row {i}"

    def fingerprint(self) -> dict[str, Any]:
        """The `datasets` fingerprint of the split (it changes when its data files or processing change)."""
        return {"hf": self.where, "rows": len(self.ds), "fingerprint": self.ds._fingerprint}


def _load(cfg: DictConfig, split: str) -> Any:
    """One split of the dataset, loaded (or read from the Hugging Face cache) with load_dataset."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            "dataset=hf needs the datasets package: pip install 'kdtrain[hf]' (or pip install datasets)"
        ) from None
    if not cfg.path:
        raise UserError(
            "dataset=hf needs dataset.path: a Hugging Face dataset name (ethz/food101), a local folder of data "
            "files, or a builder such as parquet with dataset.data_files=..."
        )
    data_files = OmegaConf.to_container(cfg.data_files) if OmegaConf.is_config(cfg.data_files) else cfg.data_files
    offline = is_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    with ExitStack() as stack:
        # datasets pings the Hub's usage counter when it reads local files with a builder (parquet, imagefolder):
        # kdtrain makes no network request that loading does not need.
        stack.enter_context(mock.patch.object(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False))
        if offline:  # both libraries read their offline flag at import; patching covers offline=true
            import huggingface_hub.constants

            stack.enter_context(mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True))
            stack.enter_context(mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True))
        try:
            ds = datasets.load_dataset(str(cfg.path), data_files=data_files, split=split)
        except Exception as e:  # load_dataset raises many types (missing files, unknown splits, network)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            hint = " (offline: only datasets already in the Hugging Face cache load)" if offline else ""
            raise UserError(
                f"dataset.path={cfg.path} split {split!r} could not be loaded{hint}: {type(e).__name__}: {first}; "
                "check dataset.path, dataset.data_files and the split names (dataset.train_split, dataset.val_split)"
            ) from None
    for key, column in (("image_column", cfg.image_column), ("label_column", cfg.label_column)):
        if column not in ds.column_names:
            raise UserError(
                f"dataset.{key}={column} is not a column of {cfg.path} split {split!r}; its columns are "
                f"{', '.join(ds.column_names)}: set dataset.{key}"
            )
    return ds


def _labels(cfg: DictConfig, train: Any, val: Any) -> tuple[list[int], list[int], int, list[str] | None]:
    """(train labels, val labels, number of classes, class names or None) from the label column."""
    import datasets

    feature = train.features[cfg.label_column]
    raw = [ds.data.column(cfg.label_column).to_pylist() for ds in (train, val)]
    names = None
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        labels = raw
    elif all(isinstance(v, str) for v in raw[0]):  # strings: the classes are those of the training split
        names = sorted(set(raw[0]))
        index = {n: i for i, n in enumerate(names)}
        unknown = next((v for v in raw[1] if v not in index), None)
        if unknown is not None:
            raise UserError(
                f"{cfg.path} split {cfg.val_split!r} has the label {unknown!r}, which split {cfg.train_split!r} "
                "lacks; every validation class needs training samples"
            )
        labels = [[index[v] for v in split] for split in raw]
    elif all(isinstance(v, int) and not isinstance(v, bool) for split in raw for v in split):
        labels = raw
    else:
        raise UserError(
            f"dataset.label_column={cfg.label_column} of {cfg.path} holds {feature}, not class labels (a ClassLabel, "
            "integers or strings): choose the label column with dataset.label_column"
        )
    num_classes = len(names) if names is not None else max(labels[0], default=-1) + 1
    for split, values in zip((cfg.train_split, cfg.val_split), labels):
        bad = next((v for v in values if not 0 <= v < num_classes), None)
        if bad is not None:
            raise UserError(
                f"{cfg.path} split {split!r} has the label {bad}, outside the classes 0..{num_classes - 1} "
                f"{'of its ClassLabel' if names else 'of the training split'} (-1: an unlabelled split); use "
                "labelled splits"
            )
    if num_classes < 2:
        raise UserError(f"{cfg.path} split {cfg.train_split!r} has {num_classes} class; classification needs 2")
    return labels[0], labels[1], num_classes, names


def _sources(cfg: DictConfig) -> tuple[HFSource, HFSource, int, list[str] | None]:
    train, val = _load(cfg, str(cfg.train_split)), _load(cfg, str(cfg.val_split))
    train_y, val_y, num_classes, names = _labels(cfg, train, val)
    column = str(cfg.image_column)
    return (
        HFSource(train, column, train_y, f"{cfg.path} {cfg.train_split}"),
        HFSource(val, column, val_y, f"{cfg.path} {cfg.val_split}"),
        num_classes,
        names,
    )


@register("hf")
def hf(cfg: DictConfig) -> Splits:
    train, val, num_classes, names = _sources(cfg)
    splits = splits_from_sources(cfg, train, val, num_classes, default_size=DEFAULT_SIZE)
    splits.class_names = names
    return splits


@register_shape("hf")
def _hf_shape(cfg: DictConfig) -> tuple[int, tuple[int, int, int]]:
    """Classes from the labels; channels from the images' headers, read up to the first colour image."""
    train, val, num_classes, _ = _sources(cfg)
    channels = _channels(train, val, skip=cfg.get("bad_images", "fail") == "skip")
    size = image_size(cfg, DEFAULT_SIZE)
    return num_classes, (channels, size, size)
