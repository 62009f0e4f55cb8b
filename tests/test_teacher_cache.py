"""The teacher-output cache: equal to the teacher, keyed by everything that decides it, safe on disk,
float16 and top-k storage within tolerance, replayable augmented views."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save as safetensors_bytes
from torch import nn

from kdtrain import teacher_cache
from kdtrain.config import validate
from kdtrain.data import StreamSet, TensorSet
from kdtrain.data.augment import make_augment
from kdtrain.data.batches import make_batches
from kdtrain.data.sources import FileSource
from kdtrain.errors import UserError
from kdtrain.features import Capture
from kdtrain.losses import kd_loss
from kdtrain.models import build_model
from kdtrain.run import run
from kdtrain.teacher_cache import (
    META,
    TeacherCache,
    array_file,
    cache_file,
    cache_identity,
    cache_key,
    mapped_file,
    obtain,
)
from tests._dataset_files import write_imagefolder

CPU = torch.device("cpu")
PATHS = ["features.1", "auto"]  # a feature map (conv block) and the penultimate vector
DATASET = {"name": "digits", "val_size": 500, "split_seed": 0, "augment": False, "labelled_per_class": 20}


def _teacher(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model({"name": "cnn", "width": 8, "hidden": 16}, 10, (1, 8, 8), "teacher").eval()


def _data(n: int = 70, seed: int = 0) -> TensorSet:
    g = torch.Generator().manual_seed(seed)
    return TensorSet(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


@torch.no_grad()
def _direct(teacher: nn.Module, x: torch.Tensor, paths: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    capture = Capture(teacher, paths, "teacher")
    try:
        return teacher(x), capture.pop()
    finally:
        capture.remove()


def _identity(teacher: nn.Module, data: TensorSet, **changes) -> dict:
    args = {
        "dataset_cfg": DATASET,
        "amp_dtype": None,
        "feature_paths": PATHS,
        "dtype": "float32",
        "topk": None,
        "temperature": 4.0,
        "views": 0,
        "augment": None,
    }
    args.update(changes)
    return cache_identity(teacher, data, **args)


def test_lookup_equals_the_teacher_and_disk_round_trip_is_exact(tmp_path: Path) -> None:
    teacher, data = _teacher(), _data()
    cache = TeacherCache.build(teacher, data, CPU, None, PATHS, batch_size=16)  # 16 does not divide 70
    idx = torch.tensor([69, 0, 17, 33, 17])
    logits, feats = cache.lookup(idx)
    want_logits, want_feats = _direct(teacher, data.x[idx], PATHS)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert [f.shape for f in feats] == [f.shape for f in want_feats] == [(5, 16, 8, 8), (5, 16)]
    for got, want in zip(feats, want_feats):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    cache.save(tmp_path / "c.safetensors")
    again = TeacherCache.load(tmp_path / "c.safetensors", CPU, cache.key)
    assert again.key == cache.key and again.num_classes == 10 and again.views == 0
    all_idx = torch.arange(len(data))
    (a, fa), (b, fb) = cache.lookup(all_idx), again.lookup(all_idx)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(fa, fb))


def test_key_changes_with_teacher_weights_layers_data_and_storage() -> None:
    teacher, data = _teacher(), _data()
    base = cache_key(_identity(teacher, data))
    assert cache_key(_identity(teacher, data)) == base  # deterministic
    other_teacher = _teacher()
    with torch.no_grad():
        other_teacher.fc.bias[3] += 1e-3  # one weight
    changed = {
        "teacher weights": cache_key(_identity(other_teacher, data)),
        "layer set": cache_key(_identity(teacher, data, feature_paths=["auto"])),
        "dataset config": cache_key(_identity(teacher, data, dataset_cfg={**DATASET, "split_seed": 1})),
        "inputs": cache_key(_identity(teacher, _data(seed=1))),
        "fewer samples (e.g. hidden classes)": cache_key(_identity(teacher, data.subset(torch.arange(69)))),
        "float16": cache_key(_identity(teacher, data, dtype="float16")),
        "top-k": cache_key(_identity(teacher, data, topk=5)),
        "autocast": cache_key(_identity(teacher, data, amp_dtype=torch.bfloat16)),
    }
    assert all(key != base for key in changed.values()), [k for k, v in changed.items() if v == base]
    assert len(set(changed.values())) == len(changed)
    # Labels do not change the teacher's outputs: labelled_per_class / exclude_classes are not in the key.
    assert cache_key(_identity(teacher, data, dataset_cfg={**DATASET, "labelled_per_class": None})) == base
    # The temperature matters only to a top-k cache (its fill value).
    assert cache_key(_identity(teacher, data, temperature=2.0)) == base
    assert cache_key(_identity(teacher, data, topk=5, temperature=2.0)) != changed["top-k"]


def _obtain_args(teacher: nn.Module, data: TensorSet, cache_dir: Path, paths: list[str]) -> dict:
    return {
        "teacher": teacher,
        "train": data,
        "num_classes": 10,
        "dataset_cfg": DATASET,
        "cache_dir": cache_dir,
        "device": CPU,
        "amp_dtype": None,
        "feature_paths": paths,
    }


def test_corrupt_cache_is_rejected_and_obtain_rebuilds_it(tmp_path: Path, caplog) -> None:
    teacher, data = _teacher(), _data()
    args = _obtain_args(teacher, data, tmp_path, PATHS)
    caplog.set_level(logging.INFO, logger="kdtrain")
    first = obtain("disk", **args)
    path = cache_file(tmp_path, first.key)
    assert path.is_file() and "teacher cache: wrote" in caplog.text
    caplog.clear()
    assert obtain("disk", **args).key == first.key and "teacher cache: reusing" in caplog.text

    good = path.read_bytes()
    damaged = {
        "truncated": good[: len(good) // 2],
        "not safetensors": b"garbage" * 10,
        "a flipped byte": good[:-9] + bytes([good[-9] ^ 0xFF]) + good[-8:],  # in the tensor data: the checksum sees it
        # JSON nested too deeply for the parser (RecursionError): unreadable, not a crash
        "deeply nested metadata": safetensors_bytes({"logits": torch.zeros(1)}, {META: "[" * 100_000 + "]" * 100_000}),
    }
    for why, content in damaged.items():
        path.write_bytes(content)
        with pytest.raises(UserError, match="teacher cache .* (unreadable|checksum)"):
            TeacherCache.load(path, CPU, first.key)
        caplog.clear()
        rebuilt = obtain("disk", **args)
        assert "rebuilding it" in caplog.text and "teacher cache: wrote" in caplog.text, why
        assert torch.equal(rebuilt.lookup(torch.arange(70))[0], first.lookup(torch.arange(70))[0])
        assert path.read_bytes() == good  # rewritten (atomically), identical
    with pytest.raises(UserError, match="another teacher"):
        TeacherCache.load(path, CPU, "0" * 64)


def test_float16_storage_is_within_tolerance() -> None:
    teacher, data = _teacher(), _data()
    full = TeacherCache.build(teacher, data, CPU, None, PATHS)
    half = TeacherCache.build(teacher, data, CPU, None, PATHS, fp16=True)
    assert half.logits.dtype == torch.float16 and half.nbytes() * 2 == full.nbytes()
    idx = torch.arange(len(data))
    (a, fa), (b, fb) = full.lookup(idx), half.lookup(idx)
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    for x, y in zip(fa, fb):
        torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-3)
    student = torch.randn_like(a)
    torch.testing.assert_close(kd_loss(student, b, 4.0), kd_loss(student, a, 4.0), rtol=1e-4, atol=1e-6)


def _reconstruct(logits: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    class Head(nn.Module):  # a "teacher" whose output is the given logits
        def forward(self, i: torch.Tensor) -> torch.Tensor:
            return logits[i.flatten().long()]

    data = TensorSet(
        torch.arange(len(logits), dtype=torch.float32).view(-1, 1, 1, 1), torch.zeros(len(logits), dtype=torch.long)
    )
    cache = TeacherCache.build(Head(), data, CPU, None, topk=k, temperature=temperature, batch_size=64)
    assert cache.logits is None and cache.topk_values.shape == (len(logits), k)
    return cache.lookup(torch.arange(len(logits)))[0]


def test_topk_keeps_the_kd_loss_at_t4_for_100_classes() -> None:
    torch.manual_seed(0)
    b, c, t = 256, 100, 4.0
    teacher = torch.randn(b, c)  # a confident teacher: one clear class, a spread tail
    teacher[torch.arange(b), torch.randint(0, c, (b,))] += 8
    student = 0.6 * teacher + 1.5 * torch.randn(b, c)
    rebuilt = _reconstruct(teacher, 20, t)
    # The top-k classes keep exactly their probability at T, the tail its total mass.
    p_full, p_rebuilt = (torch.softmax(z / t, 1) for z in (teacher, rebuilt))
    top = teacher.topk(20, 1).indices
    torch.testing.assert_close(p_rebuilt.gather(1, top), p_full.gather(1, top), rtol=1e-5, atol=1e-6)
    full, approx = kd_loss(student, teacher, t), kd_loss(student, rebuilt, t)
    assert abs(approx / full - 1) < 0.05
    # The documented alternative "min(top-k) - 20" loses the tail's mass at T=4: far off.
    vals, idx = teacher.topk(20, 1)
    crude = (vals.min(1, keepdim=True).values - 20).repeat(1, c).scatter(1, idx, vals)
    assert abs(kd_loss(student, crude, t) / full - 1) > 1.0


def test_augmented_views_are_replayed_exactly(tmp_path: Path) -> None:
    teacher, data = _teacher(), _data(40)
    augment = make_augment([0.0], [1.0], pad=2, flip=True)
    cache = TeacherCache.build(teacher, data, CPU, None, ["auto"], views=3, augment=augment, batch_size=16)
    assert cache.views == 3 and cache.rows == 120 and cache.view_dy.shape == (40, 3)
    assert int(cache.view_dy.max()) <= 4 and cache.view_flip.any() and not cache.view_flip.all()
    idx = torch.tensor([5, 39, 0, 5])
    view = cache.draw_views(len(idx))
    x = augment.at(data.x[idx], *cache.view_params(idx, view))
    assert not torch.equal(x, data.x[idx])
    logits, feats = cache.lookup(idx, view)
    want_logits, want_feats = _direct(teacher, x, ["auto"])
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats[0], want_feats[0], rtol=1e-5, atol=1e-5)
    cache.save(tmp_path / "v.safetensors")
    again = TeacherCache.load(tmp_path / "v.safetensors", CPU, cache.key)
    assert torch.equal(again.view_dy, cache.view_dy) and torch.equal(again.lookup(idx, view)[0], logits)


def test_policies_under_augmentation_and_bad_settings(tmp_path: Path, caplog) -> None:
    teacher, data = _teacher(), _data(20)
    augment = make_augment([0.0], [1.0], pad=2, flip=True)
    args = _obtain_args(teacher, data, tmp_path, [])
    caplog.set_level(logging.INFO, logger="kdtrain")
    assert obtain("off", **args) is None
    assert obtain("auto", **args) is not None  # deterministic inputs: cached in memory
    assert obtain("auto", **args, augment=augment) is None
    assert "randomly augmented so the teacher runs every step" in caplog.text
    with pytest.raises(UserError, match="teacher_cache=memory needs deterministic training inputs"):
        obtain("memory", **args, augment=augment)
    assert obtain("memory", **args, augment=augment, views=2).views == 2
    with pytest.raises(UserError, match="teacher_cache_views=2 caches augmented views, but"):
        obtain("auto", **args, views=2)
    with pytest.raises(UserError, match="teacher_cache_topk=10 is out of range for 10 classes"):
        obtain("memory", **args, topk=10)
    with pytest.raises(UserError, match="teacher_cache=sometimes is not accepted"):
        obtain("sometimes", **args)
    assert not list(tmp_path.iterdir())  # only teacher_cache=disk writes files


# --- in a run -------------------------------------------------------------------------------------

LOSS_COLUMNS = ("loss", "ce", "kd", "feat")


def _losses(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in (*LOSS_COLUMNS, "train_acc", "val_acc")} for r in rows]


@pytest.mark.parametrize("mode", ["soft", "combined"])
def test_cached_and_uncached_training_give_the_same_losses(compose, tmp_path, caplog, mode) -> None:
    caplog.set_level(logging.INFO, logger="kdtrain")
    extra = (
        ["feature.pairs=[{student: auto, teacher: auto}, {student: auto, teacher: features.1}]"]
        if mode == "combined"
        else []
    )
    run(compose(f"mode={mode}", "baseline=false", "teacher_cache=off", *extra), tmp_path / "off")
    assert "teacher cache" not in caplog.text
    run(compose(f"mode={mode}", "baseline=false", *extra), tmp_path / "auto")  # the default: auto
    assert "computed once" in caplog.text and "teacher's forward pass is skipped" in caplog.text
    off, cached = _losses(tmp_path / "off"), _losses(tmp_path / "auto")
    assert len(off) == len(cached) == 2
    for a, b in zip(off, cached):
        for key in LOSS_COLUMNS:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        assert b["val_acc"] == a["val_acc"] and b["train_acc"] == a["train_acc"]
    assert cached[-1]["kd"] > 0 and (cached[-1]["feat"] > 0) == (mode == "combined")
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert summary["teacher_cache"]["policy"] == "auto" and summary["teacher_cache"]["views"] == 0
    assert json.loads((tmp_path / "off" / "summary.json").read_text())["teacher_cache"] is None


def test_disk_cache_is_reused_by_a_second_run(compose, tmp_path, caplog, store) -> None:
    caplog.set_level(logging.INFO, logger="kdtrain")
    folder = tmp_path / "cache"
    run(compose("baseline=false", "teacher_cache=disk", f"teacher_cache_dir={folder}"), tmp_path / "a")
    assert "teacher cache: wrote" in caplog.text
    caplog.clear()
    run(compose("baseline=false", "teacher_cache=disk", f"teacher_cache_dir={folder}", "seed=1"), tmp_path / "b")
    assert "teacher cache: reusing" in caplog.text and "computed once" not in caplog.text
    assert len(list(folder.glob("*.safetensors"))) == 1
    caplog.clear()
    run(compose("baseline=false", "teacher_cache=disk", "teacher_cache_dtype=float16"), tmp_path / "c")
    assert "teacher cache: wrote" in caplog.text and len(list((store / "cache").glob("*.safetensors"))) >= 1


def test_augmented_data_runs_the_teacher_or_replays_cached_views(compose, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="kdtrain")
    run(compose("dataset=fake", "dataset.augment=true", "baseline=false", "epochs=1"), tmp_path / "auto")
    assert "randomly augmented so the teacher runs every step" in caplog.text
    caplog.clear()
    run(
        compose(
            "dataset=fake",
            "dataset.augment=true",
            "baseline=false",
            "epochs=1",
            "teacher_cache_views=2",
            "mode=combined",
        ),
        tmp_path / "views",
    )
    assert "x 2 views computed once" in caplog.text
    assert json.loads((tmp_path / "views" / "summary.json").read_text())["teacher_cache"]["views"] == 2
    with pytest.raises(UserError, match="teacher_cache=memory needs deterministic training inputs"):
        run(compose("dataset=fake", "dataset.augment=true", "baseline=false", "teacher_cache=memory"), tmp_path / "m")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("teacher_cache_topk=0", "teacher_cache_topk=0 is out of range"),
        ("teacher_cache_views=-1", "teacher_cache_views=-1 is out of range"),
        ("teacher_cache_views=2", "teacher_cache_views=2 caches augmented views, but"),
        ("teacher_cache_topk=10", "teacher_cache_topk=10 is out of range for 10 classes"),
    ],
)
def test_bad_cache_settings_are_user_errors(compose, tmp_path, override, message) -> None:
    cfg = compose("baseline=false", override)
    with pytest.raises(UserError, match=message):
        validate(cfg)  # what the command line checks before Hydra starts
        run(cfg, tmp_path)


def test_views_with_the_cache_off_is_a_user_error(compose, tmp_path) -> None:
    with pytest.raises(UserError, match="teacher_cache_views=2 needs the teacher cache, but teacher_cache=off"):
        validate(compose("teacher_cache=off", "teacher_cache_views=2"))


@pytest.mark.slow
def test_compile_checkpoints_hold_the_uncompiled_weights(compose, tmp_path) -> None:
    """compile=true (torch.compile of the student's training forward, ~20 s to compile on a CPU)."""
    from safetensors.torch import load_file

    run(compose("baseline=false", "compile=true"), tmp_path)
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in last["model"])
    weights = load_file(tmp_path / "student.safetensors")
    assert weights.keys() == last["model"].keys()


