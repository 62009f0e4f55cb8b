"""`kdtrain-inspect`: the layers of the student (or, with --teacher, the teacher) a kdtrain command line would build.

    kdtrain-inspect student=resnet20 dataset=cifar10
    kdtrain-inspect --teacher teacher=torchvision teacher.arch=resnet50 dataset=mnist

The overrides are composed and checked exactly as `kdtrain` does. The model is built for the
dataset's number of classes and input shape, which are read without loading the dataset
(`kdtrain.data.dataset_shape`), and run once on a batch of one zero image with forward hooks on
every module. The table lists each module's path (the names feature hooks take), type, output
shape and own parameters.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kdtrain.cli import CONFIG_MODULE, _normalise, check_command_line
from kdtrain.data import dataset_shape
from kdtrain.errors import UserError, one_line_errors
from kdtrain.features import classifier_name
from kdtrain.models import build_model
from kdtrain.models.hub import set_offline

USAGE = """usage: kdtrain-inspect [--teacher | --student] [KEY=VALUE ...] [GROUP=OPTION ...]

Print the layers of the student (default) or the teacher that `kdtrain` would build with the
same overrides: module path, type, output shape for one input, own parameters.
  kdtrain-inspect student=resnet20 dataset=cifar10
  kdtrain-inspect --teacher teacher=torchvision teacher.arch=resnet50 dataset=mnist"""


def _shape(value: Any) -> str:
    if isinstance(value, Tensor):
        return "x".join(str(d) for d in value.shape)
    if isinstance(value, (tuple, list)):
        return ", ".join(_shape(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_shape(v)}" for k, v in value.items())
    return type(value).__name__


@torch.no_grad()
def layer_rows(model: nn.Module, in_shape: tuple[int, int, int]) -> list[tuple[str, str, str, int]]:
    """(module path, type, output shape, own parameters) for every module, from one dry forward at batch 1."""
    outputs: dict[str, list[str]] = {}
    handles = []
    for name, module in model.named_modules():

        def hook(m: nn.Module, args: Any, out: Any, name: str = name) -> None:
            outputs.setdefault(name, []).append(_shape(out))

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *in_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    rows = []
    for name, module in model.named_modules():
        shapes = outputs.get(name)
        if shapes is None:
            out = "(not run)"
        else:
            out = shapes[0] + (f"  (called {len(shapes)}x)" if len(shapes) > 1 else "")
        own = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append((name or "(model)", type(module).__name__, out, own))
    return rows


def describe(cfg: DictConfig, role: str) -> tuple[nn.Module, list[tuple[str, str, str, int]], dict[str, Any]]:
    """Build the `role` model of a composed config for its dataset; (model, rows, facts)."""
    num_classes, in_shape = dataset_shape(cfg.dataset)
    set_offline(cfg.offline)  # pretrained weights download as in a run, or not at all
    spec = OmegaConf.to_container(cfg[role], resolve=True)
    model = build_model(spec, num_classes, in_shape, role)
    rows = layer_rows(model, in_shape)
    try:
        penultimate = classifier_name(model, role)
        feature = f"input of {penultimate} ({model.get_submodule(penultimate).in_features})"
    except UserError:
        feature = "none (no nn.Linear classifier: feature modes cannot use this model)"
    label = spec.get("arch") or spec.get("_target_") or spec["name"]
    facts = {
        "model": f"{role}={spec['name']}" + (f" ({label})" if label != spec["name"] else ""),
        "dataset": f"{cfg.dataset.name}: {num_classes} classes, input {tuple(in_shape)}",
        "parameters": f"{sum(p.numel() for p in model.parameters()):,}",
        "penultimate feature": feature,
    }
    return model, rows, facts


def render(rows: list[tuple[str, str, str, int]], facts: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=facts["model"])
    table.add_column("module")
    table.add_column("type")
    table.add_column("output (batch 1)")
    table.add_column("params", justify="right")
    for name, kind, out, own in rows:
        table.add_row(name, kind, out, f"{own:,}" if own else "")
    console = Console()
    console.print(table)
    for key, value in facts.items():
        if key != "model":
            console.print(f"{key}: {value}", highlight=False)


@one_line_errors("kdtrain-inspect")
def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return
    role = "student"
    if args and args[0] in ("--teacher", "--student"):
        role = args.pop(0)[2:]
    flags = [a for a in args if a.startswith("-")]
    if flags:
        raise UserError(
            f"{flags[0]} is not an option of kdtrain-inspect; the first argument may be --teacher or "
            "--student, the rest are kdtrain overrides"
        )
    overrides = [o for o in _normalise(args) if not o.lstrip("+~").startswith("hydra")]
    check_command_line(overrides)
    with hydra.initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = hydra.compose(config_name="config", overrides=overrides)
    _, rows, facts = describe(cfg, role)
    render(rows, facts)


if __name__ == "__main__":
    main()
