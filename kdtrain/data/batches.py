"""Batches for training and evaluation: `make_batches(data, ...)` for a TensorSet (the memory path) or a
StreamSet (the stream path), with one interface: `len()`, `global_size(i)`, `generator` (the data order's
RNG, checkpointed for exact resume) and `epoch(first)` yielding (inputs, labels, sample indices) on the
device, inputs float32 and normalised. The indices say which samples a batch holds (the teacher cache
and index-based loss terms such as CRD look them up).

Both paths take the same order: a permutation of the samples drawn from `generator` each epoch (shuffle),
cut into global batches of `batch_size * world`; under torchrun rank r trains on the r-th share of each
global batch, so N ranks x B samples train like 1 rank x N*B.

Memory path (`DeviceBatches`): the whole split lives on the device; a batch is one gather by index.
uint8 pixels are normalised per batch on the device.

Stream path (`StreamBatches`): DataLoader worker processes read and decode only this rank's share of each
batch; uint8 tensors cross the process boundary (pinned on CUDA, copied without blocking) and are
normalised on the device. Transforms (torchvision transforms v2): training, when the set is augmented,
RandomResizedCrop(size) + horizontal flip; otherwise Resize(round(size / 0.875)) + CenterCrop(size).
A sample's random crop and flip are drawn from a seed made of the epoch's seed (drawn from `generator`)
and the sample's index, so they are the same for any worker count and after an exact resume.

An unreadable image (`BadImage`) stops the run naming the file (bad_images=fail), or (skip) is logged
once, counted in `bad_reads`, and replaced by another sample of its batch.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from kdtrain.data import Normalise, StreamSet, TensorSet
from kdtrain.data.sources import BadImage
from kdtrain.errors import UserError

log = logging.getLogger("kdtrain")

EVAL_CROP = 0.875  # the evaluation transform resizes to size / 0.875, then centre-crops (224 <- 256)
SEED_MOD = 2**62  # seeds stay below int64 range
PREFETCH = 2  # batches each worker prepares ahead (torch's default): enough to overlap decoding with a step
# Evaluation batches on the stream path: a fixed size bounds the decoded images in flight (workers x PREFETCH x
# this); with 512 a 3,200-image val split was held in flight whole (+209 MiB from 4,000 to 16,000 images).
STREAM_EVAL_BATCH = 128


class _Order:
    """The data order both paths share: per epoch a permutation (or 0..n-1), cut into global batches."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.bad_reads = 0  # unreadable images replaced in batches (stream path, bad_images=skip)

    def __len__(self) -> int:
        n, b = self.n, self.batch_size * self.world
        # A trailing batch too small to give each rank two samples is dropped when shuffling:
        # BatchNorm cannot train on one sample. `drop_last` drops the smaller last batch (when there is a
        # full one), so every batch has one shape (compile=true).
        small_tail = self.shuffle and 0 < n % b < 2 * self.world
        return n // b if small_tail or (self.drop_last and n >= b) else math.ceil(n / b)

    def global_size(self, i: int) -> int:
        """Samples in global batch `i` (all ranks together)."""
        b = self.batch_size * self.world
        return min(b, self.n - i * b)

    def take_bad_reads(self) -> int:
        """Unreadable images replaced since the last call (this rank's)."""
        n, self.bad_reads = self.bad_reads, 0
        return n

    def _order(self) -> Tensor:
        """This epoch's order of the samples (draws from `generator` when shuffling)."""
        return torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)

    def _share(self, order: Tensor, i: int) -> Tensor:
        return share(order, i, self.batch_size, self.rank, self.world)

    def close(self) -> None:
        """Release what the batches hold beyond memory (the stream path's worker processes)."""


def share(order: Tensor, i: int, batch_size: int, rank: int, world: int) -> Tensor:
    """Rank `rank`'s samples of global batch `i` of `order` (global batches of `batch_size * world`)."""
    idx = order[i * batch_size * world : (i + 1) * batch_size * world]
    return torch.tensor_split(idx, world)[rank] if world > 1 else idx


