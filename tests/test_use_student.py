"""Using a trained student: kdtrain-eval, kdtrain-export and kdtrain-predict on one tiny finished run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdtrain.errors import UserError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished digits run (2 epochs, teacher 2 epochs, no baseline): a few seconds on a CPU."""
    tmp = tmp_path_factory.mktemp("use_student")
    cmd = [
        sys.executable,
        "-m",
        "kdtrain",
        "epochs=2",
        "teacher_train.epochs=2",
        "baseline=false",
        "progress=off",
        "device=cpu",
        f"hydra.run.dir={tmp / 'run'}",
        f"teacher_store={tmp / 'teachers'}",
    ]
    done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def images(run_dir: Path) -> tuple[Path, np.ndarray]:
    """A folder of digits-like 8x8 grayscale PNGs (some in a subfolder) plus one corrupt file."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = run_dir.parent / "images"
    (folder / "more").mkdir(parents=True)
    pixels = np.round(load_digits().images[:24] / 16 * 255).astype(np.uint8)
    for i, arr in enumerate(pixels):
        Image.fromarray(arr, mode="L").save(folder / ("more" if i % 3 == 0 else ".") / f"digit_{i:02d}.png")
    (folder / "broken.png").write_bytes(b"this is not a png")
    return folder, pixels


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> Path:
    from kdtrain.export import export

    formats = ["export", "torchscript"]
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401

        formats.append("onnx")
    except ImportError:
        pass
    export(str(run_dir), formats, run_dir / "export", None, [])
    return run_dir / "export"


def _val_batch(run_dir: Path) -> torch.Tensor:
    from kdtrain.rundir import build_splits, open_run

    return build_splits(open_run(run_dir), [])[0].val.x[:33]  # an odd size, unlike the export's trace batch


def _exit_code_and_stderr(capsys, main, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


def test_eval_reproduces_the_runs_last_accuracy(run_dir: Path, summary: dict, tmp_path: Path):
    from kdtrain.evaluate import main

    out = tmp_path / "eval.json"
    main([str(run_dir), "--checkpoint", "last", "--json", str(out), "--device", "cpu"])
    report = json.loads(out.read_text())
    m = report["metrics"]
    assert 0 <= m["top1"] <= 1
    assert m["top1"] == pytest.approx(summary["student"]["last_val_acc"], abs=1e-6)
    assert m["agreement"] == pytest.approx(summary["student"]["agreement"], abs=1e-6)
    assert m["top1"] <= m["top5"] <= 1
    assert 0 <= m["ece"] <= 1
    assert len(m["per_class"]) == 10 and sum(row["support"] for row in m["per_class"]) == m["samples"] == 500
    assert np.array(m["confusion"]).sum() == 500 and np.trace(np.array(m["confusion"])) == round(m["top1"] * 500)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert report["confusion_png"] is None
    else:
        assert Path(report["confusion_png"]).stat().st_size > 1000


def test_eval_refuses_a_teacher_that_fails_its_checksum(run_dir: Path, summary: dict, tmp_path: Path, capsys):
    from kdtrain.evaluate import main

    weights = Path(summary["teacher"]["source"]) / "teacher.safetensors"
    good = weights.read_bytes()
    try:
        weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one flipped bit, meta.json's sha256 unchanged
        code, err = _exit_code_and_stderr(capsys, main, [str(run_dir), "--teacher", "--device", "cpu"])
    finally:
        weights.write_bytes(good)
    assert code == 2 and "fail the sha256" in err and str(weights) in err


def test_eval_teacher_matches_the_runs_teacher(run_dir: Path, summary: dict, tmp_path: Path):
    from kdtrain.evaluate import main

    out = tmp_path / "teacher.json"
    main([str(run_dir), "--teacher", "--json", str(out), "--device", "cpu"])
    report = json.loads(out.read_text())
    assert report["role"] == "teacher" and report["agreement_with"] == "student"
    assert report["metrics"]["top1"] == pytest.approx(summary["teacher"]["val_acc"], abs=1e-6)


def test_expected_calibration_error_known_answer():
    from kdtrain.evaluate import expected_calibration_error

    # Two samples at confidence 0.9 (one right) and two at 0.6 (both right): (2/4)*|0.5-0.9| + (2/4)*|1-0.6| = 0.4
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(probs, y) == pytest.approx(0.4, abs=1e-6)


def test_eval_rejects_a_bad_override_in_one_line(run_dir: Path, capsys):
    from kdtrain.evaluate import main

    code, err = _exit_code_and_stderr(capsys, main, [str(run_dir), "dataset.val_size=abc"])
    assert code == 2 and err.count("\n") == 1 and err.startswith("kdtrain-eval: error: dataset.val_size=abc")
    code, err = _exit_code_and_stderr(capsys, main, [str(run_dir), "lr=0.1"])
    assert code == 2 and "not a dataset override" in err


def test_torch_export_program_matches_pytorch(run_dir: Path, exported: Path):
    from kdtrain.rundir import load_student_file

    meta = json.loads((exported / "model.json").read_text())
    assert meta["files"]["export"]["file"] == "model.pt2" and meta["files"]["export"]["parity_max_abs_diff"] < 1e-4
    module = torch.export.load(str(exported / "model.pt2")).module()  # our own file: trusted here
    student = load_student_file(run_dir / "student.safetensors").model
    for x in (_val_batch(run_dir), _val_batch(run_dir)[:3]):  # the batch dimension is dynamic
        with torch.no_grad():
            assert (module(x) - student(x)).abs().max().item() < 1e-4


def test_predict_refuses_a_pt2_program(exported: Path, images, tmp_path: Path, capsys):
    from kdtrain.predict import main

    with pytest.raises(SystemExit) as exited:
        main([str(exported / "model.pt2"), str(images[0]), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and "loads through pickle" in err
    assert not (tmp_path / "p.csv").exists()


def test_predict_from_a_bare_safetensors_names_the_classes(run_dir: Path, images, tmp_path: Path):
    from kdtrain.predict import main
    from kdtrain.rundir import read_meta

    bare = tmp_path / "alone" / "student.safetensors"  # away from its run dir: only the file's metadata is left
    bare.parent.mkdir()
    bare.write_bytes((run_dir / "student.safetensors").read_bytes())
    assert read_meta(bare)["class_names"] == [str(i) for i in range(10)]
    main([str(bare), str(images[0]), "--out", str(tmp_path / "p.csv")])
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert rows and all(r["class"] == r["pred"] for r in rows)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_matches_pytorch(run_dir: Path, exported: Path):
    from kdtrain.rundir import load_student_file

    meta = json.loads((exported / "model.json").read_text())
    assert meta["in_shape"] == [1, 8, 8] and meta["num_classes"] == 10 and meta["class_names"][3] == "3"
    assert meta["input"]["shape"][0] == "batch" and meta["input"]["dtype"] == "float32"
    assert len(meta["mean"]) == len(meta["std"]) == 1 and meta["preprocessing"]["color"] == "L"
    assert meta["files"]["torchscript"]["parity_max_abs_diff"] < 1e-4
    module = torch.jit.load(str(exported / "model.pt"))
    student = load_student_file(run_dir / "student.safetensors").model
    x = _val_batch(run_dir)
    with torch.no_grad():
        assert (module(x) - student(x)).abs().max().item() < 1e-4


def test_onnx_export_matches_pytorch(run_dir: Path, exported: Path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from kdtrain.rundir import load_student_file

    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    x = _val_batch(run_dir)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = load_student_file(run_dir / "student.safetensors").model(x).numpy()
    assert got.shape == (33, 10) and np.abs(got - want).max() < 1e-4


def test_predict_on_a_folder_agrees_with_the_student(run_dir: Path, images, tmp_path: Path, capsys):
    from kdtrain.predict import main
    from kdtrain.rundir import load_student_file, read_meta

    folder, pixels = images
    out = tmp_path / "preds.csv"
    main([str(run_dir), str(folder), "--out", str(out), "--batch-size", "10"])
    assert "skipped" in capsys.readouterr().err  # the corrupt file: a warning, not a failure
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(pixels)
    assert set(rows[0]) == {"path", "pred", "prob", "class"}
    assert all(0 <= int(r["pred"]) < 10 and 0 < float(r["prob"]) <= 1 and r["class"] == r["pred"] for r in rows)

    # The same images preprocessed by hand (8-bit / 255, then the recorded mean/std) through the PyTorch student.
    meta = read_meta(run_dir / "student.safetensors")
    x = (torch.tensor(pixels, dtype=torch.float32)[:, None] / 255 - meta["mean"][0]) / meta["std"][0]
    with torch.no_grad():
        expected = load_student_file(run_dir / "student.safetensors").model(x).argmax(1).tolist()
    by_name = {Path(r["path"]).name: int(r["pred"]) for r in rows}
    assert [by_name[f"digit_{i:02d}.png"] for i in range(len(pixels))] == expected


def test_predict_with_exports_gives_the_same_csv(run_dir: Path, exported: Path, images, tmp_path: Path):
    from kdtrain.predict import main

    folder, _ = images
    outputs = []
    models = [run_dir] + [exported / f for f in ("model.pt", "model.onnx") if (exported / f).exists()]
    for i, model in enumerate(models):
        out = tmp_path / f"{i}.csv"
        main([str(model), str(folder), "--out", str(out)])
        outputs.append(
            [(r["path"], r["pred"], r["class"], round(float(r["prob"]), 4)) for r in csv.DictReader(out.open())]
        )
    assert all(o == outputs[0] for o in outputs[1:])


def test_predict_without_images_is_a_user_error(run_dir: Path, tmp_path: Path):
    from kdtrain.predict import find_images

    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="holds no images"):
        find_images(tmp_path)


def test_corrupt_safetensors_exits_2_with_one_line(run_dir: Path, images, tmp_path: Path):
    folder, _ = images
    bad = tmp_path / "student.safetensors"
    bad.write_bytes((run_dir / "student.safetensors").read_bytes()[:100])
    done = subprocess.run(
        [sys.executable, "-m", "kdtrain.predict", str(bad), str(folder), "--out", str(tmp_path / "p.csv")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdtrain-predict: error: ") and "corrupt" in lines[0]
    assert not (tmp_path / "p.csv").exists()


# --- files are data: a model spec read from a file never runs code -----------------------------------


def _evil(sentinel: Path) -> dict:
    """The exploit of issue 13: a "model" whose constructor is os.system."""
    return {"name": "custom", "_target_": "os.system", "command": f"touch {sentinel}"}


def _with_model(src: Path, dst: Path, model: dict) -> Path:
    """A copy of the student.safetensors `src` whose metadata names `model`."""
    from safetensors.torch import load_file

    from kdtrain.checkpoint import save_weights
    from kdtrain.rundir import read_meta

    save_weights(load_file(str(src)), dst, {**read_meta(src), "model": model})
    return dst


def _run_with_student(run_dir: Path, dst: Path, student: dict) -> Path:
    """A copy of the run dir whose .hydra/config.yaml names `student`."""
    import shutil

    from omegaconf import OmegaConf

    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("export", "eval*"))
    cfg = OmegaConf.load(dst / ".hydra" / "config.yaml")
    cfg.student = student
    OmegaConf.save(cfg, dst / ".hydra" / "config.yaml")
    return dst


@pytest.mark.parametrize("tool", ["predict-safetensors", "predict-run", "eval", "export"])
def test_a_custom_target_in_a_file_is_refused_before_anything_runs(run_dir, images, tmp_path, capsys, tool):
    from kdtrain import evaluate, export, predict

    sentinel = tmp_path / "PWNED"
    folder, _ = images
    if tool == "predict-safetensors":
        evil = _with_model(run_dir / "student.safetensors", tmp_path / "evil.safetensors", _evil(sentinel))
        main, argv, source = predict.main, [str(evil), str(folder), "--out", str(tmp_path / "p.csv")], evil
    else:
        evil = _run_with_student(run_dir, tmp_path / "evil_run", _evil(sentinel))
        source = evil / ".hydra" / "config.yaml"
        main, argv = {
            "predict-run": (predict.main, [str(evil), str(folder), "--out", str(tmp_path / "p.csv")]),
            "eval": (evaluate.main, [str(evil), "--device", "cpu"]),
            "export": (export.main, [str(evil), "--out", str(tmp_path / "export")]),
        }[tool]
    code, err = _exit_code_and_stderr(capsys, main, argv)
    assert not sentinel.exists()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdtrain-"), lines
    assert f": error: {source} names a custom student model" in lines[0]
    assert "'os.system'" in lines[0] and "--trust-model-code" in lines[0]
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "export").exists()


def test_the_exploit_through_the_cli_creates_no_file(run_dir, images, tmp_path):
    sentinel = tmp_path / "PWNED"
    evil = _with_model(run_dir / "student.safetensors", tmp_path / "evil.safetensors", _evil(sentinel))
    done = subprocess.run(
        [sys.executable, "-m", "kdtrain.predict", str(evil), str(images[0]), "--out", str(tmp_path / "p.csv")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert not sentinel.exists()
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_trust_model_code_builds_a_custom_model_named_in_a_file(run_dir, images, tmp_path, capsys):
    from kdtrain.predict import main
    from kdtrain.rundir import read_meta

    meta = read_meta(run_dir / "student.safetensors")
    # The registered `mlp` builds kdtrain.models.small.MLP: the same model, named as a custom one.
    custom = {**meta["model"], "name": "custom", "_target_": "kdtrain.models.small.MLP", "in_features": 64}
    weights = _with_model(run_dir / "student.safetensors", tmp_path / "custom.safetensors", custom)
    folder, _ = images
    code, err = _exit_code_and_stderr(capsys, main, [str(weights), str(folder), "--out", str(tmp_path / "a.csv")])
    assert code == 2 and "--trust-model-code" in err
    main([str(weights), str(folder), "--out", str(tmp_path / "a.csv"), "--trust-model-code"])
    main([str(run_dir / "student.safetensors"), str(folder), "--out", str(tmp_path / "b.csv")])
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
