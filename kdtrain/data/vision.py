"""MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100 (official test split as val) and FakeData for smoke tests.

Files are read from `dataset.root` in torchvision's layout; `dataset.download=true` fetches them
with torchvision's downloader (checksums verified). `dataset.val_size` is not used: these
datasets come with their test split.

MNIST-like files are IDX arrays read by torchvision (no code runs). CIFAR batches are Python
pickles, and unpickling a file can run any code it names, so they are not read with torchvision's
`CIFAR10` (plain `pickle.load`, and an md5 check that refuses every file but the official one).
`_read_cifar_batch` unpickles with a restricted Unpickler that resolves only numpy's array
reconstruction functions (and latin-1 `_codecs.encode`, which Python 3 pickles of bytes use):
a file that names anything else is refused, and what it holds is checked to be a dict with a
uint8 `data` array and a list of int labels.
"""

from __future__ import annotations

import codecs
import importlib
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from kdtrain.data import Splits, TensorSet, register, register_shape
from kdtrain.data.common import check_labels, dataset_root, image_size, make_splits, to_pixels
from kdtrain.errors import UserError

# Normalisation constants of the literature (training-set channel mean / std).
MNIST_MEAN, MNIST_STD = [0.1307], [0.3081]
FASHION_MEAN, FASHION_STD = [0.2860], [0.3530]
CIFAR10_MEAN, CIFAR10_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
CIFAR100_MEAN, CIFAR100_STD = [0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


# --- MNIST-like ---------------------------------------------------------------------------------

MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _mnist_like(cfg: DictConfig, folder: str, mean: list[float], std: list[float]) -> Splits:
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import extract_archive

    cls = {"MNIST": tvd.MNIST, "FashionMNIST": tvd.FashionMNIST}[folder]
    root = dataset_root(cfg, f"{folder}/raw/ (e.g. data/, with dataset.download=true to fetch the files)")
    raw = root / folder / "raw"
    if cfg.download:
        try:
            cls(str(root), train=True, download=True)
        except (OSError, RuntimeError, ValueError) as e:  # network, disk or checksum failure, in one line
            raise UserError(
                f"dataset.download=true could not fetch {cfg.name} into {raw} ({_first_line(e)}); "
                f"put {', '.join(MNIST_FILES)} there by hand"
            ) from None
    for name in MNIST_FILES:
        gz = raw / f"{name}.gz"
        if not (raw / name).is_file() and gz.is_file():  # archives as published: unpack them once
            extract_archive(str(gz), str(raw))
    missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    if missing:
        raise UserError(
            f"dataset={cfg.name} cannot find {raw / missing[0]}: {raw} must hold {', '.join(MNIST_FILES)} "
            "(or their .gz files); set dataset.root to the folder above "
            f"{folder}/, or add dataset.download=true"
        )
    try:
        parts = [cls(str(root), train=train) for train in (True, False)]
    except (AssertionError, KeyError, IndexError, ValueError, RuntimeError, OSError) as e:  # malformed IDX file
        raise UserError(
            f"dataset={cfg.name}: the IDX files in {raw} cannot be read ({_first_line(e)}); replace them"
        ) from None
    size = image_size(cfg, 28)
    sets = []
    for part, split in zip(parts, ("train", "t10k")):
        y = part.targets.long()
        check_labels(y, 10, str(raw / f"{split}-labels-idx1-ubyte"))
        if len(y) != len(part.data):
            raise UserError(
                f"dataset={cfg.name}: {raw} holds {len(part.data)} {split} images but {len(y)} labels; replace "
                "the files"
            )
        sets.append(TensorSet(to_pixels(part.data.unsqueeze(1), size), y, mean, std))
    return make_splits(cfg, sets[0], sets[1], 10, mean, std, pad=2, flip=False)  # digits are not mirror-symmetric


@register("mnist")
def mnist(cfg: DictConfig) -> Splits:
    return _mnist_like(cfg, "MNIST", MNIST_MEAN, MNIST_STD)


@register("fashion_mnist")
def fashion_mnist(cfg: DictConfig) -> Splits:
    return _mnist_like(cfg, "FashionMNIST", FASHION_MEAN, FASHION_STD)


@register_shape("mnist")
@register_shape("fashion_mnist")
def _mnist_shape(cfg: DictConfig) -> tuple[int, tuple[int, int, int]]:
    size = image_size(cfg, 28)
    return 10, (1, size, size)


# --- CIFAR --------------------------------------------------------------------------------------


def _numpy_global(module: str, name: str) -> Any:
    for prefix in ("numpy._core", "numpy.core"):  # numpy 2 moved numpy.core to numpy._core
        try:
            return getattr(importlib.import_module(f"{prefix}.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {module}.{name}")


def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(obj, "latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct = _numpy_global("multiarray", "_reconstruct")
    frombuffer = _numpy_global("numeric", "_frombuffer")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{prefix}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Builds only plain containers, numbers, strings and numpy arrays; refuses every other global."""

    allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never does") from None


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 3, 32, 32), int64 labels (N,)) from one CIFAR python batch, unpickled safely."""
    try:
        with open(path, "rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        UnicodeDecodeError,
        OverflowError,
        MemoryError,
    ) as e:
        raise UserError(
            f"{path} is not a readable CIFAR python batch ({_first_line(e)}); replace it with the official file"
        ) from None
    data = entry.get("data") if isinstance(entry, dict) else None
    labels = entry.get(label_key) if isinstance(entry, dict) else None
    if not (
        isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3 * 32 * 32
    ):
        raise UserError(
            f"{path} holds no uint8 'data' array of shape (N, 3072); replace it with the official CIFAR file"
        )
    if not (isinstance(labels, list) and len(labels) == len(data) and all(type(v) is int for v in labels)):
        raise UserError(
            f"{path} holds no list of {len(data)} int {label_key!r}; replace it with the official CIFAR file"
        )
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


CIFAR = {
    # name: (folder, train files, test files, label key, classes, torchvision class name)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        10,
        "CIFAR10",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100, "CIFAR100"),
}


def _cifar(cfg: DictConfig, mean: list[float], std: list[float]) -> Splits:
    folder, train_files, test_files, label_key, classes, tv_name = CIFAR[cfg.name]
    root = dataset_root(cfg, f"{folder}/ (e.g. data/, with dataset.download=true to fetch it)")
    where = root / folder
    expected = train_files + test_files
    if cfg.download and not all((where / f).is_file() for f in expected):
        import torchvision.datasets as tvd
        from torchvision.datasets.utils import download_and_extract_archive

        tv = getattr(tvd, tv_name)
        try:  # the archive's md5 is checked before it is unpacked
            download_and_extract_archive(tv.url, str(root), filename=tv.filename, md5=tv.tgz_md5)
        except (OSError, RuntimeError, ValueError, tarfile.TarError) as e:  # network, disk, checksum, archive
            raise UserError(
                f"dataset.download=true could not fetch {cfg.name} into {root} ({_first_line(e)}); "
                f"unpack {tv.url} there by hand"
            ) from None
    missing = [f for f in expected if not (where / f).is_file()]
    if missing:
        raise UserError(
            f"dataset={cfg.name} cannot find {where / missing[0]}: {where} must hold {', '.join(expected)}; "
            f"set dataset.root to the folder above {folder}/, or add dataset.download=true"
        )
    size = image_size(cfg, 32)
    sets = []
    for files in (train_files, test_files):
        parts = [_read_cifar_batch(where / f, label_key) for f in files]
        x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        check_labels(y, classes, str(where / files[0]))
        sets.append(TensorSet(to_pixels(x, size), y, mean, std))
    return make_splits(cfg, sets[0], sets[1], classes, mean, std, pad=4, flip=True)


@register("cifar10")
def cifar10(cfg: DictConfig) -> Splits:
    return _cifar(cfg, CIFAR10_MEAN, CIFAR10_STD)


@register("cifar100")
def cifar100(cfg: DictConfig) -> Splits:
    return _cifar(cfg, CIFAR100_MEAN, CIFAR100_STD)


@register_shape("cifar10")
@register_shape("cifar100")
def _cifar_shape(cfg: DictConfig) -> tuple[int, tuple[int, int, int]]:
    size = image_size(cfg, 32)
    return CIFAR[cfg.name][4], (3, size, size)


# --- FakeData -----------------------------------------------------------------------------------

FAKE_TRAIN, FAKE_VAL, FAKE_CLASSES = 256, 64, 10


@register("fake")
def fake(cfg: DictConfig) -> Splits:
    """torchvision's FakeData: random 3 x 32 x 32 images and labels, for smoke tests (nothing to learn)."""
    from torchvision.datasets import FakeData
    from torchvision.transforms.functional import pil_to_tensor

    size = image_size(cfg, 32)
    mean, std = [0.5] * 3, [0.5] * 3
    sets = []
    for n, offset in ((FAKE_TRAIN, 0), (FAKE_VAL, FAKE_TRAIN)):  # distinct seeds: val images differ from train
        data = FakeData(
            size=n,
            image_size=(3, size, size),
            num_classes=FAKE_CLASSES,
            random_offset=offset + int(cfg.split_seed) * 100_000,
        )
        images, labels = zip(*(data[i] for i in range(n)))
        x = torch.stack([pil_to_tensor(img) for img in images])
        sets.append(TensorSet(to_pixels(x, size), torch.tensor([int(v) for v in labels], dtype=torch.int64), mean, std))
    return make_splits(cfg, sets[0], sets[1], FAKE_CLASSES, mean, std, pad=4, flip=True)


@register_shape("fake")
def _fake_shape(cfg: DictConfig) -> tuple[int, tuple[int, int, int]]:
    size = image_size(cfg, 32)
    return FAKE_CLASSES, (3, size, size)
