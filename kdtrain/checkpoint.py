"""Atomic writes and safe loads. Nothing a user hands us is unpickled with code execution:
checkpoints load with `torch.load(weights_only=True)`, weights with safetensors."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kdtrain.errors import UserError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temp file in the same directory, fsync it, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    atomic_write(path, lambda p: torch.save(state, p))


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, Any] | None = None) -> None:
    """Save tensors as safetensors; `metadata` values are stored as JSON strings."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_checkpoint(path: Path, what: str) -> dict[str, Any]:
    """Load a `.pt` checkpoint without executing code; one clear UserError when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; give the path of a .pt or .safetensors file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a checkpoint, or a pickle that wants to run code
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {path} cannot be loaded safely ({first[:200]}); it is corrupt or not a kdtrain/PyTorch checkpoint") from None
    if not isinstance(state, dict):
        raise UserError(f"{what} {path} holds a {type(state).__name__}, not a checkpoint dictionary")
    return state


def load_state_dict_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Model weights from a .safetensors file, or from a .pt file (a state dict, or a checkpoint holding one)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise UserError(f"{what} {path} does not exist; give the path of a .pt or .safetensors file")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{what} {path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from None
    state = load_checkpoint(path, what)
    for key in ("student", "model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{what} {path} holds no model weights (expected a state dict of tensors)")
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """load_state_dict with a one-line error naming the first mismatched keys or shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected:
        raise UserError(
            f"{what} {path} is for another architecture: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}; "
            "check that the model config matches the one the checkpoint was trained with"
        )
    if shapes:
        k = shapes[0]
        raise UserError(
            f"{what} {path} does not fit the model: {k} has shape {tuple(state[k].shape)} in the file but "
            f"{tuple(own[k].shape)} in the model (another number of classes or another width?)"
        )
    model.load_state_dict(state)