@pytest.mark.gpu
def test_cuda_run_with_cache_channels_last_and_bf16(compose, tmp_path) -> None:
    """On CUDA: a conv student in channels_last, bf16 autocast, the cache built under the same autocast."""
    run(
        compose("baseline=false", "device=cuda", "amp=bf16", "student=cnn", "student.width=8", "teacher_cache=off"),
        tmp_path / "off",
    )
    run(compose("baseline=false", "device=cuda", "amp=bf16", "student=cnn", "student.width=8"), tmp_path / "on")
    off, on = _losses(tmp_path / "off"), _losses(tmp_path / "on")
    for a, b in zip(off, on):
        assert b["kd"] == pytest.approx(a["kd"], rel=2e-2)  # bf16: rounding differs with the batch size


# --- the stream path: memory-mapped files, read by sample index ----------------------------------

STREAM_DATASET = {"name": "imagefolder", "image_size": 16, "augment": False, "loader": "stream"}


def _stream(tmp_path: Path, n: int = 23, augment: bool = False) -> StreamSet:
    """A tiny StreamSet: n PNG/JPEG files of 20x18 px in 10 classes (every third one a JPEG)."""
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    files, labels = [], []
    for i in range(n):
        pixels = torch.randint(0, 256, (18, 20, 3), dtype=torch.uint8, generator=g).numpy()
        files.append(folder / f"{i:03d}.{'jpg' if i % 3 == 0 else 'png'}")
        Image.fromarray(pixels).save(files[-1])
        labels.append(i % 10)
    return StreamSet(FileSource(files, labels), torch.arange(n), torch.tensor(labels), size=16, augment=augment)


