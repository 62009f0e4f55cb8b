"""Batch augmentation on the training device: random crop (padded) and random horizontal flip.

The whole batch is augmented with one gather, with no Python loop over samples: the batch is
padded once, each sample draws its own crop offset (and flip), and the crops are read with
advanced indexing. The padding holds the normalised value of a black pixel, so the result
equals torchvision's `RandomCrop(size, padding=pad)` on the unnormalised image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def crop_flip(x: Tensor, pad: int, flip: bool, fill: Tensor | None = None) -> Tensor:
    """Each sample of `x` (B, C, H, W) cropped back to H x W from a `pad`-padded copy at a random
    offset, and mirrored left-right with probability 1/2 when `flip`. `fill` (C,) is the padding value."""
    b, c, h, w = x.shape
    device = x.device
    padded = x.new_zeros((b, c, h + 2 * pad, w + 2 * pad))
    if fill is not None:
        padded += fill.to(device=device, dtype=x.dtype).view(1, c, 1, 1)
    padded[:, :, pad : pad + h, pad : pad + w] = x
    dy = torch.randint(0, 2 * pad + 1, (b, 1), device=device)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), device=device)
    rows = dy + torch.arange(h, device=device)  # (B, H)
    cols = dx + torch.arange(w, device=device)  # (B, W)
    if flip:
        mirrored = torch.rand(b, 1, device=device) < 0.5
        cols = torch.where(mirrored, cols.flip(1), cols)
    batch = torch.arange(b, device=device).view(b, 1, 1, 1)
    channel = torch.arange(c, device=device).view(1, c, 1, 1)
    return padded[batch, channel, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def make_augment(mean: list[float], std: list[float], pad: int, flip: bool) -> Callable[[Tensor], Tensor]:
    """The `Splits.augment` function for data normalised with `mean` / `std`."""
    fill = torch.tensor([-m / s for m, s in zip(mean, std)])
    on_device: dict[torch.device, Tensor] = {}  # copied to the device once, not every step

    def augment(x: Tensor) -> Tensor:
        if x.device not in on_device:
            on_device[x.device] = fill.to(x.device)
        return crop_flip(x, pad, flip, on_device[x.device])

    return augment
