"""Where a small temperature switches knowledge distillation off (config.MIN_TEMPERATURE).

For random student/teacher logits (64 samples, 10 classes, std 5, five seeds) in float32, prints the KD
loss (T^2 * KL) and the norm of its gradient w.r.t. the student logits, relative to T = 4, and the
largest T at which either is exactly 0.

    PYTHONPATH=. python scripts/kd_small_temperature.py
"""

from __future__ import annotations

import torch

from kdtrain.losses import kd_loss

TEMPERATURES = [4.0, 1.0, 0.1, 0.01, 1e-3, 1e-6, 1e-12, 1e-20, 1e-21, 1e-22, 1e-23, 1e-25, 1e-30]


def measure(seed: int) -> dict[float, tuple[float, float]]:
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(64, 10, generator=g) * 5).requires_grad_()
    t = torch.randn(64, 10, generator=g) * 5
    out = {}
    for temperature in TEMPERATURES:
        s.grad = None
        loss = kd_loss(s, t, temperature)
        loss.backward()
        out[temperature] = (loss.item(), s.grad.norm().item())
    return out


def main() -> None:
    runs = [measure(seed) for seed in range(5)]
    print(f"{'T':>8} {'loss / loss(T=4)':>18} {'grad / grad(T=4)':>18}  (min..max over 5 seeds)")
    for temperature in TEMPERATURES:
        loss = [r[temperature][0] / r[4.0][0] for r in runs]
        grad = [r[temperature][1] / r[4.0][1] for r in runs]
        print(f"{temperature:>8g} {min(loss):>8.2e}..{max(loss):<9.2e} {min(grad):>8.2e}..{max(grad):<9.2e}")
    for name, i in (("loss", 0), ("gradient", 1)):
        zero = [max((T for T in TEMPERATURES if r[T][i] == 0), default=None) for r in runs]
        print(f"largest T with the {name} exactly 0, per seed: {zero}")


if __name__ == "__main__":
    main()