def _rgb_teacher() -> nn.Module:
    torch.manual_seed(0)
    return build_model({"name": "cnn", "width": 8, "hidden": 16}, 10, (3, 16, 16), "teacher").eval()


def _counted(teacher: nn.Module) -> list[int]:
    """A list whose length counts the teacher's forward passes."""
    calls: list[int] = []
    teacher.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    return calls


def _stream_args(teacher: nn.Module, data: StreamSet, cache_dir: Path, **changes) -> dict:
    return {**_obtain_args(teacher, data, cache_dir, PATHS), "dataset_cfg": STREAM_DATASET, **changes}


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("float16", 1e-3)])
def test_stream_cache_is_built_once_reused_and_equals_the_teacher(tmp_path: Path, caplog, dtype, tol) -> None:
    teacher, data = _rgb_teacher(), _stream(tmp_path)
    calls = _counted(teacher)
    caplog.set_level(logging.INFO, logger="kdtrain")
    args = _stream_args(teacher, data, tmp_path / "cache", dtype=dtype)
    first = obtain("auto", **args)
    assert sum(calls) == len(data) and "memory-mapped in" in caplog.text and "teacher cache: wrote" in caplog.text
    sidecar = mapped_file(tmp_path / "cache", first.key)
    assert {p.name for p in sidecar.parent.iterdir() if not p.name.startswith(".")} == {
        sidecar.name,
        array_file(sidecar, "feature.0").name,
        array_file(sidecar, "feature.1").name,
        array_file(sidecar, "logits").name,
    }
    assert not list(sidecar.parent.glob("*.tmp"))  # the temporary files were moved into place
    assert first.logits.dtype == getattr(torch, dtype) and first.logits.device.type == "cpu"

    calls.clear()
    caplog.clear()
    cache = obtain("disk", **args)  # disk and auto share the stream path's files
    assert calls == [] and "teacher cache: reusing" in caplog.text and cache.key == first.key

    # Lookups by sample index equal a live forward pass of the teacher on the same inputs.
    idx = torch.tensor([22, 0, 7, 13, 7])
    inputs = torch.cat([x for x, _, _ in make_batches(data, 5, CPU, shuffle=False).epoch()])
    want_logits, want_feats = _direct(teacher, inputs[idx], PATHS)
    logits, feats = cache.lookup(idx)
    assert logits.dtype == torch.float32 and [f.shape for f in feats] == [f.shape for f in want_feats]
    torch.testing.assert_close(logits, want_logits, rtol=tol, atol=tol)
    for got, want in zip(feats, want_feats):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_stream_cache_is_memory_mapped_not_loaded(tmp_path: Path) -> None:
    teacher, data = _rgb_teacher(), _stream(tmp_path)
    key = obtain("auto", **_stream_args(teacher, data, tmp_path / "cache")).key
    sidecar = mapped_file(tmp_path / "cache", key)
    cache = TeacherCache.load_mapped(sidecar, key)
    # The tensor's memory is the file's mapping (/proc/self/maps), not a copy read into memory.
    logits_file = str(array_file(sidecar, "logits"))
    spans = [
        [int(a, 16) for a in line.split()[0].split("-")]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if line.endswith(logits_file)
    ]
    assert any(lo <= cache.logits.data_ptr() < hi for lo, hi in spans), spans
    assert cache.logits.shape == (len(data), 10)


