"""Batch augmentation on the training device: random crop (padded) and random horizontal flip.

The whole batch is augmented with one gather, with no Python loop over samples: the batch is
padded once, each sample draws its own crop offset (and flip), and the crops are read with
advanced indexing. The padding holds the normalised value of a black pixel, so the result
equals torchvision's `RandomCrop(size, padding=pad)` on the unnormalised image.

`crop_flip_at` takes the parameters explicitly (crop offsets, flip bits), so a fixed view of a
sample can be replayed exactly (the teacher cache stores K views per sample, see teacher_cache.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def crop_flip_at(
    x: Tensor, pad: int, dy: Tensor, dx: Tensor, flips: Tensor | None, fill: Tensor | None = None
) -> Tensor:
    """Each sample i of `x` (B, C, H, W) cropped back to H x W from a `pad`-padded copy at offset
    (dy[i], dx[i]) in [0, 2 * pad], and mirrored left-right where `flips[i]` is true (None: no flip).
    `fill` (C,) is the padding value."""
    b, c, h, w = x.shape
    device = x.device
    padded = x.new_zeros((b, c, h + 2 * pad, w + 2 * pad))
    if fill is not None:
        padded += fill.to(device=device, dtype=x.dtype).view(1, c, 1, 1)
    padded[:, :, pad : pad + h, pad : pad + w] = x
    rows = dy.to(device=device, dtype=torch.long).view(b, 1) + torch.arange(h, device=device)  # (B, H)
    cols = dx.to(device=device, dtype=torch.long).view(b, 1) + torch.arange(w, device=device)  # (B, W)
    if flips is not None:
        cols = torch.where(flips.to(device=device, dtype=torch.bool).view(b, 1), cols.flip(1), cols)
    batch = torch.arange(b, device=device).view(b, 1, 1, 1)
    channel = torch.arange(c, device=device).view(1, c, 1, 1)
    return padded[batch, channel, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def crop_flip(x: Tensor, pad: int, flip: bool, fill: Tensor | None = None) -> Tensor:
    """Each sample of `x` (B, C, H, W) cropped back to H x W from a `pad`-padded copy at a random
    offset, and mirrored left-right with probability 1/2 when `flip`. `fill` (C,) is the padding value."""
    b, device = x.shape[0], x.device
    dy = torch.randint(0, 2 * pad + 1, (b, 1), device=device)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), device=device)
    mirrored = torch.rand(b, 1, device=device) < 0.5 if flip else None
    return crop_flip_at(x, pad, dy, dx, mirrored, fill)


class CropFlip:
    """The `Splits.augment` function: `augment(x)` draws random crops/flips from the global RNG;
    `draw` and `at` split that into drawing parameters and applying them (for replayable views)."""

    def __init__(self, mean: list[float], std: list[float], pad: int, flip: bool):
        self.pad, self.flip = int(pad), bool(flip)
        self.fill = torch.tensor([-m / s for m, s in zip(mean, std)])
        self._on_device: dict[torch.device, Tensor] = {}  # copied to the device once, not every step

    def _fill(self, device: torch.device) -> Tensor:
        if device not in self._on_device:
            self._on_device[device] = self.fill.to(device)
        return self._on_device[device]

    def __call__(self, x: Tensor) -> Tensor:
        return crop_flip(x, self.pad, self.flip, self._fill(x.device))

    def draw(self, shape: tuple[int, ...], generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Crop offsets (dy, dx) as uint8 and flip bits as bool, each of `shape`, from `generator` (on the CPU)."""
        dy = torch.randint(0, 2 * self.pad + 1, shape, generator=generator).to(torch.uint8)
        dx = torch.randint(0, 2 * self.pad + 1, shape, generator=generator).to(torch.uint8)
        flips = torch.rand(shape, generator=generator) < 0.5 if self.flip else torch.zeros(shape, dtype=torch.bool)
        return dy, dx, flips

    def at(self, x: Tensor, dy: Tensor, dx: Tensor, flips: Tensor) -> Tensor:
        """`x` augmented with the given parameters (one per sample)."""
        return crop_flip_at(x, self.pad, dy, dx, flips if self.flip else None, self._fill(x.device))

    def describe(self) -> dict[str, object]:
        return {"pad": self.pad, "flip": self.flip, "fill": [round(float(v), 6) for v in self.fill]}


def make_augment(mean: list[float], std: list[float], pad: int, flip: bool) -> Callable[[Tensor], Tensor]:
    """The `Splits.augment` function for data normalised with `mean` / `std` (a `CropFlip`)."""
    return CropFlip(mean, std, pad, flip)
