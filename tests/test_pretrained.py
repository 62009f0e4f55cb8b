"""Pretrained weights: downloaded once into the caches, reused after, refused offline; no test reaches the internet."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from urllib.error import HTTPError, URLError

import pytest
import torch
from torchvision import models

from kdtrain.errors import UserError
from kdtrain.models import build_model
from kdtrain.models.hub import set_offline

ARCH = "mobilenet_v3_small"
URL = models.get_model_weights(ARCH).DEFAULT.url  # .../mobilenet_v3_small-047dcff4.pth


def tv(num_classes: int = 10, **kw) -> torch.nn.Module:
    return build_model({"name": "torchvision", "arch": ARCH, **kw}, num_classes, (3, 32, 32), "teacher")


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]):
    """An empty torch hub cache in tmp_path, and a fake download that writes ImageNet-shaped weights
    (the record of its calls is returned). Offline mode is off unless a test switches it on."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls: list[tuple] = []
    torch.manual_seed(0)
    state = models.get_model(ARCH, weights=None, num_classes=1000).state_dict()

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, Path(dst), hash_prefix, progress))
        torch.save(state, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    yield {"calls": calls, "state": state, "cached": tmp_path / "hub" / "checkpoints" / Path(URL).name}
    set_offline(False)
    assert no_network == []


def test_default_downloads_once_then_reuses_the_cache(hub) -> None:
    model = tv(pretrained="DEFAULT")
    # torch hub's name, with the hash prefix torch hub checks on download; a progress bar.
    assert hub["calls"] == [(URL, hub["cached"], "047dcff4", True)]
    assert torch.equal(model.net.state_dict()["features.0.0.weight"], hub["state"]["features.0.0.weight"])
    assert model.head_pretrained is False  # 1000 ImageNet classes, 10 here: a new head
    assert tv(1000, pretrained="IMAGENET1K_V1").head_pretrained is True
    assert len(hub["calls"]) == 1  # the second model read the cached file


def test_a_file_in_the_cache_is_used_without_downloading(hub) -> None:
    hub["cached"].parent.mkdir(parents=True)
    torch.save(hub["state"], hub["cached"])
    set_offline(True)
    model = tv(1000, pretrained="DEFAULT")
    assert hub["calls"] == []
    assert torch.equal(model.net.state_dict()["classifier.3.weight"], hub["state"]["classifier.3.weight"])


@pytest.mark.parametrize("how", ["config", "env"])
def test_offline_refuses_to_download_and_names_the_file(hub, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    if how == "config":
        set_offline(True)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        UserError, match=rf"needs {hub['cached']}, which is not there, and offline mode .*download {URL}"
    ):
        tv(pretrained="DEFAULT")
    assert hub["calls"] == []


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (URLError("[Errno -3] Temporary failure in name resolution"), r"URLError: <urlopen error .*name resolution>"),
        (HTTPError(URL, 403, "Forbidden", None, None), r"HTTPError: HTTP Error 403: Forbidden"),
        (TimeoutError("The read operation timed out"), r"TimeoutError: The read operation timed out"),
    ],
)
def test_network_errors_are_one_line(hub, monkeypatch: pytest.MonkeyPatch, error: Exception, shown: str) -> None:
    def unreachable(url, dst, hash_prefix=None, progress=True):
        raise error

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(UserError, match=rf"downloading {URL} failed \({shown}\); check the network"):
        tv(pretrained="DEFAULT")

    def corrupt(url, dst, hash_prefix=None, progress=True):
        raise RuntimeError(f'invalid hash value (expected "{hash_prefix}", got "0000")')

    monkeypatch.setattr(torch.hub, "download_url_to_file", corrupt)
    with pytest.raises(UserError, match=r"the download of .* is corrupt \(invalid hash value"):
        tv(pretrained="DEFAULT")
    assert not hub["cached"].exists()


timm_missing = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="needs timm")
TIMM_ARCH = "test_resnet.r160_in1k"  # one of timm's tiny test models, on the Hugging Face Hub as timm/...


def _hf_cache_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """Point the Hugging Face cache at tmp_path and place the weights there as `hf download` would."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    import timm
    from safetensors.torch import save_file

    state = timm.create_model(TIMM_ARCH, pretrained=False).state_dict()
    snapshot = tmp_path / "hf" / f"models--timm--{TIMM_ARCH}" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return state


@timm_missing
def test_timm_pretrained_true_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]) -> None:
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "empty"))
    set_offline(True)
    try:
        spec = {"name": "timm", "arch": TIMM_ARCH, "pretrained": True}
        with pytest.raises(
            UserError,
            match=rf"not in the Hugging Face cache \({tmp_path / 'empty'}\) .*huggingface.co/timm/{TIMM_ARCH}",
        ):
            build_model(spec, 10, (3, 32, 32), "teacher")
        state = _hf_cache_with(tmp_path, monkeypatch)
        model = build_model(spec, 1000, (3, 32, 32), "teacher")  # timm's own loading, from the cache
        first = next(iter(state))
        assert torch.equal(model.net.state_dict()[first], state[first])
        assert model.head_pretrained is True
        assert build_model(spec, 10, (3, 32, 32), "teacher").head_pretrained is False
    finally:
        set_offline(False)
    assert no_network == []