def test_stream_cache_damaged_or_stale_files_are_rebuilt(tmp_path: Path, caplog) -> None:
    teacher, data = _rgb_teacher(), _stream(tmp_path)
    calls = _counted(teacher)
    args = _stream_args(teacher, data, tmp_path / "cache")
    first = obtain("auto", **args)
    sidecar = mapped_file(tmp_path / "cache", first.key)
    logits_file = array_file(sidecar, "logits")
    good_logits, good_sidecar = logits_file.read_bytes(), sidecar.read_bytes()
    want = first.lookup(torch.arange(len(data)))[0].clone()
    caplog.set_level(logging.INFO, logger="kdtrain")
    damaged = {
        "a flipped byte": (logits_file, good_logits[:-5] + bytes([good_logits[-5] ^ 0xFF]) + good_logits[-4:]),
        "a truncated array": (logits_file, good_logits[: len(good_logits) // 2]),
        "a missing array": (logits_file, None),
        "a torn sidecar": (sidecar, good_sidecar[:40]),
        "another key's sidecar": (sidecar, good_sidecar.replace(first.key.encode(), b"0" * 64)),
        "JSON, not a sidecar": (sidecar, b'{"key": 1, "identity": []}'),
    }
    for why, (file, content) in damaged.items():
        file.unlink()
        if content is not None:
            file.write_bytes(content)
        calls.clear()
        caplog.clear()
        rebuilt = obtain("auto", **args)
        assert "rebuilding it" in caplog.text and "teacher cache: wrote" in caplog.text, why
        assert sum(calls) == len(data), why
        assert torch.equal(rebuilt.lookup(torch.arange(len(data)))[0], want), why
        assert logits_file.read_bytes() == good_logits, why

    # A killed build's temporary files are removed by the next build of the key.
    (tmp_path / "cache" / f".{logits_file.name}.999.tmp").write_bytes(b"partial")
    sidecar.unlink()
    obtain("auto", **args)
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_stream_cache_key_follows_the_images_rows_and_transform(tmp_path: Path) -> None:
    teacher, data = _rgb_teacher(), _stream(tmp_path)
    base = cache_key(_identity(teacher, data, dataset_cfg=STREAM_DATASET))
    changed = {
        "rows": cache_key(_identity(teacher, data.subset(torch.arange(22)), dataset_cfg=STREAM_DATASET)),
        "image size": cache_key(_identity(teacher, data, dataset_cfg={**STREAM_DATASET, "image_size": 32})),
        "float16": cache_key(_identity(teacher, data, dataset_cfg=STREAM_DATASET, dtype="float16")),
        "transform": cache_key(_identity(teacher, dataclasses.replace(data, size=24), dataset_cfg=STREAM_DATASET)),
    }
    # Workers and the memory budget change how fast images are read, not the inputs: the same key.
    assert cache_key(_identity(teacher, data, dataset_cfg={**STREAM_DATASET, "workers": 7})) == base
    data.source.files[3].write_bytes(data.source.files[0].read_bytes())  # one image replaced
    changed["an image"] = cache_key(_identity(teacher, data, dataset_cfg=STREAM_DATASET))
    assert all(key != base for key in changed.values()), [k for k, v in changed.items() if v == base]


def test_stream_policies(tmp_path: Path, caplog) -> None:
    teacher, data = _rgb_teacher(), _stream(tmp_path, 5)
    assert obtain("off", **_stream_args(teacher, data, tmp_path / "cache")) is None
    in_memory = obtain("memory", **_stream_args(teacher, data, tmp_path / "cache"))
    assert in_memory.logits.shape == (5, 10) and not (tmp_path / "cache").exists()  # memory writes no file
    # Under RandomResizedCrop + flip (dataset.augment=true) the teacher runs every step.
    augmented = _stream_args(
        teacher,
        dataclasses.replace(data, augment=True),
        tmp_path / "cache",
        dataset_cfg={**STREAM_DATASET, "augment": True},
    )
    caplog.set_level(logging.INFO, logger="kdtrain")
    assert obtain("auto", **augmented) is None
    assert "randomly augmented so the teacher runs every step (dataset.augment=false" in caplog.text
    with pytest.raises(
        UserError, match="teacher_cache=disk needs deterministic training inputs.*dataset.augment=false"
    ):
        obtain("disk", **augmented)
    with pytest.raises(UserError, match="teacher_cache_views=2 replays crops of images held in memory"):
        obtain("auto", **{**augmented, "views": 2})
    assert not (tmp_path / "cache").exists()


def test_stream_cache_that_cannot_be_written_runs_the_teacher(tmp_path: Path, caplog, monkeypatch) -> None:
    teacher, data = _rgb_teacher(), _stream(tmp_path, 5)
    folder = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="kdtrain")

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)  # the files are reserved before the teacher fills them
    assert obtain("auto", **_stream_args(teacher, data, folder)) is None
    assert "its file system is full" in caplog.text and "the teacher runs every step" in caplog.text
    assert not [p for p in folder.iterdir() if p.suffix != ".lock"]  # no partial file left

    def read_only(path: Path, what: str):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    caplog.clear()
    monkeypatch.setattr(teacher_cache, "file_lock", read_only)
    assert obtain("auto", **_stream_args(teacher, data, folder)) is None
    assert "not writable" in caplog.text and "the teacher runs every step" in caplog.text


