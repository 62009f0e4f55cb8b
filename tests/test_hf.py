"""dataset=hf: Hugging Face datasets written locally by the test (parquet files with image bytes, an image
folder, a plain parquet table), read through datasets.load_dataset; no network."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdtrain.data import build_dataset, dataset_shape
from kdtrain.errors import UserError
from kdtrain.run import run
from kdtrain.rundir import read_meta
from tests._dataset_files import write_imagefolder
from tests.test_datasets import dcfg

datasets = pytest.importorskip("datasets")

NAMES = ["cat", "dog", "fox"]


def _images(n: int, mode: str = "RGB", seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    shape = (12, 16, 3) if mode == "RGB" else (12, 16)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(n)]


def write_parquet(root: Path, mode: str = "RGB") -> dict[str, str]:
    """train (6 rows) and validation (3 rows) parquet files of an Image column and a ClassLabel column, as
    the Hub stores datasets; returns dataset.data_files."""
    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=NAMES)})
    files = {}
    for split, n in (("train", 6), ("validation", 3)):
        ds = datasets.Dataset.from_dict({"img": _images(n, mode), "fine": [i % 3 for i in range(n)]}, features=features)
        files[split] = str(root / f"{split}.parquet")
        ds.to_parquet(files[split])
    return files


def hf_cfg(**kw):
    return dcfg("hf", None, image_size=8, **kw)


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch) -> None:
    """A fresh Hugging Face cache per test (nothing from the machine's cache is read)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def test_parquet_with_image_bytes_and_a_classlabel(tmp_path: Path, no_network: list[str]) -> None:
    files = write_parquet(tmp_path)
    cfg = hf_cfg(path="parquet", data_files=files, image_column="img", label_column="fine")
    splits = build_dataset(cfg)
    assert splits.num_classes == 3 and splits.class_names == NAMES
    assert splits.in_shape == (3, 8, 8) and splits.mean == [0.485, 0.456, 0.406]
    assert splits.train.y.tolist() == [0, 1, 2, 0, 1, 2] and splits.val.y.tolist() == [0, 1, 2]
    # The memory path holds the images' own pixels (random noise, scaled and centre-cropped), one per row.
    assert splits.train.x.dtype == torch.uint8 and float(splits.train.x.float().std()) > 20
    assert not torch.equal(splits.train.x[0], splits.train.x[1])
    assert dataset_shape(cfg) == (3, (3, 8, 8))
    assert no_network == []


def test_local_image_folder_grayscale(tmp_path: Path, no_network: list[str]) -> None:
    # load_dataset on a folder of train/<class>/ and validation/<class>/ images: datasets' imagefolder builder.
    write_imagefolder(tmp_path / "data", classes=("a", "b"), mode="L", per_class=(3, 2))
    (tmp_path / "data" / "val").rename(tmp_path / "data" / "validation")
    cfg = hf_cfg(path=str(tmp_path / "data"))
    splits = build_dataset(cfg)
    assert (len(splits.train), len(splits.val), splits.num_classes) == (6, 4, 2)
    assert splits.class_names == ["a", "b"] and splits.in_shape == (1, 8, 8)  # every image grayscale: 1 channel
    assert dataset_shape(cfg) == (2, (1, 8, 8))
    assert no_network == []


def test_plain_table_with_string_labels_and_raw_bytes(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    for split, labels in (("train", ["zebra", "ant", "zebra", "ant"]), ("test", ["ant", "zebra"])):
        table = pa.table({"image": [png(i) for i in _images(len(labels))], "label": labels})
        pq.write_table(table, tmp_path / f"{split}.parquet")
    files = {"train": str(tmp_path / "train.parquet"), "test": str(tmp_path / "test.parquet")}
    splits = build_dataset(hf_cfg(path="parquet", data_files=files, val_split="test"))
    assert splits.class_names == ["ant", "zebra"]  # the sorted strings of the training split
    assert splits.train.y.tolist() == [1, 0, 1, 0] and splits.val.y.tolist() == [0, 1]


def test_stream_path_reads_rows_in_worker_processes(tmp_path: Path) -> None:
    # The source travels to a DataLoader worker (pickled with its datasets.Dataset) and decodes rows there.
    from kdtrain.data.batches import make_batches

    files = write_parquet(tmp_path)
    cfg = hf_cfg(path="parquet", data_files=files, image_column="img", label_column="fine", loader="stream", workers=1)
    splits = build_dataset(cfg)
    batches = make_batches(splits.val, 2, torch.device("cpu"), shuffle=False)
    got = list(batches.epoch())
    assert [tuple(x.shape) for x, _, _ in got] == [(2, 3, 8, 8), (1, 3, 8, 8)]
    assert torch.cat([y for _, y, _ in got]).tolist() == [0, 1, 2]
    assert torch.cat([i for _, _, i in got]).tolist() == [0, 1, 2]


def test_tiny_run_on_a_parquet_dataset(compose, tmp_path: Path) -> None:
    files = write_parquet(tmp_path)
    cfg = compose(
        "dataset=hf",
        "dataset.path=parquet",
        f"dataset.data_files={{train:'{files['train']}',validation:'{files['validation']}'}}",
        "dataset.image_column=img",
        "dataset.label_column=fine",
        "dataset.image_size=8",
        "batch_size=4",
        "teacher_train.batch_size=4",
        "baseline=false",
    )
    run(cfg, tmp_path / "run")
    assert read_meta(tmp_path / "run" / "student.safetensors")["class_names"] == NAMES


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"path": None}, r"dataset=hf needs dataset.path"),
        ({"val_split": "dev"}, r"split 'dev' could not be loaded: .*Unknown split"),
        ({"image_column": "picture"}, r"dataset.image_column=picture is not a column .* columns are img, fine"),
        ({"label_column": "img"}, r"dataset.label_column=img .* holds Image.*not class labels"),
        ({"data_files": {"train": "/nonexistent/*.parquet"}}, r"could not be loaded"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, change: dict, message: str) -> None:
    cfg = hf_cfg(path="parquet", data_files=write_parquet(tmp_path), image_column="img", label_column="fine")
    for key, value in change.items():
        cfg[key] = value
    with pytest.raises(UserError, match=message):
        build_dataset(cfg)


