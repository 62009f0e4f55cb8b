"""scikit-learn's bundled digits: 1,797 8x8 grayscale images of 10 classes, no download."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from kdtrain.data import Splits, TensorSet, make_transfer_set, register
from kdtrain.errors import UserError


@register("digits")
def digits(cfg: DictConfig) -> Splits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    y = torch.tensor(data.target, dtype=torch.int64)
    if not 10 <= cfg.val_size <= len(y) - 10:
        raise UserError(f"dataset.val_size={cfg.val_size} is out of range for digits: use 10..{len(y) - 10}")
    train_idx, val_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=int(cfg.val_size), stratify=y.numpy(), random_state=int(cfg.split_seed)
    )
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    # Normalise with the training split's statistics.
    mean, std = x[train_idx].mean().item(), x[train_idx].std().item()
    x = (x - mean) / std
    train = TensorSet(x[train_idx], y[train_idx])
    student, teacher = make_transfer_set(train, 10, cfg)
    return Splits(
        train=student,
        teacher_train=teacher,
        val=TensorSet(x[val_idx], y[val_idx]),
        num_classes=10,
        in_shape=(1, 8, 8),
        mean=[mean],
        std=[std],
    )
