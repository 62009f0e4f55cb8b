"""What distillation bought: the student's size, compute and CPU latency against the teacher's.

`compression_report` counts parameters, FLOPs of one forward pass at batch 1
(`torch.utils.flop_counter.FlopCounterMode`: a multiply-add counts as 2 FLOPs; only the ops it
knows, mainly matmul and convolution, are counted) and times forwards on the CPU at batch 1 and 64, on one thread.
Latency is the median of a few timed forwards after warm-up, in eval mode under `torch.no_grad`,
on a copy of each model (the models passed in are left as they are). The timing loops stop after
`budget_s` seconds per model and batch size, so the report stays cheap for any model.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

BATCHES = (1, 64)


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass of `model` on `x` (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())


def cpu_latency_ms(model: nn.Module, x: torch.Tensor, warmup: int = 2, reps: int = 10, budget_s: float = 0.15) -> float:
    """Median wall time of a forward pass in milliseconds (at least one timed pass, at most `reps`)."""
    with torch.no_grad():
        for _ in range(warmup):
            model(x)
        times: list[float] = []
        deadline = time.perf_counter() + budget_s
        while len(times) < reps and (not times or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _profile(model: nn.Module, in_shape: tuple[int, ...], budget_s: float) -> dict[str, Any]:
    cpu_model = copy.deepcopy(model).to("cpu").eval()
    params = sum(p.numel() for p in cpu_model.parameters())
    out: dict[str, Any] = {"params": int(params), "flops": count_flops(cpu_model, torch.zeros(1, *in_shape))}
    out["latency_ms"] = {
        f"batch_{b}": cpu_latency_ms(cpu_model, torch.zeros(b, *in_shape), budget_s=budget_s) for b in BATCHES
    }
    return out


def _ratio(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


def compression_report(
    teacher: nn.Module,
    student: nn.Module,
    in_shape: tuple[int, ...] | list[int],
    device: torch.device | str | None = None,
    budget_s: float = 0.15,
) -> dict[str, Any]:
    """Parameters, FLOPs (batch 1) and CPU latency (batch 1 and 64) of teacher and student, and their ratios.

    Ratios are teacher / student: how many times smaller (params, FLOPs) and faster (latency) the
    student is. `device` is where the models were trained (recorded only: latency is always
    measured on the CPU, the deployment case this report is for).
    """
    in_shape = tuple(int(d) for d in in_shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: comparable across machines, immune to busy cores
    try:
        t = _profile(teacher, in_shape, budget_s)
        s = _profile(student, in_shape, budget_s)
    finally:
        torch.set_num_threads(threads)
    ratios = {"params": _ratio(t["params"], s["params"]), "flops": _ratio(t["flops"], s["flops"])}
    for b in BATCHES:
        key = f"batch_{b}"
        ratios[f"latency_{key}"] = _ratio(t["latency_ms"][key], s["latency_ms"][key])
    return {
        "teacher": t,
        "student": s,
        "ratios": ratios,
        "latency_device": "cpu",
        "threads": 1,
        "trained_on": str(device) if device is not None else None,
        "input_shape": list(in_shape),
    }
