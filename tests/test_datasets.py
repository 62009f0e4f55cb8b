"""Datasets read from small files written in their real on-disk formats, the device-side augmentation,
and a one-epoch distillation through the CLI on each dataset."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from kdtrain.config import DatasetConfig
from kdtrain.data import build_dataset, dataset_shape, known_datasets
from kdtrain.data.augment import crop_flip, make_augment
from kdtrain.data.batches import make_batches
from kdtrain.errors import UserError
from tests._dataset_files import (
    CIFAR_PER_BATCH,
    CIFAR_TEST,
    MNIST_TEST,
    MNIST_TRAIN,
    write_cifar10,
    write_cifar100,
    write_imagefolder,
    write_mnist,
)

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ["mnist", "fashion_mnist", "cifar10", "cifar100", "imagefolder", "fake"]


def inputs(data) -> torch.Tensor:
    """Every sample of `data` as the model gets it (one batch on the CPU, in order)."""
    return next(make_batches(data, len(data), torch.device("cpu"), shuffle=False).epoch())[0]


def dcfg(name: str, root: Path | None = None, **kw) -> DictConfig:
    """A typed dataset config as the CLI composes it (conf/dataset/<name>.yaml), with overrides."""
    cfg = OmegaConf.merge(
        OmegaConf.structured(DatasetConfig), OmegaConf.load(ROOT / "conf" / "dataset" / f"{name}.yaml")
    )
    cfg.root = None if root is None else str(root)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """One folder holding every dataset's files, as `dataset.root` would (fashion-MNIST only as .gz)."""
    root = tmp_path_factory.mktemp("data")
    write_mnist(root, "MNIST", seed=0)
    write_mnist(root, "FashionMNIST", seed=1, gz=True)
    write_cifar10(root)
    write_cifar100(root)
    write_imagefolder(root)
    return root


def test_every_dataset_registered() -> None:
    assert set(DATASETS) <= set(known_datasets())
    for name in DATASETS:
        cfg = OmegaConf.load(ROOT / "conf" / "dataset" / f"{name}.yaml")
        assert cfg.name == name
        assert set(cfg) <= set(OmegaConf.structured(DatasetConfig))


@pytest.mark.parametrize(
    ("name", "folder", "mean", "std"),
    [
        ("mnist", "MNIST", 0.1307, 0.3081),
        ("fashion_mnist", "FashionMNIST", 0.2860, 0.3530),
    ],
)
def test_mnist_like(data_root: Path, name: str, folder: str, mean: float, std: float) -> None:
    splits = build_dataset(dcfg(name, data_root, augment=True))
    assert splits.train.x.shape == (MNIST_TRAIN, 1, 28, 28) and splits.train.x.dtype == torch.uint8  # 1 byte a pixel
    assert splits.val.x.shape == (MNIST_TEST, 1, 28, 28)  # the official test split
    assert splits.num_classes == 10 and splits.in_shape == (1, 28, 28)
    assert splits.mean == [mean] and splits.std == [std]
    assert splits.train.y.tolist() == [i % 10 for i in range(MNIST_TRAIN)]
    raw = (data_root / folder / "raw" / "train-images-idx3-ubyte").read_bytes()
    first_pixel = raw[16]  # after the IDX header: magic + 3 dims
    assert splits.train.x[0, 0, 0, 0].item() == first_pixel
    x = inputs(splits.train)  # normalised per batch, as float32
    assert x.dtype == torch.float32 and x[0, 0, 0, 0].item() == pytest.approx(
        (first_pixel / 255 - mean) / std, abs=1e-5
    )
    assert splits.augment is not None
    assert dataset_shape(dcfg(name, data_root)) == (10, (1, 28, 28))


def test_mnist_resized(data_root: Path) -> None:
    splits = build_dataset(dcfg("mnist", data_root, image_size=32))
    assert splits.in_shape == (1, 32, 32) and splits.val.x.shape[1:] == (1, 32, 32)
    assert dataset_shape(dcfg("mnist", data_root, image_size=32)) == (10, (1, 32, 32))


