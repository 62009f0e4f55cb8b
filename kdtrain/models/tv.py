"""Any torchvision classification model by name: `teacher=torchvision teacher.arch=resnet50`.

* `arch`: a name from `torchvision.models.list_models(module=torchvision.models)`.
* `pretrained`: null (random init), `DEFAULT` or a weights name of the arch (e.g. IMAGENET1K_V1),
  downloaded on first use into the torch hub cache (`torch.hub.get_dir()/checkpoints/`, as
  torchvision names the file, hash-checked) and read from there after (see kdtrain.models.hub; with
  offline=true a missing file is an error that says where to put it), or the path of a weights
  file (.pth / .pt state dict, or .safetensors). Files load without executing code
  (`torch.load(weights_only=True)` or safetensors). When the file's classifier has another number
  of classes (ImageNet's 1000), the backbone is loaded and the classifier keeps its fresh
  initialisation; `head_pretrained` on the returned model says whether the classifier loaded too.
* Inputs are adapted to what these ImageNet models expect, by a wrapper without parameters
  (`InputAdapter`, whose `net` is the torchvision model): 1-channel inputs are repeated to 3
  channels, and inputs smaller than 32 pixels are upsampled (bilinear) to 32. The model's own
  classifier stays the last nn.Linear in `named_modules()`, so its input is the penultimate
  feature. GoogLeNet and Inception v3 are built without their auxiliary heads.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtrain.checkpoint import load_state_dict_file
from kdtrain.errors import UserError
from kdtrain.models import register
from kdtrain.models.hub import cached_download

MIN_SIZE = 32
AUX_HEADS = ("AuxLogits.", "aux1.", "aux2.")  # Inception v3 / GoogLeNet training heads, not built here
WRAPPER_PREFIXES = ("module.", "net.")  # DataParallel, and kdtrain's own InputAdapter


class InputAdapter(nn.Module):
    """Repeats 1-channel inputs to 3 channels and upsamples inputs under `min_size` pixels, then runs `net`.

    `head_pretrained`: the classifier came with the pretrained weights (for this number of classes),
    so the model is ready to use as loaded; False when it is freshly initialised."""

    def __init__(self, net: nn.Module, in_channels: int, min_size: int = MIN_SIZE, head_pretrained: bool = False):
        super().__init__()
        self.net = net
        self.gray = in_channels == 1
        self.min_size = min_size
        self.head_pretrained = head_pretrained

    def forward(self, x: Tensor) -> Tensor:
        if self.gray:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        if h < self.min_size or w < self.min_size:
            x = F.interpolate(
                x, size=(max(h, self.min_size), max(w, self.min_size)), mode="bilinear", align_corners=False
            )
        return self.net(x)


def close_matches(name: str, names: list[str], what: str) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    return f"arch={name} is not {what}" + (f" (close matches: {', '.join(close)})" if close else "")


def check_channels(in_shape: tuple[int, int, int]) -> None:
    if in_shape[0] not in (1, 3):
        raise UserError(f"inputs of {in_shape[0]} channels cannot feed an ImageNet model; use 1- or 3-channel data")


def _strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_backbone(model: nn.Module, state: dict[str, Tensor], num_classes: int, source: Path, arch: str) -> bool:
    """Load `state` into `model`; classifier tensors whose class count differs keep their fresh init.

    Returns True when every tensor loaded, the classifier included."""
    state = _strip_prefix(state)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(AUX_HEADS)}
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if unexpected or missing:
        raise UserError(
            f"pretrained={source} is not a state dict of {arch}: missing keys {missing[:3]}, unexpected keys "
            f"{unexpected[:3]}; give weights saved from the same architecture"
        )
    head, wrong = [], []
    for k, v in state.items():
        if v.shape == own[k].shape:
            continue
        # A classifier for another number of classes differs in its first (output) dimension only.
        is_head = (
            v.ndim == own[k].ndim and v.ndim >= 1 and own[k].shape[0] == num_classes and v.shape[1:] == own[k].shape[1:]
        )
        (head if is_head else wrong).append(k)
    if wrong:
        k = wrong[0]
        raise UserError(
            f"pretrained={source} does not fit {arch}: {k} has shape {tuple(state[k].shape)} in the file but "
            f"{tuple(own[k].shape)} in the model"
        )
    model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
    return not head


def _weights_file(arch: str, pretrained: str) -> Path:
    """The file `pretrained` names: a path, or DEFAULT / a weights name, downloaded into the torch hub cache
    on first use (kdtrain.models.hub)."""
    from torchvision.models import get_model_weights

    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    try:
        enum = list(get_model_weights(arch))
    except (ValueError, KeyError):
        enum = []
    names = [w.name for w in enum]
    if enum and (pretrained == "DEFAULT" or pretrained in names):
        weights = get_model_weights(arch).DEFAULT if pretrained == "DEFAULT" else get_model_weights(arch)[pretrained]
        return cached_download(weights.url, f"pretrained={pretrained} ({arch} {weights.name})")
    choices = ", ".join(["DEFAULT", *names]) if names else "none for this arch"
    raise UserError(
        f"pretrained={pretrained} is not a file; give the path of a weights file (.pth, .pt, .safetensors), or "
        f"a weights name of {arch} ({choices})"
    )


def load_pretrained(model: nn.Module, pretrained: object, num_classes: int, arch: str, lookup: bool = True) -> bool:
    """Load `pretrained` (a path, or with `lookup` a torchvision weights name) into `model`, if set.

    Returns True when the classifier loaded too (the weights are for `num_classes` classes)."""
    if pretrained is None:
        return False
    if not isinstance(pretrained, str) or not pretrained:
        raise UserError(
            f"pretrained={pretrained!r} is not accepted: give DEFAULT, a weights name or a file path, or null"
        )
    if lookup:
        path = _weights_file(arch, pretrained)
    else:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise UserError(
                f"pretrained={pretrained} is not a file; give the path of a weights file (.pth, .pt, .safetensors)"
            )
    return load_backbone(model, load_state_dict_file(path, "pretrained weights"), num_classes, path, arch)


@torch.no_grad()
def check_forward(model: nn.Module, in_shape: tuple[int, int, int], arch: str) -> None:
    """One dry forward at batch 1, so an input size the arch cannot take fails here, in one line."""
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(1, *in_shape))
    except (RuntimeError, ValueError, AssertionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"arch={arch} cannot run on inputs of shape {tuple(in_shape)} ({first}); set dataset.image_size (e.g. 224)"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or out.ndim != 2:
        raise UserError(f"arch={arch} does not return a (batch, classes) tensor of logits, so it cannot be distilled")


@register("torchvision")
def torchvision_model(
    num_classes: int, in_shape: tuple[int, int, int], arch: str = "resnet18", pretrained: str | None = None
) -> nn.Module:
    from torchvision import models

    names = models.list_models(module=models)
    if arch not in names:
        raise UserError(
            close_matches(arch, names, "a torchvision classification model")
            + f"; choose one of torchvision.models.list_models() ({len(names)} names)"
        )
    check_channels(in_shape)
    extra = {"aux_logits": False, "init_weights": True} if arch in ("googlenet", "inception_v3") else {}
    net = models.get_model(arch, weights=None, num_classes=num_classes, **extra)
    head_pretrained = load_pretrained(net, pretrained, num_classes, arch)
    model = InputAdapter(net, in_shape[0], head_pretrained=head_pretrained)
    check_forward(model, in_shape, arch)
    return model
