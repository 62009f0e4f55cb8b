"""Small nets for small inputs (the embedded digits data): a CNN teacher and an MLP student."""

from __future__ import annotations

import math

from torch import Tensor, nn

from kdtrain.models import register


class SmallCNN(nn.Module):
    """Three conv blocks, global pooling, a hidden layer and a linear classifier."""

    def __init__(self, num_classes: int, in_channels: int, width: int = 32, hidden: int = 128, dropout: float = 0.2):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(in_channels, w), block(w, 2 * w), nn.MaxPool2d(2), block(2 * w, 4 * w))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * w, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.head(self.pool(self.features(x))))


class MLP(nn.Module):
    """Flatten, `depth` hidden ReLU layers of `hidden` units, then a linear classifier."""

    def __init__(self, num_classes: int, in_features: int, hidden: int = 32, depth: int = 1, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        size = in_features
        for _ in range(depth):
            layers += [nn.Linear(size, hidden), nn.ReLU(), nn.Dropout(dropout)]
            size = hidden
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


@register("cnn")
def cnn(
    num_classes: int, in_shape: tuple[int, int, int], width: int = 32, hidden: int = 128, dropout: float = 0.2
) -> nn.Module:
    return SmallCNN(num_classes, in_shape[0], width=width, hidden=hidden, dropout=dropout)


@register("mlp")
def mlp(
    num_classes: int, in_shape: tuple[int, int, int], hidden: int = 32, depth: int = 1, dropout: float = 0.0
) -> nn.Module:
    return MLP(num_classes, math.prod(in_shape), hidden=hidden, depth=depth, dropout=dropout)
