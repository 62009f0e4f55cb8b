"""dataset=imagenet on a generated ILSVRC2012 layout (a few classes of a few JPEGs), and the ImageNet recipes."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest

from kdtrain.data import build_dataset, dataset_shape
from kdtrain.errors import UserError
from kdtrain.run import run
from kdtrain.rundir import read_meta
from tests._dataset_files import IMAGENET_WNIDS, write_imagenet
from tests.test_datasets import dcfg

RECIPES = ("imagenet_resnet34_resnet18_kd", "imagenet_resnet50_mobilenetv2_kd")


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    write_imagenet(root)
    (root / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"  # n01484850 left out
    )
    return root


def test_imagenet_reads_the_class_folders(imagenet_root: Path) -> None:
    splits = build_dataset(dcfg("imagenet", imagenet_root, image_size=16, augment=False))
    assert splits.num_classes == 3 and splits.in_shape == (3, 16, 16)
    assert splits.train.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # classes: the sorted wnid folders
    assert splits.val.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert splits.mean == [0.485, 0.456, 0.406]
    # Readable names from LOC_synset_mapping.txt; a wnid the file lacks keeps its id.
    assert splits.class_names == ["tench, Tinca tinca", "goldfish, Carassius auratus", IMAGENET_WNIDS[2]]
    # The shape without decoding: 224 px unless dataset.image_size says otherwise.
    assert dataset_shape(dcfg("imagenet", imagenet_root)) == (3, (3, 224, 224))


def test_imagenet_without_the_synset_file_names_classes_by_folder(tmp_path: Path) -> None:
    write_imagenet(tmp_path, per_class=(2, 1))
    splits = build_dataset(dcfg("imagenet", tmp_path, image_size=8))
    assert splits.class_names == list(IMAGENET_WNIDS)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: None, r"set dataset.root=PATH, the folder that holds ILSVRC2012's train/<wnid>"),
        (lambda r: (r / "LOC_synset_mapping.txt").write_text("n01440764\n"), r"line 1 is not '<wnid> <name>'"),
        (lambda r: (r / "val" / "n99999999").mkdir(), r"val/n99999999 is a class that .*train lacks"),
    ],
)
def test_imagenet_layout_errors(tmp_path: Path, damage, message: str) -> None:
    write_imagenet(tmp_path, per_class=(1, 1))
    damage(tmp_path)
    with pytest.raises(UserError, match=message):
        build_dataset(dcfg("imagenet", None if "root=PATH" in message else tmp_path, image_size=8))


def test_imagenet_flat_val_says_how_to_sort_it(tmp_path: Path) -> None:
    write_imagenet(tmp_path, per_class=(1, 2), flat_val=True)  # val/ as the archive comes: 6 files, no folders
    for build in (build_dataset, dataset_shape):
        with pytest.raises(UserError, match=r"holds its 6 images directly .* sort them into val/<wnid>/"):
            build(dcfg("imagenet", tmp_path))


@pytest.mark.parametrize("name", RECIPES)
def test_imagenet_recipes_hold_the_published_settings(name: str) -> None:
    with hydra.initialize_config_module(config_module="kdtrain.conf", version_base="1.3"):
        cfg = hydra.compose("config", overrides=[f"experiment={name}"])
    assert (cfg.dataset.name, cfg.dataset.image_size, cfg.dataset.augment) == ("imagenet", 224, True)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.optimizer.name, cfg.optimizer.weight_decay) == (
        100,
        256,
        0.1,
        "sgd",
        1e-4,
    )
    assert (cfg.scheduler.name, list(cfg.scheduler.milestones), cfg.scheduler.gamma) == ("multistep", [30, 60, 90], 0.1)
    assert (cfg.teacher.name, cfg.teacher.pretrained, cfg.teacher_train.epochs) == ("torchvision", "DEFAULT", 0)
    assert (cfg.student.name, cfg.student.pretrained) == ("torchvision", None)
    assert (cfg.mode.value, cfg.temperature, cfg.ce_weight, cfg.kd_weight) == ("soft", 1.0, 0.5, 0.5)


@pytest.mark.slow  # ~10 s on 2 shared cores: resnet34 -> resnet18 for an epoch
def test_imagenet_recipe_runs_end_to_end(compose, imagenet_root: Path, tmp_path: Path) -> None:
    # The recipe shrunk to one epoch of 32 px images; a teacher without pretrained weights (no download).
    cfg = compose(
        "experiment=imagenet_resnet34_resnet18_kd",
        f"dataset.root={imagenet_root}",
        "dataset.image_size=32",
        "teacher.pretrained=null",
        "teacher_train.epochs=0",  # the recipe's (the tests' compose trains the teacher for an epoch)
        "epochs=1",
        "batch_size=4",
        "device=cpu",
    )
    run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and rows[0]["kd"] > 0
    meta = read_meta(tmp_path / "student.safetensors")  # the readable names reach kdtrain-predict
    assert meta["class_names"][:2] == ["tench, Tinca tinca", "goldfish, Carassius auratus"]