@pytest.mark.parametrize(
    ("name", "classes", "n_train", "n_val"),
    [
        ("cifar10", 10, 5 * CIFAR_PER_BATCH, CIFAR_TEST),
        ("cifar100", 100, 30, 12),
    ],
)
def test_cifar(data_root: Path, name: str, classes: int, n_train: int, n_val: int) -> None:
    splits = build_dataset(dcfg(name, data_root))
    assert splits.train.x.shape == (n_train, 3, 32, 32) and splits.val.x.shape == (n_val, 3, 32, 32)
    assert splits.num_classes == classes and splits.in_shape == (3, 32, 32)
    assert splits.augment is not None  # the CIFAR configs augment by default
    folder, first, key = {
        "cifar10": ("cifar-10-batches-py", "data_batch_1", "labels"),
        "cifar100": ("cifar-100-python", "train", "fine_labels"),
    }[name]
    with open(data_root / folder / first, "rb") as f:
        batch = pickle.load(f)  # the test's own file
    assert splits.train.y[: len(batch[key])].tolist() == batch[key]
    # Row layout: 1024 red, 1024 green, 1024 blue values; pixel (0, 0) of each channel.
    raw = batch["data"][0]
    expect = [(raw[c * 1024] / 255 - splits.mean[c]) / splits.std[c] for c in range(3)]
    assert inputs(splits.train)[0, :, 0, 0].tolist() == pytest.approx(expect, abs=1e-5)
    assert dataset_shape(dcfg(name, data_root)) == (classes, (3, 32, 32))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": evil, "labels": []}, f, protocol=2)
    with pytest.raises(
        UserError, match=r"data_batch_3 is not a readable CIFAR python batch \(it names (posix|os|nt)\.system"
    ):
        build_dataset(dcfg("cifar10", tmp_path))
    assert not marker.exists()


def test_cifar_wrong_content(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}, f, protocol=2)
    with pytest.raises(UserError, match=r"test_batch holds no uint8 'data' array"):
        build_dataset(dcfg("cifar10", tmp_path))


def test_imagefolder_rgb(data_root: Path) -> None:
    splits = build_dataset(dcfg("imagefolder", data_root, image_size=16))
    assert splits.num_classes == 3
    assert splits.train.x.shape == (12, 3, 16, 16) and splits.val.x.shape == (6, 3, 16, 16)
    assert splits.train.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # classes: sorted subfolders
    assert splits.mean == [0.485, 0.456, 0.406]
    assert dataset_shape(dcfg("imagefolder", data_root, image_size=16)) == (3, (3, 16, 16))


def test_imagefolder_grayscale(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, classes=("a", "b"), mode="L")
    splits = build_dataset(dcfg("imagefolder", tmp_path, image_size=None))
    assert splits.in_shape == (1, 32, 32) and splits.mean == [0.5]  # image_size null: 32
    assert dataset_shape(dcfg("imagefolder", tmp_path, image_size=None)) == (2, (1, 32, 32))
    # One colour image makes the whole dataset RGB (grayscale images get equal channels).
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "val" / "a" / "colour.png")
    splits = build_dataset(dcfg("imagefolder", tmp_path))
    assert splits.in_shape == (3, 32, 32)
    assert dataset_shape(dcfg("imagefolder", tmp_path)) == (2, (3, 32, 32))


def test_imagefolder_corrupt_image_names_the_file(tmp_path: Path) -> None:
    write_imagefolder(tmp_path, classes=("a", "b"))
    bad = tmp_path / "train" / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(UserError, match=r"broken\.png cannot be read as an image"):
        build_dataset(dcfg("imagefolder", tmp_path))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: None, r"reads files: set dataset.root=PATH"),  # root null (config default)
        (lambda r: (r / "train").rename(r / "training"), r"needs .*train: dataset.root must hold train/ and val/"),
        (lambda r: [p.unlink() for p in (r / "val").rglob("*.png")], r"val holds no images"),
        (lambda r: (r / "train" / "c").mkdir(), r"train/c holds no images"),
        (lambda r: (r / "val" / "zebra").mkdir(), r"val/zebra is a class that .*train lacks"),
    ],
)
def test_imagefolder_layout_errors(tmp_path: Path, damage, message: str) -> None:
    write_imagefolder(tmp_path, classes=("a", "b"))
    damage(tmp_path)
    root = None if "root=PATH" in message else tmp_path
    with pytest.raises(UserError, match=message):
        build_dataset(dcfg("imagefolder", root))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
        ("fashion_mnist", "FashionMNIST/raw/train-images-idx3-ubyte"),
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
        ("cifar100", "cifar-100-python/train"),
    ],
)
def test_missing_files(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(UserError, match=rf"cannot find {tmp_path / 'nowhere' / expected}.*dataset.download=true") as e:
        build_dataset(dcfg(name, tmp_path / "nowhere"))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"set dataset.root=PATH"):
        build_dataset(dcfg(name, None))


