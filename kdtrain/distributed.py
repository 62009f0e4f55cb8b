"""torchrun support: process group, rank checks and the few collectives the loop needs.

Under `torchrun --nproc-per-node=N -m kdtrain ...` every rank runs the same command. Rank 0 alone
writes files (logs, metrics, checkpoints, the teacher store); the others compute and wait at
barriers. Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Long enough for rank 0 to train a teacher while the other ranks wait at a barrier.
TIMEOUT = timedelta(hours=float(os.environ.get("KDTRAIN_DIST_TIMEOUT_HOURS", "12")))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def enabled() -> bool:
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def init(device_type: str | None = None) -> None:
    """Join the process group torchrun describes (NCCL on CUDA, gloo otherwise); idempotent."""
    if not enabled() or dist.is_initialized():
        return
    backend = "nccl" if (device_type or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=TIMEOUT)


def barrier() -> None:
    if enabled() and dist.is_initialized():
        dist.barrier()


@contextmanager
def rank0_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. trains and stores the teacher); the others run it after."""
    if is_main():
        yield
        barrier()
    else:
        barrier()
        yield


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of `obj` on every rank."""
    if not (enabled() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if enabled() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def average_gradients(params: list[torch.Tensor]) -> None:
    """Average the gradients of parameters that DDP does not manage (the feature adapters)."""
    if not (enabled() and dist.is_initialized()):
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def device_for_rank(name: str) -> str:
    """`cuda` under torchrun means this rank's GPU (LOCAL_RANK)."""
    if enabled() and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank()}"
    return name


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
