"""Tiny datasets written in the real on-disk formats (IDX, CIFAR python pickles, ImageFolder PNGs)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

MNIST_TRAIN, MNIST_TEST = 24, 10
CIFAR_PER_BATCH, CIFAR_TEST = 4, 8


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """An IDX file of unsigned bytes: magic 0x08 0x<ndim>, big-endian dims, then the data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(blob))
    else:
        path.write_bytes(blob)


def write_mnist(root: Path, folder: str, seed: int, gz: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (MNIST_TRAIN, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(MNIST_TRAIN, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (MNIST_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(MNIST_TEST, dtype=np.uint8) % 10,
    }
    for name, array in arrays.items():
        write_idx(root / folder / "raw" / name, array, gz=gz)
    return arrays


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the protocol of the published python-version files


def write_cifar10(root: Path, seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = CIFAR_TEST if name == "test_batch" else CIFAR_PER_BATCH
        batch = {
            "batch_label": f"{name} of 5",
            "labels": [int(v) for v in rng.integers(0, 10, n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{i}.png" for i in range(n)],
        }
        _pickle(folder / name, batch)
        batches[name] = batch
    _pickle(
        folder / "batches.meta",
        {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072, "num_cases_per_batch": 4},
    )
    return batches


def write_cifar100(root: Path, seed: int = 1) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    batches = {}
    for name, n in (("train", 30), ("test", 12)):
        batch = {
            "batch_label": name,
            "fine_labels": [int(v) for v in rng.integers(0, 100, n)],
            "coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"img_{i}.png" for i in range(n)],
        }
        _pickle(folder / name, batch)
        batches[name] = batch
    _pickle(
        folder / "meta",
        {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]},
    )
    return batches


def write_imagefolder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "fox"),
    mode: str = "RGB",
    per_class: tuple[int, int] = (4, 2),
    size: tuple[int, int] = (40, 30),
) -> None:
    """root/train/<class>/*.png and root/val/<class>/*.png, random pixels, in PIL mode RGB or L."""
    rng = np.random.default_rng(0)
    channels = 3 if mode == "RGB" else 1
    for split, n in zip(("train", "val"), per_class):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
                Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(folder / f"{i}.png")


IMAGENET_WNIDS = ("n01440764", "n01443537", "n01484850")


def write_imagenet(root: Path, per_class: tuple[int, int] = (3, 2), flat_val: bool = False) -> None:
    """ILSVRC2012's layout: root/train/<wnid>/<wnid>_<n>.JPEG and root/val/<wnid>/ILSVRC2012_val_<n>.JPEG
    (sorted into class folders; `flat_val`: all in val/ as the archive comes), random RGB pixels."""
    rng = np.random.default_rng(0)
    count = 0
    for split, n in zip(("train", "val"), per_class):
        for wnid in IMAGENET_WNIDS:
            for i in range(n):
                count += 1
                name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{count:08d}.JPEG"
                folder = root / split if split == "val" and flat_val else root / split / wnid
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / name, quality=90)
