"""Image sources: where a dataset's images come from, read one at a time by index.

A source knows every sample's label up front (listing files decodes nothing) and reads one image on
demand. The memory path (`dataset.loader=memory`) decodes them all once into a uint8 tensor; the stream
path (`dataset.loader=stream`) reads them in DataLoader worker processes, batch by batch.

Reading never runs code from a file: images are decoded by PIL (or torchvision's decoders).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import Tensor

GRAY_MODES = ("L", "1")
# PIL's errors for unreadable files: OSError (incl. UnidentifiedImageError, truncated data),
# ValueError / SyntaxError from some decoders, DecompressionBombError for absurd sizes.
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class BadImage(Exception):
    """An image that cannot be read or decoded; `name` says which (a path, or a dataset row)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name} cannot be read as an image ({reason})")
        self.name, self.reason = name, reason


class ImageSource(Protocol):
    """Images by index 0..len-1 with their labels (int64, class indices)."""

    labels: Tensor

    def __len__(self) -> int: ...

    def read(self, i: int) -> Image.Image:
        """Image i, decoded (any PIL mode); raises BadImage when it cannot be read."""
        ...

    def name(self, i: int) -> str:
        """Where image i comes from, for messages (its path, or dataset and row)."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """A JSON-able identity of the images (for cache keys): changes when any image may have changed."""
        ...

    # Optional: `mode(i) -> str`, image i's PIL mode without decoding it (else the channels are inferred
    # by reading images).


class FileSource:
    """Image files on disk (an image folder, ImageNet's train/ or val/)."""

    def __init__(self, files: list[Path], labels: list[int]):
        self.files = files
        self.labels = torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int) -> Image.Image:
        path = self.files[i]
        try:
            with Image.open(path) as img:
                img.load()
                return img
        except READ_ERRORS as e:
            raise BadImage(str(path), str(e).strip() or type(e).__name__) from None

    def mode(self, i: int) -> str:
        """Image i's PIL mode from its header (no pixels decoded; used to infer the channels)."""
        path = self.files[i]
        try:
            with Image.open(path) as img:
                return img.mode
        except READ_ERRORS as e:
            raise BadImage(str(path), str(e).strip() or type(e).__name__) from None

    def name(self, i: int) -> str:
        return str(self.files[i])

    def fingerprint(self) -> dict[str, Any]:
        """Every file's path, size and modification time (no pixels read: a million files hash in seconds)."""
        h = hashlib.sha256()
        for path, label in zip(self.files, self.labels.tolist()):
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
        return {"files": len(self.files), "sha256": h.hexdigest()}
