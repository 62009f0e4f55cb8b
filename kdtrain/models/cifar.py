"""CIFAR-style model zoo used by the knowledge-distillation literature.

The architectures follow the CIFAR-100 benchmark of the KD papers (CRD / RepDistiller,
mdistiller): ResNets for 32x32 inputs (a 3x3 stem, no max-pool), wide ResNets, VGG with
BatchNorm, MobileNetV2 ("mobile_half") and ShuffleNetV2.  Submodule names follow the
reference implementations (``conv1``, ``layer1`` ... ``fc`` for ResNets; ``block1`` ... for
WRNs; ``block0`` ... ``classifier`` for VGG), so they can be named for feature distillation.

Differences from the reference code, all without effect on the parameter count:

* the input channel count comes from ``in_shape[0]`` (grayscale works);
* the global pooling before the classifier is adaptive, so any input size works
  (e.g. 28x28 or 8x8); VGG drops a max-pool that would shrink a feature map below 1x1;
* no in-place activations, so forward hooks always see the tensor a module produced;
* the last ``nn.Linear`` in ``named_modules()`` order is the classifier and its input is
  the penultimate feature.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtrain.errors import UserError
from kdtrain.models import register

__all__ = [
    "VGG",
    "CifarResNet",
    "MobileNetV2",
    "ShuffleNetV2",
    "WideResNet",
]


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, relu), BN weight 1 / bias 0, zero Linear bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _check_in_shape(in_shape: tuple[int, int, int]) -> int:
    if len(in_shape) != 3:
        raise ValueError(f"in_shape must be (channels, height, width), got {in_shape!r}")
    return int(in_shape[0])


# --------------------------------------------------------------------------------------
# ResNet (CIFAR variant, He et al. 2016; option-B projection shortcut)
# --------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR: a 3x3 stem and three stages of n basic blocks.

    ``widths`` = (stem, stage1, stage2, stage3): (16, 16, 32, 64) for resnet20/32/...,
    (32, 64, 128, 256) for the "x4" variants.
    """

    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(widths[1], n, stride=1)
        self.layer2 = self._make_layer(widths[2], n, stride=2)
        self.layer3 = self._make_layer(widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)
        _init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(BasicBlock(self.in_planes, planes, stride if i == 0 else 1))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _resnet(depth: int, widths: tuple[int, int, int, int]):
    def build(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
        return CifarResNet(depth, widths, num_classes, _check_in_shape(in_shape))

    return build


_PLAIN = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)

for _depth in (8, 14, 20, 32, 44, 56, 110):
    register(f"resnet{_depth}")(_resnet(_depth, _PLAIN))
register("resnet8x4")(_resnet(8, _X4))
register("resnet32x4")(_resnet(32, _X4))


# --------------------------------------------------------------------------------------
# Wide ResNet (Zagoruyko & Komodakis 2016), pre-activation blocks
# --------------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.convShortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # With a projection the shortcut starts from the pre-activated input.
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return out + shortcut


class WideNetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: depth = 6n+4, stage widths (16k, 32k, 64k)."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        in_channels: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.block1 = WideNetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = WideNetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = WideNetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        x = F.relu(self.bn1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _wrn(depth: int, k: int):
    def build(num_classes: int, in_shape: tuple[int, int, int], drop_rate: float = 0.0) -> nn.Module:
        return WideResNet(depth, k, num_classes, _check_in_shape(in_shape), drop_rate)

    return build


for _depth, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    register(f"wrn_{_depth}_{_k}")(_wrn(_depth, _k))


# --------------------------------------------------------------------------------------
# VGG with BatchNorm (CIFAR variant: five conv groups, global pooling, one Linear)
# --------------------------------------------------------------------------------------

_VGG_CFGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


class VGG(nn.Module):
    """Five groups ``block0``..``block4`` of conv3x3(+bias)-BN-ReLU.

    Each group's last ReLU is applied in ``forward`` so that a hook on ``blockN`` sees the
    pre-activation feature.  ``pool0``..``pool2`` are 2x2 max-pools; ``pool3`` is a max-pool
    only for inputs of 64 pixels or more (on 32x32 inputs the last two groups both run at
    4x4, as in the reference); ``pool4`` is global average pooling.  A max-pool that would
    shrink a feature map below 1x1 (tiny inputs) is replaced by an identity.
    """

    def __init__(
        self,
        cfg: list[list[int]],
        num_classes: int,
        in_shape: tuple[int, int, int] = (3, 32, 32),
    ) -> None:
        super().__init__()
        in_channels, h, w = (int(v) for v in in_shape)
        size = min(h, w)
        channels = in_channels
        for i in range(5):
            setattr(self, f"block{i}", self._make_group(cfg[i], channels))
            channels = cfg[i][-1]
            if i == 4:
                setattr(self, f"pool{i}", nn.AdaptiveAvgPool2d(1))
            elif (i < 3 or size >= 8) and size >= 2:
                # block3 -> block4 keeps the 4x4 map of a 32x32 input (size 4 < 8 there).
                setattr(self, f"pool{i}", nn.MaxPool2d(2, 2))
                size //= 2
            else:
                setattr(self, f"pool{i}", nn.Identity())
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self)

    @staticmethod
    def _make_group(widths: list[int], in_channels: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for v in widths:
            layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=False)]
            in_channels = v
        return nn.Sequential(*layers[:-1])

    def forward(self, x: Tensor) -> Tensor:
        for i in range(5):
            x = F.relu(getattr(self, f"block{i}")(x))
            x = getattr(self, f"pool{i}")(x)
        return self.classifier(torch.flatten(x, 1))