def test_a_stream_run_with_the_cache_matches_the_teacher_every_step_and_a_rerun_reuses_it(
    compose, tmp_path, caplog
) -> None:
    root = tmp_path / "images"
    write_imagefolder(root, classes=("a", "b"), per_class=(20, 4), size=(20, 16))
    args = [
        "dataset=imagefolder",
        f"dataset.root={root}",
        "dataset.image_size=16",
        "dataset.loader=stream",
        "dataset.augment=false",
        "dataset.workers=0",
        "batch_size=8",
        "teacher_train.batch_size=8",
        "baseline=false",
        "epochs=1",
        "mode=combined",
        "feature.pairs=[{student: auto, teacher: auto}]",
        f"teacher_cache_dir={tmp_path / 'cache'}",
    ]
    caplog.set_level(logging.INFO, logger="kdtrain")
    run(compose(*args, "teacher_cache=off"), tmp_path / "off")
    assert "teacher cache" not in caplog.text
    run(compose(*args), tmp_path / "auto")
    assert "memory-mapped in" in caplog.text and "teacher cache: wrote" in caplog.text
    (off,), (cached,) = _losses(tmp_path / "off"), _losses(tmp_path / "auto")
    for key in LOSS_COLUMNS:
        assert cached[key] == pytest.approx(off[key], rel=1e-4, abs=1e-6), key
    assert cached["val_acc"] == off["val_acc"] and cached["train_acc"] == off["train_acc"]
    assert cached["kd"] > 0 and cached["feat"] > 0
    caplog.clear()
    run(compose(*args, "seed=1"), tmp_path / "again")
    assert "teacher cache: reusing" in caplog.text and "computed once" not in caplog.text
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())["teacher_cache"]
    assert summary["policy"] == "auto" and (tmp_path / "cache" / f"teacher-{summary['key'][:24]}.json").is_file()