def test_fake() -> None:
    splits = build_dataset(dcfg("fake"))
    assert splits.train.x.shape == (256, 3, 32, 32) and splits.val.x.shape == (64, 3, 32, 32)
    assert splits.num_classes == 10 and not torch.equal(splits.train.x[:64], splits.val.x)
    assert dataset_shape(dcfg("fake")) == (10, (3, 32, 32))


def test_labelled_and_excluded(data_root: Path) -> None:
    splits = build_dataset(dcfg("mnist", data_root, labelled_per_class=1, exclude_classes=[3]))
    assert int((splits.train.y >= 0).sum()) == 9 and 3 not in splits.train.y.tolist()
    assert len(splits.teacher_train) == 10


# --- augmentation ----------------------------------------------------------------------------


def test_augment_keeps_shape_and_changes_pixels() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3, 32, 32)
    aug = make_augment([0.5] * 3, [0.25] * 3, pad=4, flip=True)
    out = aug(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)
    assert x.abs().sum() > 0  # input untouched
    # The padding holds the normalised value of a black pixel: (0 - 0.5) / 0.25.
    assert (out == -2.0).any()


def test_crop_is_a_shifted_window() -> None:
    torch.manual_seed(1)
    x = torch.randn(16, 1, 8, 8)
    out = crop_flip(x, pad=2, flip=False)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):  # every sample is some window of its own padded image, never mirrored
        windows = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_flip_only() -> None:
    torch.manual_seed(2)
    x = torch.randn(64, 2, 5, 7)
    out = crop_flip(x, pad=0, flip=True)
    same = [torch.equal(out[i], x[i]) for i in range(64)]
    mirrored = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 10 < sum(mirrored) < 54


def test_mnist_augment_never_flips(data_root: Path) -> None:
    splits = build_dataset(dcfg("mnist", data_root, augment=True))
    x = torch.zeros(32, 1, 28, 28)
    x[:, :, :, :3] = 1.0  # a bar on the left edge: a flip would move it to the right half
    torch.manual_seed(0)
    out = splits.augment(x)
    assert out.shape == x.shape
    assert (out[:, :, :, 14:] == 1.0).sum() == 0


# --- through the CLI ---------------------------------------------------------------------------


def test_one_epoch_on_every_dataset(data_root: Path, tmp_path: Path) -> None:
    """One sweep job per dataset: a 1-epoch teacher and a 1-epoch student, each on the dataset's files."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdtrain",
            "--multirun",
            f"dataset={','.join(DATASETS)}",
            f"dataset.root={data_root}",
            "epochs=1",
            "teacher_train.epochs=1",
            "batch_size=8",
            "teacher_train.batch_size=8",
            "baseline=false",
            "student=mlp",
            "teacher=mlp",
            "progress=off",
            "device=cpu",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            f"teacher_store={tmp_path / 'teachers'}",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, name in enumerate(DATASETS):
        summary = json.loads((tmp_path / "sweep" / str(i) / "summary.json").read_text())
        assert summary["epochs"] == 1, name
        assert 0.0 <= summary["student"]["best_val_acc"] <= 1.0
    teachers = sorted(p.name.split("-")[1] for p in (tmp_path / "teachers").iterdir() if p.is_dir())
    assert teachers == sorted(DATASETS)


def test_cli_missing_dataset_dir(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdtrain",
            "dataset=cifar10",
            f"dataset.root={tmp_path / 'nowhere'}",
            "epochs=1",
            "progress=off",
            "device=cpu",
            f"hydra.run.dir={tmp_path / 'run'}",
            f"teacher_store={tmp_path / 'teachers'}",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot find {tmp_path / 'nowhere' / 'cifar-10-batches-py' / 'data_batch_1'}" in proc.stderr
    assert "Traceback" not in proc.stderr
