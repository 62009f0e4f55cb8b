"""A user's own model, imported by dotted path (`student._target_=_user_models.TinyNet`) in the CLI tests."""

from __future__ import annotations

from torch import Tensor, nn


class TinyNet(nn.Module):
    """One conv, global pooling, a linear classifier; `width` is a user option (+student.width=8)."""

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int], width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_shape[0], width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.conv(x).relu()).flatten(1))
