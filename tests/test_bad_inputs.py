"""A table of bad inputs through the CLI: each fails with exit 2 and exactly one line on stderr
(`kdtrain: error: ...`, no traceback), and leaves every file that existed before untouched.

Cases that fail in the command-line check (before Hydra starts) run `kdtrain.cli.main` in-process,
which is the same code path without the interpreter start; the others run `python -m kdtrain`.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

import kdtrain.cli
from kdtrain.models import build_model
from tests.conftest import TINY, run_cli

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


class RunsCode:
    """Unpickling this runs `touch SENTINEL`: what a malicious checkpoint does."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory, store) -> dict[str, Path]:
    """Files a bad command line must not touch: a teacher store, another finished run, the inputs."""
    base = tmp_path_factory.mktemp("bad_inputs")
    fake_store = base / "fake_store"
    (fake_store / "cnn-digits-000000000000").mkdir(parents=True)
    (fake_store / "cnn-digits-000000000000" / "teacher.safetensors").write_bytes(b"not a real teacher")
    (fake_store / "cnn-digits-000000000000" / "meta.json").write_text("{}\n")

    other = base / "other_run"  # a finished run of student=cnn
    (other / "checkpoints").mkdir(parents=True)
    (other / "summary.json").write_text('{"student": {"best_val_acc": 0.5}}\n')
    (other / "metrics.jsonl").write_text('{"epoch": 1}\n')
    import hydra

    with hydra.initialize_config_module(config_module="kdtrain.conf", version_base="1.3"):
        from omegaconf import OmegaConf

        cfg = hydra.compose("config", overrides=[*TINY, "student=cnn", f"teacher_store={fake_store}"])
        config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    state = {
        "model": {},
        "adapter": {},
        "optimizer": {},
        "scheduler": {},
        "scaler": {},
        "epoch": 1,
        "step": 21,
        "rng": {},
        "history": [{"epoch": 1}],
        "config": config,
    }
    torch.save(state, other / "checkpoints" / "last.pt")

    inputs = base / "inputs"
    inputs.mkdir()
    good = inputs / "good.pt"
    torch.save({"model": torch.zeros(3)}, good)
    (inputs / "corrupt.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save(build_model({"name": "cnn"}, 5, (1, 8, 8), "teacher").state_dict(), inputs / "teacher_5_classes.pt")
    with open(inputs / "evil.pt", "wb") as f:
        pickle.dump({"model": RunsCode(base / "SENTINEL")}, f)
    torch.save({"model": RunsCode(base / "SENTINEL")}, inputs / "evil_zip.pt")
    (inputs / "afile").write_text("a regular file, not a folder\n")
    (inputs / "empty_mnist").mkdir()
    (inputs / "empty_images" / "train").mkdir(parents=True)
    (inputs / "empty_images" / "val").mkdir(parents=True)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (inputs / "bad_images" / split / c).mkdir(parents=True)
            Image.new("L", (8, 8)).save(inputs / "bad_images" / split / c / "ok.png")
        (inputs / "one_class" / split / "a").mkdir(parents=True)
        Image.new("L", (8, 8)).save(inputs / "one_class" / split / "a" / "ok.png")
    (inputs / "bad_images" / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (inputs / "user_dir").mkdir()  # a folder of the user's, not a kdtrain run, with a file named like ours
    (inputs / "user_dir" / "metrics.csv").write_text("epoch,my_metric\n1,0.5\n")
    # Checkpoints that fit the config (student=cnn) but hold damaged progress: RNG states, metrics history.
    good_state = {**state, "rng": {"torch": torch.get_rng_state(), "batches": torch.get_rng_state(), "python": []}}
    good_state["history"] = [{"epoch": 1, "val_acc": 0.5}]
    torch.save({**good_state, "rng": {"torch": torch.zeros(7, dtype=torch.uint8)}}, inputs / "bad_rng.pt")
    torch.save({**good_state, "history": "abc"}, inputs / "bad_history.pt")
    return {"base": base, "fake_store": fake_store, "other": other, "inputs": inputs, "store": store}


def snapshot(world: dict[str, Path]) -> dict[str, tuple[bytes, int] | None]:
    out: dict[str, tuple[bytes, int] | None] = {}
    for key in ("fake_store", "other", "inputs"):
        for p in sorted(world[key].rglob("*")):
            out[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
    return out


# (id, arguments with {fake_store}, {other}, {inputs}, {store} placeholders, text the error names, where it fails)
# "pre": in the command-line check, run in-process; "run": inside the task, run in a subprocess.
CASES = [
    ("unknown-teacher", ["teacher=bogus"], "teacher=bogus is not a known option", "pre"),
    ("unknown-student", ["student=resnet21"], "student=resnet21 is not a known option", "pre"),
    ("unknown-dataset", ["dataset=bogus"], "dataset=bogus is not a known option", "pre"),
    ("wrong-type-float", ["temperature=abc"], "temperature=abc is not accepted", "pre"),
    ("wrong-type-int", ["epochs=1.5"], "epochs=1.5 is not accepted", "pre"),
    ("out-of-range-lr", ["lr=-1"], "lr=-1.0 is out of range", "pre"),
    ("out-of-range-momentum", ["optimizer.momentum=1.5"], "optimizer.momentum=1.5 is out of range", "pre"),
    ("misspelt-key", ["tempurature=3"], "did you mean temperature", "pre"),
    ("unknown-nan-policy", ["nan_policy=maybe"], "nan_policy=maybe", "pre"),
    ("fp16-on-cpu", ["amp=fp16", "device=cpu"], "amp=fp16 needs a CUDA device", "pre"),
    ("cuda-without-cuda", ["device=cuda"], "CUDA is not available", "pre"),
    ("resume-missing", ["resume={inputs}/nowhere"], "does not exist", "pre"),
    ("resume-corrupt", ["resume={inputs}/corrupt.pt"], "is truncated or corrupt", "pre"),
    ("resume-code-pickle", ["resume={inputs}/evil.pt"], "is not a PyTorch checkpoint", "pre"),
    ("resume-code-torch-save", ["resume={inputs}/evil_zip.pt"], "names Python code (posix.system)", "pre"),
    ("resume-other-architecture", ["resume={other}"], "student.name=cnn but this run has student.name=mlp", "pre"),
    ("run-dir-of-another-run", ["hydra.run.dir={other}"], "already holds a run", "pre"),
    ("run-dir-under-a-file", ["hydra.run.dir={inputs}/afile/run"], "is a file, not a folder", "pre"),
    ("teacher-store-under-a-file", ["teacher_store={inputs}/afile/store"], "is a file, not a folder", "pre"),
    ("mnist-files-missing", ["dataset=mnist", "dataset.root={inputs}/empty_mnist"], "cannot find", "run"),
    ("empty-image-folder", ["dataset=imagefolder", "dataset.root={inputs}/empty_images"], "no class subfolders", "run"),
    ("corrupt-image", ["dataset=imagefolder", "dataset.root={inputs}/bad_images"], "broken.png cannot be read", "run"),
    ("batch-larger-than-data", ["batch_size=5000"], "larger than the training set", "run"),
    ("excluded-class-out-of-range", ["dataset.exclude_classes=[11]"], "not a class of digits", "run"),
    (
        "no-feature-layer",
        ["mode=feature", "student=custom", "student._target_=tests.models.NoLinear"],
        "has no nn.Linear classifier",
        "run",
    ),
    (
        "teacher-other-classes",
        ["teacher.checkpoint={inputs}/teacher_5_classes.pt"],
        "(5, 128) in the file but (10, 128)",
        "run",
    ),
    ("teacher-corrupt", ["teacher.checkpoint={inputs}/corrupt.pt"], "is truncated or corrupt", "run"),
    ("teacher-code-pickle", ["teacher.checkpoint={inputs}/evil.pt"], "is not a PyTorch checkpoint", "run"),
    ("teacher-code-torch-save", ["teacher.checkpoint={inputs}/evil_zip.pt"], "names Python code (posix.system)", "run"),
    ("diverging-lr", ["lr=1e6", "teacher_store={store}"], "non-finite", "run"),
    # Issue #13: values that got a traceback or a wrong message.
    ("seed-beyond-64-bits", ["seed=99999999999999999999999"], "seed=99999999999999999999999 is out of range", "pre"),
    (
        "teacher-seed-beyond-64-bits",
        ["teacher_train.seed=1180591620717411303424"],
        "teacher_train.seed=1180591620717411303424 is out",
        "pre",
    ),
    ("split-seed-negative", ["dataset.split_seed=-1"], "dataset.split_seed=-1 is out of range", "pre"),
    (
        "feature-pair-weight-not-a-number",
        ["mode=feature", "feature.pairs=[{{student: fc, teacher: fc, weight: abc}}]"],
        "feature.pairs[0].weight=abc is not accepted",
        "pre",
    ),
    ("run-dir-unicode-unquoted", ["hydra.run.dir={base}/r\u00fcn"], "cannot parse", "pre"),
    ("run-dir-newline", ["hydra.run.dir='{base}/a\nb'"], "holds a control character", "pre"),
    ("run-dir-comma-unquoted", ["hydra.run.dir={base}/a,b"], "lists several values", "pre"),
    ("temperature-inf", ["temperature=inf"], "temperature=inf is not accepted: it must be a finite number", "pre"),
    ("lr-inf", ["lr=inf"], "lr=inf is not accepted", "pre"),
    ("model-option-inf", ["student.dropout=inf"], "student.dropout=inf is not accepted", "pre"),
    ("betas-nan", ["optimizer.betas=[nan,0.9]"], "optimizer.betas[0]=nan is not accepted", "pre"),
    ("temperature-kd-underflows", ["temperature=1e-30"], "the KD term's gradient vanishes", "pre"),
    ("exclude-class-twice", ["dataset.exclude_classes=[3,3,3,3,3,3,3,3,3,3]"], "lists class 3 more than once", "pre"),
    ("resume-bad-rng", ["student=cnn", "resume={inputs}/bad_rng.pt"], "random-number-generator states", "pre"),
    ("resume-bad-history", ["student=cnn", "resume={inputs}/bad_history.pt"], "does not match its str", "pre"),
    ("run-dir-of-the-user", ["hydra.run.dir={inputs}/user_dir"], "holds metrics.csv but is not a kdtrain run", "pre"),
    ("one-class-image-folder", ["dataset=imagefolder", "dataset.root={inputs}/one_class"], "has one class", "run"),
    (
        "every-step-skipped",
        ["student=custom", "student._target_=tests.models.NaNLogits", "nan_policy=skip", "teacher_store={store}"],
        "every step of epoch 1 had a non-finite loss",
        "run",
    ),
]
SKIP = {"cuda-without-cuda": (torch.cuda.is_available(), "this machine has CUDA")}


def test_the_table_names_each_case_once_and_covers_both_stages():
    # Case ids are test ids; a duplicate would silently shadow a case. Both stages are exercised: the command
    # line checked before Hydra starts ("pre") and errors found while running, through a real process ("run").
    names = [name for name, *_ in CASES]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    assert {where for *_, where in CASES} == {"pre", "run"}
    assert all(needle for _, _, needle, _ in CASES), "every case names the words its error line must contain"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_with_one_line_and_touches_nothing(case, world, tmp_path, monkeypatch, capsys):
    name, argv, needle, where = case
    skip, reason = SKIP.get(name, (False, ""))
    if skip:
        pytest.skip(reason)
    fill = {k: str(v) for k, v in world.items()}
    args = [a.format(**fill) for a in argv]
    base = ["epochs=1", "teacher_train.epochs=1", "progress=off", "baseline=false"]
    if not any(a.startswith("teacher_store=") for a in args):
        base.append(f"teacher_store={world['fake_store']}")
    if not any(a.startswith("hydra.run.dir=") for a in args):
        base.append(f"hydra.run.dir={tmp_path / 'run'}")
    before = snapshot(world)

    if where == "pre":
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        monkeypatch.setattr(sys, "argv", ["kdtrain", *base, *args])
        monkeypatch.setattr(kdtrain.cli, "task", lambda: pytest.fail("the command-line check let it through"))
        with pytest.raises(SystemExit) as exited:
            kdtrain.cli.main()
        code, captured = exited.value.code, capsys.readouterr()
        stdout, stderr = captured.out, captured.err
        assert not GlobalHydra.instance().is_initialized()
    else:
        result = run_cli(*base, *args, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
        code, stdout, stderr = result.returncode, result.stdout, result.stderr

    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("kdtrain: error: "), stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in stderr + stdout
    assert snapshot(world) == before, "a bad command line changed files that existed before it"
    assert not (world["base"] / "SENTINEL").exists(), "a checkpoint ran code"


def test_hydra_full_error_shows_the_traceback_of_a_user_error(tmp_path, world, monkeypatch):
    """HYDRA_FULL_ERROR=1 is for debugging: user errors then keep their traceback, in the check and in the task."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["kdtrain", "temperature=0"])
    with pytest.raises(kdtrain.cli.UserError, match="temperature"):
        kdtrain.cli.main()

    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdtrain",
            "batch_size=5000",
            "progress=off",
            f"teacher_store={world['fake_store']}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UserError: batch_size=5000 is larger" in result.stderr
