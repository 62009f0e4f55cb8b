"""README "Distill your own classifier": every command of its example block runs, on generated images.

The ImageNet weights the commands download are replaced by random stand-ins placed in a temporary
torch hub cache, and the run is offline (HF_HUB_OFFLINE=1, a dead proxy), so nothing is downloaded.
Sizes are shrunk (32-pixel images, 1-2 epochs); the commands are otherwise the README's. `-m slow`
runs all of them as written (~65 s of CPU); the default suite runs the first two (training, and the
teacher's evaluation from the store) with a ResNet-18 teacher instead of the ResNet-50.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import models

README = Path(__file__).resolve().parents[1] / "README.md"
MODULES = {
    "kdtrain": "kdtrain",
    "kdtrain-eval": "kdtrain.evaluate",
    "kdtrain-export": "kdtrain.export",
    "kdtrain-predict": "kdtrain.predict",
}
# The README's values -> tiny ones; and what the tiny run adds.
SHRINK = {"dataset.image_size": "32", "epochs": "2", "batch_size": "8"}
EXTRA = ["teacher_train.epochs=2", "teacher_train.batch_size=8", "progress=off"]
COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def example_commands() -> list[list[str]]:
    text = README.read_text()
    block = re.search(r"<!-- example: distill-your-own.*?-->\n```bash\n(.*?)```", text, re.DOTALL)
    assert block, "README.md lost its example block"
    return [shlex.split(line) for line in block.group(1).replace("\\\n", " ").splitlines() if line.strip()]


def _images(root: Path) -> None:
    """my_images/{train,val}/<class>/*.png: noisy images of one colour per class, 40x40."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def _stand_in_weights(torch_home: Path, teacher: str) -> None:
    """Random ImageNet-shaped (1000-class) weights where torch hub keeps the DEFAULT downloads."""
    for arch in (teacher, "mobilenet_v3_small"):
        url = models.get_model_weights(arch).DEFAULT.url
        path = torch_home / "hub" / "checkpoints" / Path(url).name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(models.get_model(arch, weights=None).state_dict(), path)


def _shrunk(args: list[str], teacher: str) -> list[str]:
    out = []
    for arg in args:
        key = arg.split("=", 1)[0]
        shrink = {**SHRINK, "teacher.arch": teacher}
        out.append(f"{key}={shrink[key]}" if key in shrink and "=" in arg else arg)
    return out


@pytest.mark.parametrize(("teacher", "steps"), [pytest.param("resnet50", 5, marks=pytest.mark.slow), ("resnet18", 2)])
def test_the_readme_example_runs(tmp_path: Path, teacher: str, steps: int) -> None:
    pytest.importorskip("onnxruntime")
    _images(tmp_path / "my_images")
    _stand_in_weights(tmp_path / "torch", teacher)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(README.parent), os.environ.get("PYTHONPATH", "")]),
        "TORCH_HOME": str(tmp_path / "torch"),
        "HF_HUB_OFFLINE": "1",  # kdtrain's offline mode: a download would be an error
        "HTTPS_PROXY": "http://127.0.0.1:9",  # and any other connection is refused
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    env.pop("HYDRA_FULL_ERROR", None)
    commands = example_commands()
    assert [c[0] for c in commands] == [
        "kdtrain",
        "kdtrain-eval",
        "kdtrain-eval",
        "kdtrain-export",
        "kdtrain-predict",
    ]
    outputs = []
    for program, *args in commands[:steps]:
        args = _shrunk(args, teacher) + (EXTRA if program == "kdtrain" else [])
        proc = subprocess.run(
            [sys.executable, "-m", MODULES[program], *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"{program} {shlex.join(args)}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout + proc.stderr)
        if program == "kdtrain":  # the other commands must not need the pretrained files any more
            shutil.rmtree(tmp_path / "torch")
    run_dir = tmp_path / "outputs" / "my_classifier"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["teacher"]["name"] == "torchvision" and summary["baseline"] is not None
    assert "Distillation gain over the student alone" in outputs[0] and "Compression (teacher / student)" in outputs[0]
    log = (run_dir / "kdtrain.log").read_text()
    assert "training its classifier net.fc alone for 1 epoch(s)" in log  # teacher_train=finetune
    teacher_meta = json.loads((tmp_path / summary["teacher"]["source"] / "meta.json").read_text())
    assert teacher_meta["recipe"]["lr"] == 0.005 and teacher_meta["model"]["arch"] == teacher
    assert (run_dir / "eval-teacher.json").is_file()
    if steps < len(commands):
        return
    assert (run_dir / "eval.json").is_file()
    assert (run_dir / "export" / "model.onnx").is_file()
    with open(tmp_path / "preds.csv") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == 12 and {p["class"] for p in preds} <= set(COLOURS)