class DeviceBatches(_Order):
    """Batches by indexing tensors that live on the training device (no DataLoader, no copies per step).
    Under torchrun every rank holds the data and draws the same permutation."""

    def __init__(self, data: TensorSet, batch_size: int, device: torch.device, shuffle: bool, **order: Any):
        super().__init__(len(data), batch_size, shuffle, **order)
        self.x, self.y, self.device = data.x.to(device), data.y.to(device), device
        self.normalise = Normalise(data.mean, data.std) if data.mean is not None else None

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        return self.epoch()

    def epoch(self, first: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """One pass in a new order (drawn from `generator`), starting at batch `first` (to resume mid-epoch)."""
        order = self._order().to(self.device)
        for i in range(first, len(self)):
            idx = self._share(order, i)
            x = self.x[idx]
            yield (self.normalise(x) if self.normalise is not None else x), self.y[idx], idx


def square(img: Image.Image, size: int) -> Tensor:
    """The memory path's image: scaled (PIL, bilinear) so its shorter side is `size`, centre-cropped to a
    square; uint8 (C, size, size)."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    a = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return torch.from_numpy(a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy())


class Decode(Dataset):
    """Reads and transforms one image per item `(sample, seed)` (in a worker process, or the main one):
    (uint8 (C, size, size), sample, "" or the BadImage message; a bad image gives zeros).

    kind: "train" (RandomResizedCrop + flip drawn from `seed`), "eval" (resize + centre crop) or
    "square" (the memory path's decoding, see `square`)."""

    def __init__(self, source: Any, rows: Tensor, size: int, channels: int, kind: str):
        from torchvision.transforms import v2

        self.source, self.rows, self.size, self.kind = source, rows, size, kind
        self.mode = "L" if channels == 1 else "RGB"
        self.blank = torch.zeros((channels, size, size), dtype=torch.uint8)
        self.transform = (
            v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
            if kind == "train"
            else v2.Compose([v2.Resize(round(size / EVAL_CROP), antialias=True), v2.CenterCrop(size)])
        )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int, str]:
        from torchvision.transforms.v2.functional import pil_to_tensor

        i, seed = item
        try:
            img = self.source.read(int(self.rows[i])).convert(self.mode)
        except BadImage as e:
            return self.blank, i, str(e)
        if self.kind == "square":
            return square(img, self.size), i, ""
        x = pil_to_tensor(img)
        if self.kind == "train":
            with torch.random.fork_rng(devices=[]):  # the draws depend on (epoch, sample) only
                # The CPU generator alone: torch.manual_seed also queues lazy CUDA/XPU/MTIA seeding, formatting the
                # call stack three times a sample (profiled: more time than decoding the image).
                torch.default_generator.manual_seed(seed)
                return self.transform(x), i, ""
        return self.transform(x), i, ""


class _Plan:
    """The DataLoader's batch sampler: this rank's share of the current epoch's batches `first`.. as lists of
    (sample, its augmentation seed), made as the loader asks for them (an epoch of a million samples is one
    int64 tensor, not a million tuples). Set before each pass; the sampler runs in the main process, so
    persistent workers see every epoch's plan."""

    def __init__(self, batch_size: int, rank: int, world: int) -> None:
        # Numbers only, no reference back to the StreamBatches: a reference cycle would leave a finished
        # loader to the cyclic garbage collector, which may then run in a forked worker (see StreamBatches).
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.order, self.first, self.stop, self.seed = torch.arange(0), 0, 0, 0

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in range(self.first, self.stop):
            idx = share(self.order, b, self.batch_size, self.rank, self.world)
            yield [(i, (self.seed + i) % SEED_MOD) for i in idx.tolist()]

    def __len__(self) -> int:
        return self.stop - self.first


def loader(dataset: Decode, plan: Any, workers: int, device: torch.device, persistent: bool) -> DataLoader:
    """A DataLoader over `plan`'s batches: `workers` processes (prefetching; `persistent`: kept from one pass to
    the next), pinned memory on CUDA."""
    return DataLoader(
        dataset,
        batch_sampler=plan,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=persistent and workers > 0,
        # Batches in flight: workers x PREFETCH, whatever the dataset's size (memory stays flat).
        prefetch_factor=PREFETCH if workers > 0 else None,
        # Its own generator for the workers' base seed: drawing it from the global RNG at each pass would move
        # the run's RNG (dropout, ...) and break exact resume. Transforms are seeded per sample anyway.
        generator=torch.Generator(),
    )


class StreamBatches(_Order):
    """Batches read from an ImageSource by DataLoader workers; each rank reads only its share."""

    def __init__(self, data: StreamSet, batch_size: int, device: torch.device, shuffle: bool, **order: Any):
        super().__init__(len(data), batch_size, shuffle, **order)
        self.data, self.device = data, device
        self.y = data.y.to(device)
        self.normalise = Normalise(data.mean, data.std)
        self.plan = _Plan(batch_size, self.rank, self.world)
        kind = "train" if data.augment else "eval"
        # Training batches keep their workers from epoch to epoch; a single pass (evaluation) ends them with it.
        decode = Decode(data.source, data.rows, data.size, data.channels, kind)
        self.loader = loader(decode, self.plan, data.workers, device, persistent=shuffle)
        self.bad_names: set[str] = set()  # logged once each
        self.forked = False

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        return self.epoch()

    def epoch(self, first: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """One pass in a new order (drawn from `generator`), starting at batch `first` (to resume mid-epoch)."""
        self.plan.order, self.plan.first, self.plan.stop = self._order(), first, len(self)
        # The epoch's augmentation seed comes from the same generator, after the order: a resumed epoch
        # (generator state restored) draws the same crops and flips.
        self.plan.seed = int(torch.randint(0, SEED_MOD, (), generator=self.generator)) if self.data.augment else 0
        if self.data.workers > 0 and not self.forked:
            # Collect garbage before forking workers: a finished DataLoader left in a reference cycle would be
            # collected inside a worker, whose shutdown code then closes file descriptors the worker uses.
            gc.collect()
            self.forked = True
        for x, idx, bad in self.loader:
            if any(bad):
                x, idx = self._replace_bad(x, idx, bad)
            x = x.to(self.device, non_blocking=True)
            idx = idx.to(self.device, non_blocking=True)
            yield self.normalise(x), self.y[idx], idx

    def _replace_bad(self, x: Tensor, idx: Tensor, bad: list[str]) -> tuple[Tensor, Tensor]:
        """bad_images=fail: stop naming the file; skip: each bad sample takes the place of a good one of its batch."""
        if self.data.bad_images != "skip":
            raise UserError(
                f"{next(b for b in bad if b)}; replace or delete it, or set dataset.bad_images=skip to train on "
                "without it"
            )
        ok = torch.tensor([not b for b in bad])
        for message in bad:
            if message and message not in self.bad_names:
                self.bad_names.add(message)
                log.warning("bad_images=skip: %s; it is replaced by another image of its batch", message)
        good = torch.nonzero(ok).flatten()
        if len(good) == 0:
            raise UserError(f"every image of a batch cannot be read (e.g. {bad[0]}); check the dataset's files")
        broken = torch.nonzero(~ok).flatten()
        self.bad_reads += len(broken)
        take = good[torch.arange(len(broken)) % len(good)]
        x, idx = x.clone(), idx.clone()
        x[broken], idx[broken] = x[take], idx[take]
        return x, idx

    def close(self) -> None:
        """End the persistent workers now, not whenever this object is collected (DataLoader has no public way:
        its kept iterator is shut down)."""
        kept = getattr(self.loader, "_iterator", None)
        if kept is not None and hasattr(kept, "_shutdown_workers"):
            kept._shutdown_workers()
        self.loader._iterator = None


Batches = DeviceBatches | StreamBatches


def make_batches(
    data: TensorSet | StreamSet,
    batch_size: int,
    device: torch.device,
    shuffle: bool,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    drop_last: bool = False,
) -> Batches:
    """The batches of `data` (see the module's docstring); `drop_last`: whole global batches only."""
    order = {"seed": seed, "rank": rank, "world": world, "drop_last": drop_last}
    if isinstance(data, StreamSet):
        return StreamBatches(data, batch_size, device, shuffle, **order)
    return DeviceBatches(data, batch_size, device, shuffle, **order)
