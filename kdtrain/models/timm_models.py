"""Any timm model by name: `student=timm student.arch=resnet18` (needs `pip install 'kdtrain[timm]'`).

`pretrained` is null or the path of a weights file (nothing is downloaded at run time); inputs
are adapted as for torchvision models (see kdtrain.models.tv): 1 channel repeated to 3, inputs
under 32 pixels upsampled to 32.
"""

from __future__ import annotations

from torch import nn

from kdtrain.errors import UserError
from kdtrain.models import register
from kdtrain.models.tv import InputAdapter, check_channels, check_forward, close_matches, load_pretrained


@register("timm")
def timm_model(
    num_classes: int, in_shape: tuple[int, int, int], arch: str = "resnet18", pretrained: str | None = None
) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UserError(
            "model name timm needs the timm package, which is not installed: pip install 'kdtrain[timm]'"
        ) from None
    if not timm.is_model(arch):
        raise UserError(
            close_matches(arch, timm.list_models(), "a timm model") + "; timm.list_models() lists every name"
        )
    check_channels(in_shape)
    net = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=3)
    load_pretrained(net, pretrained, num_classes, arch, lookup=False)
    model = InputAdapter(net, in_shape[0])
    check_forward(model, in_shape, arch)
    return model
