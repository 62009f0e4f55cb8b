"""Pretrained weights that download on first use, into the usual caches, with an offline switch.

* torchvision weights go to the torch hub cache (`torch.hub.get_dir()/checkpoints/`, i.e.
  `$TORCH_HOME/hub/checkpoints/`), named as torchvision names them; the hash prefix in the name is
  checked on download, as `torch.hub.load_state_dict_from_url(check_hash=True)` does.
* timm weights go through timm's own loading: the Hugging Face Hub cache (`$HF_HOME/hub`, or
  `$HF_HUB_CACHE`), or the torch hub cache for the few that come from a plain URL.

Offline (`offline=true`, or `HF_HUB_OFFLINE=1` in the environment) nothing may touch the network:
a file that is not cached is an error naming the file to place and where.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch

from kdtrain.errors import UserError

# offline=true of the current run (set by kdtrain.run); HF_HUB_OFFLINE=1 in the environment also counts.
_offline = False


def set_offline(value: bool) -> None:
    global _offline
    _offline = bool(value)


def is_offline() -> bool:
    return _offline or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def is_network_error(e: BaseException) -> bool:
    """URLError, HTTP errors, timeouts, refused connections (urllib, httpx, requests, huggingface_hub)."""
    if isinstance(e, OSError):  # URLError, HTTPError, socket errors, TimeoutError, HfHubHTTPError are OSErrors
        return True
    return type(e).__module__.split(".")[0] in ("httpx", "httpcore", "requests", "urllib3", "huggingface_hub")


def cached_download(url: str, what: str) -> Path:
    """The torch hub cache's copy of `url`, downloaded (with a progress bar and the hash check) when missing."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])
    if cached.is_file():
        return cached
    if is_offline():
        raise UserError(
            f"{what} needs {cached}, which is not there, and offline mode forbids downloading it "
            f"(offline=true or HF_HUB_OFFLINE=1): download {url} elsewhere and place it at that path "
            "(the torch hub cache, $TORCH_HOME/hub/checkpoints), or give the path of a weights file"
        )
    match = torch.hub.HASH_REGEX.search(cached.name)
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Writes to a temporary file and renames it when complete: an interrupted download leaves nothing.
        torch.hub.download_url_to_file(url, str(cached), match.group(1) if match else None, progress=True)
    except RuntimeError as e:
        if "invalid hash value" in str(e):
            raise UserError(
                f"{what}: the download of {url} is corrupt ({_first_line(e)}); run again, or place an intact copy "
                f"at {cached}"
            ) from None
        raise
    except Exception as e:
        if not is_network_error(e):
            raise
        raise UserError(
            f"{what}: downloading {url} failed ({type(e).__name__}: {_first_line(e)}); check the network or proxy, "
            f"or place the file at {cached} yourself (or give the path of a weights file)"
        ) from None
    return cached


def _refuse_url(url: str, dst: str, *args: object, **kwargs: object) -> None:
    raise UserError(
        f"the timm weights {url} are not cached and offline mode forbids downloading them: download the file "
        f"elsewhere and place it at {Path(torch.hub.get_dir()) / 'checkpoints' / os.path.basename(url)}, "
        "or give its path with pretrained=PATH"
    )


@contextmanager
def offline_guard() -> Iterator[None]:
    """While timm loads pretrained weights offline: the Hugging Face Hub in offline mode (cached files
    only), and torch hub downloads refused with a UserError naming the file."""
    if not is_offline():
        yield
        return
    import huggingface_hub.constants as hf

    # huggingface_hub reads its offline flag when it is imported; setting it here covers offline=true.
    with (
        mock.patch.object(hf, "HF_HUB_OFFLINE", True),
        mock.patch.object(torch.hub, "download_url_to_file", _refuse_url),
    ):
        yield


def hf_cache() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return str(HF_HUB_CACHE)
