"""The stream path (dataset.loader=stream) and the memory path's uint8 storage: batches the same for any worker
count and after a mid-epoch resume, loader=auto by budget, bad images, a 2-process gloo run where each rank
reads only its share, and a folder over the memory budget trained end to end through the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdtrain.data import StreamSet, TensorSet, build_dataset
from kdtrain.data.batches import make_batches
from kdtrain.engine import Interrupted, stop_on_signals
from kdtrain.errors import UserError
from kdtrain.run import run
from kdtrain.rundir import read_meta
from tests._dataset_files import write_imagefolder
from tests.conftest import run_cli
from tests.test_datasets import dcfg
from tests.test_resume import assert_same_run, rows

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TRAIN, VAL = 40, 8  # images in the test folder: 2 classes x (20 train, 4 val), 20 x 16 pixels
FOLDER = [
    "dataset=imagefolder",
    "dataset.image_size=16",
    "teacher_train.batch_size=8",
    "batch_size=8",
    "baseline=false",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_imagefolder(root, classes=("a", "b"), per_class=(TRAIN // 2, VAL // 2), size=(20, 16))
    return root


def _stream(root: Path, **kw) -> StreamSet:
    splits = build_dataset(dcfg("imagefolder", root, image_size=16, loader="stream", **kw))
    assert isinstance(splits.train, StreamSet) and splits.augment is None  # the stream augments as it decodes
    return splits.train


def _epoch(data, first: int = 0, epochs: int = 1, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = make_batches(data, 8, CPU, shuffle=True, seed=3, **kw)
    out = []
    for _ in range(epochs):
        out = [(x, idx) for x, _, idx in batches.epoch(first)]
    return out


def test_stream_batches_are_the_same_for_any_worker_count_and_from_any_step(folder):
    data = _stream(folder, workers=0)  # augment=true: RandomResizedCrop + flip
    a = _epoch(data)
    assert len(a) == TRAIN // 8 and a[0][0].shape == (8, 3, 16, 16) and a[0][0].dtype == torch.float32
    assert sorted(torch.cat([idx for _, idx in a]).tolist()) == list(range(TRAIN))  # a permutation
    b = _epoch(_stream(folder, workers=1))
    assert all(torch.equal(xa, xb) and torch.equal(ia, ib) for (xa, ia), (xb, ib) in zip(a, b))
    # A resumed epoch (same generator state, later first step) sees the same crops and flips.
    c = _epoch(data, first=2)
    assert all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a[2:], c))
    # The next epoch draws other crops, and the draws leave the global RNG alone.
    state = torch.get_rng_state()
    second = _epoch(data, epochs=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(_by_sample(a)[0], _by_sample(second)[0])


def _by_sample(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, torch.Tensor]:
    return {i: x[j] for x, idx in batches for j, i in enumerate(idx.tolist())}


def test_stream_evaluation_is_resize_and_centre_crop(folder):
    data = _stream(folder, workers=0, augment=False)
    first, second = _by_sample(_epoch(data)), _by_sample(_epoch(data, epochs=2))
    assert all(torch.equal(first[i], second[i]) for i in range(TRAIN))  # another order, the same pixels
    # Sample 0 by hand: resize the shorter side to round(16 / 0.875) = 18, centre-crop 16, normalise.
    from PIL import Image
    from torchvision.transforms import v2
    from torchvision.transforms.v2.functional import pil_to_tensor

    img = pil_to_tensor(Image.open(data.source.files[0]).convert("RGB"))
    want = v2.CenterCrop(16)(v2.Resize(18, antialias=True)(img)).float() / 255
    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    got = next(make_batches(data, 4, CPU, shuffle=False).epoch())[0][0]
    assert torch.allclose(got, (want - mean) / std, atol=1e-5)


def test_predict_preprocesses_as_the_stream_evaluation(folder):
    from kdtrain.predict import load_image, preprocessing_spec

    data = _stream(folder, workers=0, augment=False)
    x = next(make_batches(data, 4, CPU, shuffle=False).epoch())[0]
    # A stream-trained student records crop 0.875 (run.py): kdtrain-predict and model.json then resize to cover
    # 18 x 18 and centre-crop 16 x 16, as the evaluation did (PIL's resize vs torchvision's: within 1 / 255).
    spec = preprocessing_spec((3, 16, 16), data.mean, data.std, crop=0.875)
    assert spec["crop"] == 0.875 and "covers 18 x 18" in spec["steps"][1]
    for i in range(4):
        assert (load_image(data.source.files[i], spec) - x[i]).abs().max() < 1.5 / 255 / min(data.std)


def test_loader_auto_streams_a_split_over_the_budget(folder, caplog):
    caplog.set_level("INFO", logger="kdtrain")
    # 48 images x 3 x 16 x 16 bytes = 36,864 bytes
    over = build_dataset(dcfg("imagefolder", folder, image_size=16, memory_budget_gb=30e-6))
    assert isinstance(over.train, StreamSet) and isinstance(over.val, StreamSet)
    assert "the stream path (dataset.loader=auto): train + val take 0.00 GB as uint8 pixels, over" in caplog.text
    within = build_dataset(dcfg("imagefolder", folder, image_size=16, memory_budget_gb=40e-6, workers=1))
    assert isinstance(within.train, TensorSet) and within.train.x.dtype == torch.uint8
    assert "the memory path (dataset.loader=auto)" in caplog.text
    # Decoded by a worker process or by this one: the same uint8 pixels.
    alone = build_dataset(dcfg("imagefolder", folder, image_size=16, loader="memory", workers=0))
    assert torch.equal(within.train.x, alone.train.x) and torch.equal(within.val.x, alone.val.x)


def _break(root: Path) -> Path:
    bad = root / "train" / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return bad


def test_bad_images_fail_names_the_file_and_skip_replaces_it(tmp_path, caplog):
    write_imagefolder(tmp_path, classes=("a", "b"), per_class=(4, 2), size=(20, 16))
    bad = _break(tmp_path)
    data = _stream(tmp_path, workers=0)
    with pytest.raises(UserError, match=r"broken\.png cannot be read as an image .*dataset\.bad_images=skip"):
        _epoch(data)
    with pytest.raises(UserError, match=r"broken\.png cannot be read"):  # the memory path too
        build_dataset(dcfg("imagefolder", tmp_path, image_size=16, loader="memory"))

    skip = _stream(tmp_path, workers=0, bad_images="skip")
    broken = [p.name for p in skip.source.files].index(bad.name)
    batches = make_batches(skip, 3, CPU, shuffle=True, seed=0)
    for _ in range(2):
        seen = [(x, idx) for x, _, idx in batches.epoch()]
        assert batches.take_bad_reads() == 1  # every epoch reads the broken file once
        idx = torch.cat([i for _, i in seen])
        assert broken not in idx.tolist() and len(idx) == 9  # replaced by another sample of its batch
    assert caplog.text.count("broken.png cannot be read") == 1  # logged once

    memory = build_dataset(dcfg("imagefolder", tmp_path, image_size=16, loader="memory", bad_images="skip"))
    assert len(memory.train) == 8 and memory.left_out == 1


def test_stream_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path, folder, compose, monkeypatch):
    args = [
        *FOLDER,
        f"dataset.root={folder}",
        "dataset.loader=stream",
        "dataset.workers=0",
        "student=custom",
        "student._target_=tests.models.Scripted",
        "epochs=3",
    ]
    reference = tmp_path / "reference"
    run(compose(*args), reference)
    monkeypatch.setenv("KDTRAIN_TEST_SIGNAL_AT", "7")  # 5 steps per epoch: epoch 2, step 2
    stopped = tmp_path / "stopped"
    with stop_on_signals(), pytest.raises(Interrupted):
        run(compose(*args), stopped)
    state = torch.load(stopped / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["partial"]["batches"] == 2
    monkeypatch.delenv("KDTRAIN_TEST_SIGNAL_AT")
    run(compose(*args, f"resume={stopped}"), stopped)
    assert_same_run(stopped, reference)


@pytest.mark.slow  # ~6 s: a subprocess trains a teacher and a student
def test_a_folder_over_the_memory_budget_trains_end_to_end_through_the_cli(tmp_path, folder):
    images = tmp_path / "images"
    write_imagefolder(images, classes=("a", "b"), per_class=(TRAIN // 2, VAL // 2), size=(20, 16))
    _break(images)
    run_dir = tmp_path / "run"
    done = run_cli(
        *FOLDER,
        f"dataset.root={images}",
        "dataset.memory_budget_gb=0.00001",
        "dataset.workers=1",
        "dataset.bad_images=skip",
        "epochs=2",
        "teacher_train.epochs=1",
        "progress=off",
        f"teacher_store={tmp_path / 'teachers'}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run_dir / "kdtrain.log").read_text()
    assert "the stream path (dataset.loader=auto)" in log and "broken.png cannot be read" in log
    assert [r["bad_images"] for r in rows(run_dir)] == [1, 1]  # the metrics column, each epoch
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["student"]["bad_images"] == 1
    assert "bad_images" in (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert read_meta(run_dir / "student.safetensors")["crop"] == 0.875  # what kdtrain-predict resizes by


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~20 s: three processes
def test_two_gloo_ranks_each_read_only_their_share_and_match_one_process(tmp_path, folder):
    common = [
        *FOLDER,
        f"dataset.root={folder}",
        "dataset.loader=stream",
        "dataset.workers=1",
        "epochs=2",
        "teacher_train.epochs=1",
        "progress=off",
        f"teacher_store={tmp_path / 'teachers'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    probe = [sys.executable, "-m", "tests._read_probe"]
    # One process first: it trains the teacher the two ranks then reuse, so they read for the student only.
    single = subprocess.run(
        [*probe, *common, f"hydra.run.dir={tmp_path / 'single'}"],
        cwd=tmp_path,
        env={**env, "KDTRAIN_TEST_READS": str(tmp_path / "single-reads")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc-per-node=2",
            "--master-addr=127.0.0.1",
            f"--master-port={_free_port()}",
            "-m",
            "tests._read_probe",
            *common,
            "batch_size=4",  # 2 ranks x 4 = 1 process x 8
            f"hydra.run.dir={tmp_path / 'ddp'}",
        ],
        cwd=tmp_path,
        env={**env, "KDTRAIN_TEST_READS": str(tmp_path / "reads")},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    train = [[p for p in (tmp_path / f"reads.{r}").read_text().splitlines() if "/train/" in p] for r in (0, 1)]
    every = sorted(str(p) for p in (folder / "train").rglob("*.png"))
    for epoch in range(2):  # each rank reads 20 training images an epoch: its half of every global batch
        shares = [set(reads[epoch * 20 : (epoch + 1) * 20]) for reads in train]
        assert len(shares[0]) == len(shares[1]) == 20 and not shares[0] & shares[1]
        assert sorted(shares[0] | shares[1]) == every
    assert len(train[0]) == len(train[1]) == 40
    a, b = rows(tmp_path / "ddp"), rows(tmp_path / "single")
    for row_a, row_b in zip(a, b, strict=True):
        for key in ("loss", "ce", "kd"):
            assert row_a[key] == pytest.approx(row_b[key], rel=1e-3), key
        assert row_a["val_acc"] == row_b["val_acc"]


def test_stream_workers_end_with_their_pass_or_close_and_nothing_waits_for_the_garbage_collector(folder):
    # Regression: a finished loader left in a reference cycle was collected inside a later loader's forked
    # worker, whose shutdown code then closed the worker's file descriptors ("Bad file descriptor" reading an
    # image, seen on 1,000 JPEGs). Now nothing cycles, evaluation workers end with their pass, training
    # workers (persistent across epochs) with close().
    import multiprocessing
    import weakref

    splits = build_dataset(dcfg("imagefolder", folder, image_size=16, loader="stream", workers=1))
    before = len(multiprocessing.active_children())
    val = make_batches(splits.val, 4, CPU, shuffle=False)
    assert sum(len(x) for x, _, _ in val.epoch()) == VAL
    assert len(multiprocessing.active_children()) == before
    gone = weakref.ref(val)
    del val
    assert gone() is None  # freed at once, not left to the cyclic collector
    train = make_batches(splits.train, 8, CPU, shuffle=True)
    for _ in range(2):
        assert sum(len(x) for x, _, _ in train.epoch()) == TRAIN
    assert len(multiprocessing.active_children()) == before + 1  # kept between epochs
    train.close()
    assert len(multiprocessing.active_children()) == before
