"""Collapse: a model whose training accuracy stays at chance, or whose loss does not fall, for several epochs.

The usual cause is a learning rate far too high for the model: the weights blow up or every ReLU dies,
the outputs become constant and the loss settles. Such a run finishes without an error, so kdtrain
says so once (a warning) and marks the model `collapsed` in `summary.json`; the sweep table flags it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

log = logging.getLogger("kdtrain")

EPOCHS = 3  # consecutive epochs at chance (or without a falling loss) before a model is called collapsed


def chance_threshold(num_classes: int) -> float:
    """Training accuracy at or below which a model is at chance: twice the chance level 1/C
    (at most halfway between 1/C and 1, for 2 classes)."""
    return min(2.0 / num_classes, (1.0 + 1.0 / num_classes) / 2)


def collapse_epoch(rows: list[dict[str, Any]], num_classes: int, skip: int = 0) -> int | None:
    """The epoch by which the metrics `rows` (in epoch order) had been stuck for EPOCHS consecutive epochs
    (training accuracy at chance, or a mean cross-entropy not below the first counted epoch's), or None.

    The CE column is watched, not the total loss: the total changes make-up while terms warm up (DKD's and
    ReviewKD's weights ramp over 20 epochs, so their total loss rises while the model learns); rows without
    a CE column fall back on the loss. The first `skip` epochs are not counted: FitNets' hint stage trains no
    classifier."""
    threshold = chance_threshold(num_classes)
    first_loss, streak = None, 0
    for row in rows:
        if row["epoch"] <= skip:
            continue
        loss = row.get("ce", row.get("loss"))
        loss = float("nan") if loss is None else float(loss)
        stuck = row["train_acc"] <= threshold or (first_loss is not None and not loss < first_loss)
        if first_loss is None:
            first_loss = loss if math.isfinite(loss) else float("inf")
        streak = streak + 1 if stuck else 0
        if streak >= EPOCHS:
            return int(row["epoch"])
    return None


def warn(label: str, epoch: int, num_classes: int, lr_key: str, lr: float) -> None:
    log.warning(
        "%s collapsed: its training accuracy stayed at chance (<= %.0f%%) or its cross-entropy did not fall for %d "
        "epochs (by epoch %d); the likely cause is a learning rate too high for it: lower %s (now %g), e.g. %s=%g",
        label,
        100 * chance_threshold(num_classes),
        EPOCHS,
        epoch,
        lr_key,
        lr,
        lr_key,
        lr / 10,
    )


class CollapseWatch:
    """A per-epoch check: warns once when the model collapses; `epoch` is when it did (None: it did not)."""

    def __init__(self, label: str, num_classes: int, lr_key: str, lr: float, skip: int = 0):
        self.label, self.num_classes, self.lr_key, self.lr, self.skip = label, num_classes, lr_key, lr, skip
        self.rows: list[dict[str, Any]] = []
        self.epoch: int | None = None

    def __call__(self, row: dict[str, Any]) -> None:
        self.rows.append({"epoch": row["epoch"], "train_acc": row["train_acc"], "loss": row.get("loss")})
        if self.epoch is None:
            self.epoch = collapse_epoch(self.rows, self.num_classes, self.skip)
            if self.epoch is not None:
                warn(self.label, self.epoch, self.num_classes, self.lr_key, self.lr)

    def then(self, sink: Callable[[dict[str, Any]], None] | None) -> Callable[[dict[str, Any]], None]:
        """A callback that checks the row, then hands it to `sink`."""

        def on_epoch(row: dict[str, Any]) -> None:
            self(row)
            if sink is not None:
                sink(row)

        return on_epoch