def test_stream_cache_with_bad_images_skipped_says_which_rows_are_empty(tmp_path: Path, caplog) -> None:
    teacher, data = _rgb_teacher(), _stream(tmp_path, 6)
    data.source.files[4].write_bytes(b"not an image")
    skip = dataclasses.replace(data, bad_images="skip")
    caplog.set_level(logging.WARNING, logger="kdtrain")
    cache = obtain("auto", **_stream_args(teacher, skip, tmp_path / "cache"))
    assert "teacher cache: 1 of 6 training images could not be read; their rows stay empty" in caplog.text
    good = torch.tensor([0, 1, 2, 3, 5])
    inputs = torch.cat([x for x, _, _ in make_batches(skip, 6, CPU, shuffle=False).epoch()])  # row 4: a copy
    torch.testing.assert_close(cache.lookup(good)[0], _direct(teacher, inputs[good], [])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~30 s: three processes
def test_torchrun_ranks_reuse_the_stream_cache_and_match_one_process(tmp_path) -> None:
    """One process builds the stream path's cache; under torchrun both ranks map the same files (neither
    reads the training set a second time to rebuild it) and train as the one process did."""
    from tests.test_resume import rows
    from tests.test_stream import _free_port

    root = tmp_path / "images"
    write_imagefolder(root, classes=("a", "b"), per_class=(20, 4), size=(20, 16))
    common = [
        "dataset=imagefolder",
        f"dataset.root={root}",
        "dataset.image_size=16",
        "dataset.loader=stream",
        "dataset.augment=false",
        "dataset.workers=1",
        "teacher_train.batch_size=8",
        "baseline=false",
        "epochs=2",
        "teacher_train.epochs=1",
        "progress=off",
        f"teacher_store={tmp_path / 'teachers'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("HYDRA_FULL_ERROR", None)
    probe = ["-m", "tests._read_probe", *common]
    single = subprocess.run(
        [sys.executable, *probe, "batch_size=8", f"hydra.run.dir={tmp_path / 'single'}"],
        env={**env, "KDTRAIN_TEST_READS": str(tmp_path / "single-reads")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert "teacher cache: wrote" in single.stderr + single.stdout
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2"]
    ddp = subprocess.run(
        [*torchrun, "--master-addr=127.0.0.1", f"--master-port={_free_port()}", *probe, "batch_size=4"]
        + [f"hydra.run.dir={tmp_path / 'ddp'}"],
        env={**env, "KDTRAIN_TEST_READS": str(tmp_path / "reads")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "teacher cache: reusing" in ddp.stderr + ddp.stdout  # rank 0's log (the other ranks log nothing)
    for rank in (0, 1):  # 2 epochs x its 20 of the 40 training images: no read to build a cache
        reads = (tmp_path / f"reads.{rank}").read_text().splitlines()
        assert len([p for p in reads if "/train/" in p]) == 40, rank
    for a, b in zip(rows(tmp_path / "ddp"), rows(tmp_path / "single"), strict=True):
        for key in ("loss", "ce", "kd"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), key
        assert a["val_acc"] == b["val_acc"]


@pytest.mark.gpu
def test_stream_cache_on_cuda_stays_on_the_host_and_looks_up_to_the_device(tmp_path: Path) -> None:
    cuda = torch.device("cuda")
    teacher, data = _rgb_teacher().to(cuda), _stream(tmp_path)
    cache = obtain("auto", **_stream_args(teacher, data, tmp_path / "cache", device=cuda))
    assert cache.logits.device.type == "cpu"  # the mapped file, not a copy on the GPU
    idx = torch.tensor([22, 0, 7], device=cuda)
    logits, feats = cache.lookup(idx)
    assert logits.device == feats[0].device == idx.device
    inputs = torch.cat([x for x, _, _ in make_batches(data, 8, cuda, shuffle=False).epoch()])
    want_logits, want_feats = _direct(teacher, inputs[idx], PATHS)
    torch.testing.assert_close(logits, want_logits, rtol=1e-3, atol=1e-3)  # cuDNN may round per batch shape
    for got, want in zip(feats, want_feats):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_stream_topk_cache_maps_its_three_files_and_equals_the_in_memory_one(tmp_path: Path) -> None:
    teacher, data = _rgb_teacher(), _stream(tmp_path, 9)
    args = _stream_args(teacher, data, tmp_path / "cache", feature_paths=[], topk=3, dtype="float16")
    key = obtain("auto", **args).key
    sidecar = mapped_file(tmp_path / "cache", key)
    assert all(array_file(sidecar, name).is_file() for name in ("topk_values", "topk_indices", "topk_fill"))
    mapped = obtain("auto", **args)  # reused from the files
    in_memory = TeacherCache.build(teacher, data, CPU, None, topk=3, fp16=True, batch_size=4)
    idx = torch.arange(9)
    assert mapped.topk_indices.dtype == torch.int32
    torch.testing.assert_close(mapped.lookup(idx)[0], in_memory.lookup(idx)[0], rtol=1e-3, atol=1e-3)
