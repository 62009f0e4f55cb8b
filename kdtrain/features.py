"""Feature capture by forward hooks, and the adapter that maps student features onto the teacher's.

The default feature is the penultimate representation: the input of the model's last nn.Linear
(its classifier). Hooks work on any nn.Module without rewriting it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kdtrain.errors import UserError


def classifier_name(model: nn.Module, role: str) -> str:
    """Module path of the last nn.Linear: its input is the penultimate feature."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError(f"the {role} model has no nn.Linear classifier, so its penultimate feature cannot be found")
    return names[-1]


class FeatureHook:
    """Keeps the input of one module from the latest forward pass (overwritten each step, never accumulated)."""

    def __init__(self, model: nn.Module, role: str):
        self.path = classifier_name(model, role)
        self.value: Tensor | None = None
        module = model.get_submodule(self.path)
        self._handle = module.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.value = args[0].flatten(1)

    def pop(self) -> Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError(f"the hooked module {self.path!r} did not run in the forward pass")
        return value

    def remove(self) -> None:
        self._handle.remove()


def build_adapter(student_dim: int, teacher_dim: int) -> nn.Module:
    """A learned linear map when the sizes differ (FitNets' regressor), identity otherwise."""
    if student_dim == teacher_dim:
        return nn.Identity()
    return nn.Linear(student_dim, teacher_dim)


@torch.no_grad()
def feature_dim(model: nn.Module, in_shape: tuple[int, int, int], role: str, device: torch.device) -> int:
    """Size of the penultimate feature, from one dry forward pass at the real input size."""
    hook = FeatureHook(model, role)
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros((2, *in_shape), device=device))
        return hook.pop().shape[1]
    finally:
        hook.remove()
        model.train(was_training)