def test_corrupt_image_names_split_and_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = io.BytesIO()
    _images(1)[0].save(good, format="PNG")
    for split in ("train", "validation"):
        images = [good.getvalue(), b"\x89PNG\r\n\x1a\n not a png"] if split == "train" else [good.getvalue()] * 2
        pq.write_table(pa.table({"image": images, "label": [0, 1]}), tmp_path / f"{split}.parquet")
    files = {s: str(tmp_path / f"{s}.parquet") for s in ("train", "validation")}
    with pytest.raises(UserError, match=r"parquet train row 1 cannot be read as an image"):
        build_dataset(hf_cfg(path="parquet", data_files=files))


def test_offline_hub_name_fails_without_touching_the_network(no_network: list[str]) -> None:
    from kdtrain.models.hub import set_offline

    set_offline(True)
    try:
        with pytest.raises(UserError, match=r"dataset.path=someone/no-such-dataset .*offline"):
            build_dataset(hf_cfg(path="someone/no-such-dataset"))
    finally:
        set_offline(False)
    assert no_network == []


def test_missing_datasets_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    with pytest.raises(UserError, match=r"pip install 'kdtrain\[hf\]'"):
        build_dataset(hf_cfg(path="parquet"))


def test_the_hf_keys_leave_stored_teachers_and_baselines_where_they_were(compose) -> None:
    # The keys dataset=hf added sit in every dataset config; at their defaults they stay out of the store keys,
    # so teachers and baselines stored before them are still found (the default digits teacher's key then).
    import torch

    from kdtrain.baseline import baseline_identity
    from kdtrain.teacher import teacher_identity, teacher_key

    cfg = compose()
    assert "path" not in teacher_identity(cfg, "off")["dataset"]
    assert "image_column" not in baseline_identity(cfg, None, torch.device("cpu"))["dataset"]
    assert teacher_key(compose("teacher_train.epochs=30"), "off") == "cnn-digits-696103cd1f2b"
    assert "path" in teacher_identity(compose("dataset=hf", "dataset.path=parquet"), "off")["dataset"]