def _vgg(name: str):
    def build(num_classes: int, in_shape: tuple[int, int, int]) -> nn.Module:
        _check_in_shape(in_shape)
        return VGG(_VGG_CFGS[name], num_classes, in_shape)

    return build


for _name in ("vgg8", "vgg11", "vgg13"):
    register(_name)(_vgg(_name))


# --------------------------------------------------------------------------------------
# MobileNetV2 (CIFAR variant, stride-1 second stage; "mobile_half" = width 0.5)
# --------------------------------------------------------------------------------------


def _conv_bn(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=False),
    )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection (the expansion conv is kept
    even for expand ratio 1, as in the KD reference implementation)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=False),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=False),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width_mult: float = 0.5,
        expand_ratio: int = 6,
    ) -> None:
        super().__init__()
        t = expand_ratio
        # (expand ratio, channels, repeats, stride of the first block)
        setting = [
            (1, 16, 1, 1),
            (t, 24, 2, 1),  # stride 1 here (ImageNet: 2) for 32x32 inputs
            (t, 32, 3, 2),
            (t, 64, 4, 2),
            (t, 96, 3, 1),
            (t, 160, 3, 2),
            (t, 320, 1, 1),
        ]
        channels = int(32 * width_mult)
        self.conv1 = _conv_bn(in_channels, channels, 3, 2)
        stages = []
        for ratio, c, n, s in setting:
            out = int(c * width_mult)
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(channels, out, s if i == 0 else 1, ratio))
                channels = out
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(stages)
        self.last_channel = _make_divisible(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn(channels, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.conv2(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


def _make_divisible(v: float, divisor: int = 8) -> int:
    return int(math.ceil(v / divisor) * divisor)


@register("mobilenetv2")
def mobilenetv2(num_classes: int, in_shape: tuple[int, int, int], width_mult: float = 0.5) -> nn.Module:
    """MobileNetV2 for CIFAR; the default width 0.5 is the KD benchmark's "mobile_half"."""
    return MobileNetV2(num_classes, _check_in_shape(in_shape), width_mult=float(width_mult))


# --------------------------------------------------------------------------------------
# ShuffleNetV2 (CIFAR variant: 1x1 stride-1 stem as in the KD reference, no max-pool)
# --------------------------------------------------------------------------------------


def _channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBlock(nn.Module):
    """Stride-1 unit: split channels in half, transform one half, concat, shuffle."""

    def __init__(self, channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = int(channels * split_ratio)
        c = channels - self.split
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, : self.split], x[:, self.split :]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return _channel_shuffle(torch.cat([x1, out], 1))


class ShuffleDownBlock(nn.Module):
    """Stride-2 unit: two branches over the whole input, each producing half the output."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch: depthwise 3x3 (stride 2) -> 1x1
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch: 1x1 -> depthwise 3x3 (stride 2) -> 1x1
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, out_channels - mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(out_channels - mid)

    def forward(self, x: Tensor) -> Tensor:
        left = self.bn1(self.conv1(x))
        left = F.relu(self.bn2(self.conv2(left)))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn4(self.conv4(right))
        right = F.relu(self.bn5(self.conv5(right)))
        return _channel_shuffle(torch.cat([left, right], 1))


_SHUFFLE_CFGS: dict[float, tuple[tuple[int, int, int, int], tuple[int, int, int]]] = {
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1.0: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2.0: ((224, 488, 976, 2048), (3, 7, 3)),
}


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, net_size: float = 1.0) -> None:
        super().__init__()
        if float(net_size) not in _SHUFFLE_CFGS:
            raise UserError(f"shufflenetv2 net_size must be one of {sorted(_SHUFFLE_CFGS)}, got {net_size}")
        widths, repeats = _SHUFFLE_CFGS[float(net_size)]
        # The KD reference ("ShuffleV2") uses a 1x1 stem conv at full resolution.
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(widths[0], repeats[0])
        self.layer2 = self._make_layer(widths[1], repeats[1])
        self.layer3 = self._make_layer(widths[2], repeats[2])
        self.conv2 = nn.Conv2d(widths[2], widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def _make_layer(self, out_channels: int, repeats: int) -> nn.Sequential:
        layers: list[nn.Module] = [ShuffleDownBlock(self.in_channels, out_channels)]
        layers += [ShuffleBlock(out_channels) for _ in range(repeats)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = F.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.linear(x)


@register("shufflenetv2")
def shufflenetv2(num_classes: int, in_shape: tuple[int, int, int], net_size: float = 1.0) -> nn.Module:
    """ShuffleNetV2 for CIFAR (the KD benchmark's "ShuffleV2", net_size 1)."""
    return ShuffleNetV2(num_classes, _check_in_shape(in_shape), net_size=net_size)
