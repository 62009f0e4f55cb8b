"""Any timm model by name: `student=timm student.arch=resnet18` (needs `pip install 'kdtrain[timm]'`).

`arch` is a timm model name, optionally with a pretrained tag (`resnet18.a1_in1k`), or a Hugging
Face Hub model (`hf-hub:timm/resnet18.a1_in1k`). `pretrained` is null (random init), true (timm's
own pretrained weights, downloaded on first use into the Hugging Face Hub cache by timm and read
from there after; offline=true or HF_HUB_OFFLINE=1 allows cached files only), or the path of a
weights file. Inputs are adapted as for torchvision models (see kdtrain.models.tv): 1 channel
repeated to 3, inputs under 32 pixels upsampled to 32.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kdtrain.errors import UserError
from kdtrain.models import register
from kdtrain.models.hub import hf_cache, is_network_error, is_offline, offline_guard
from kdtrain.models.tv import InputAdapter, check_channels, check_forward, close_matches, load_pretrained

HF_HUB = "hf-hub:"


def _hub_source(timm: Any, arch: str) -> str:
    """Where timm takes `arch`'s files from, for messages: a Hugging Face Hub repo (to `hf download`), or a URL."""
    if arch.startswith(HF_HUB):
        repo = arch[len(HF_HUB) :]
    else:
        cfg = timm.models.get_pretrained_cfg(arch)
        if cfg is None:
            return f"timm's source of {arch}"
        if not cfg.hf_hub_id:
            return str(cfg.url)
        repo = cfg.hf_hub_id
    return f"https://huggingface.co/{repo} (`hf download {repo}` fills the cache)"


def _create(timm: Any, arch: str, num_classes: int, pretrained: bool) -> nn.Module:
    """timm.create_model: timm downloads and caches pretrained weights (and an hf-hub: model's config);
    network and offline errors become one line."""
    try:
        with offline_guard():
            return timm.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=3)
    except UserError:
        raise
    except Exception as e:
        if not is_network_error(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        source = _hub_source(timm, arch)
        if is_offline():
            raise UserError(
                f"{arch}'s files are not in the Hugging Face cache ({hf_cache()}) and offline "
                f"mode forbids downloading them (offline=true or HF_HUB_OFFLINE=1): fetch them from {source} "
                "on a machine with network, or give the weights file with pretrained=PATH"
            ) from None
        raise UserError(
            f"downloading {arch}'s files from {source} failed ({type(e).__name__}: {first}); "
            "check the network or proxy, or give the file with pretrained=PATH"
        ) from None


@register("timm")
def timm_model(
    num_classes: int, in_shape: tuple[int, int, int], arch: str = "resnet18", pretrained: Any = None
) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UserError(
            "model name timm needs the timm package, which is not installed: pip install 'kdtrain[timm]'"
        ) from None
    if not arch.startswith(HF_HUB) and not timm.is_model(arch):
        raise UserError(
            close_matches(arch, timm.list_models(), "a timm model") + "; timm.list_models() lists every name"
        )
    check_channels(in_shape)
    net = _create(timm, arch, num_classes, pretrained is True)
    if pretrained is True:
        # timm keeps the pretrained classifier only when it has num_classes outputs; else a fresh one.
        head_pretrained = int(net.pretrained_cfg.get("num_classes") or 0) == num_classes
    elif pretrained is None or pretrained is False:
        head_pretrained = False
    else:
        head_pretrained = load_pretrained(net, pretrained, num_classes, arch, lookup=False)
    model = InputAdapter(net, in_shape[0], head_pretrained=head_pretrained)
    check_forward(model, in_shape, arch)
    return model
