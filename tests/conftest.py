"""Shared fixtures: compose the real config (as the CLI does) and shrink it to a few steps."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import DictConfig

from kdtrain.config import register_schema

register_schema()

# Tiny runs: two epochs of the student, one of the teacher.
TINY = ["epochs=2", "teacher_train.epochs=1", "progress=off"]


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> Path:
    """One teacher store for the session, so the tiny teacher is trained once."""
    return tmp_path_factory.mktemp("teachers")


@pytest.fixture
def compose(store):
    def _compose(*overrides: str) -> DictConfig:
        with hydra.initialize_config_module(config_module="kdtrain.conf", version_base="1.3"):
            return hydra.compose("config", overrides=[*TINY, f"teacher_store={store}", *overrides])

    return _compose


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m kdtrain ARGS` in a subprocess; returns the completed process."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "-m", "kdtrain", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def no_network(monkeypatch) -> list[str]:
    """Any attempt to resolve or connect to a host (but local sockets) fails, and is recorded in the list
    returned, so a test can assert that none was made (a library may swallow the error)."""
    attempts: list[str] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host in (None, "localhost", "127.0.0.1", "::1"):
            return real_getaddrinfo(host, *args, **kwargs)
        attempts.append(f"resolve {host}")
        raise OSError(f"no network in tests (resolving {host})")

    def connect(self, address):
        if self.family == socket.AF_UNIX or (
            isinstance(address, tuple) and address[0] in ("127.0.0.1", "::1", "localhost")
        ):
            return real_connect(self, address)
        attempts.append(f"connect {address}")
        raise OSError(f"no network in tests (connecting to {address})")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts
