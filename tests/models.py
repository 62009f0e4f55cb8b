"""Test-only models, used as `student=custom student._target_=tests.models.NAME`.

`Scripted` misbehaves on cue, counted in training-mode forward passes of one instance and set by
environment variables (so the config, which a resume compares, stays the same):
KDTRAIN_TEST_NAN_AT=N (the Nth forward returns NaN logits), KDTRAIN_TEST_SIGNAL_AT=N (the Nth
forward sends KDTRAIN_TEST_SIGNAL, default SIGTERM, to its own process), KDTRAIN_TEST_SIGNAL_INSTANCE=K
(only the Kth instance built in the process signals: 2 is the baseline's student), KDTRAIN_TEST_SIGNAL_RANK=R
(under torchrun only rank R signals) and KDTRAIN_TEST_SLEEP=S (each forward sleeps S seconds).
"""

from __future__ import annotations

import math
import os
import signal
import time

import torch
from torch import Tensor, nn


class Scripted(nn.Module):
    """An MLP with dropout (so resume must restore the global RNG to match) that misbehaves on cue."""

    instances = 0  # built in this process

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int], hidden: int = 16):
        super().__init__()
        Scripted.instances += 1
        self.instance = Scripted.instances
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), hidden), nn.ReLU(), nn.Dropout(0.3))
        self.fc = nn.Linear(hidden, num_classes)
        self.forwards = 0
        self.nan_at = int(os.environ.get("KDTRAIN_TEST_NAN_AT", "0"))
        self.signal_at = int(os.environ.get("KDTRAIN_TEST_SIGNAL_AT", "0"))
        self.signal = signal.Signals[os.environ.get("KDTRAIN_TEST_SIGNAL", "SIGTERM")]
        self.sleep = float(os.environ.get("KDTRAIN_TEST_SLEEP", "0"))

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc(self.body(x))
        if not self.training:
            return out
        self.forwards += 1
        if self.sleep:
            time.sleep(self.sleep)
        rank = os.environ.get("RANK", "0")
        if (
            self.forwards == self.signal_at
            and self.instance == int(os.environ.get("KDTRAIN_TEST_SIGNAL_INSTANCE", self.instance))
            and rank == os.environ.get("KDTRAIN_TEST_SIGNAL_RANK", rank)
        ):
            os.kill(os.getpid(), self.signal)
        if self.forwards == self.nan_at:
            out = out * torch.tensor(float("nan"))
        return out


class NoLinear(nn.Module):
    """A classifier without nn.Linear (a 1x1 convolution head): it has no penultimate feature to hook."""

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int]):
        super().__init__()
        self.head = nn.Conv2d(in_shape[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x).mean((2, 3))


class NaNLogits(nn.Module):
    """A linear classifier whose training-mode logits are always NaN: every step's loss is non-finite."""

    def __init__(self, num_classes: int, in_shape: tuple[int, int, int]):
        super().__init__()
        self.fc = nn.Linear(math.prod(in_shape), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc(x.flatten(1))
        return out * torch.tensor(float("nan")) if self.training else out
