"""Feature distillation between any teacher and student: layers by module path, automatic adapters.

Features are captured with forward hooks (any nn.Module works, nothing is rewritten). The special
path `auto` is the penultimate representation: the input of the model's last nn.Linear. Shapes come
from one dry forward pass at the real input size; adapters are built on the student side only (as
in FitNets) and trained with the student:

- vector -> vector: a linear map (identity when the sizes match);
- map -> map: a 1x1 conv + BN when the channels differ, and spatial alignment when the sizes differ
  (`align=pool`: the larger map is average-pooled down; `align=interpolate`: the smaller one is
  bilinearly upsampled);
- map -> vector (or vector -> map): the map is globally average-pooled, then a linear map.

Losses (float32): `mse`, `smooth_l1`, `cosine` (1 - cosine similarity of the flattened features) and
`at`, attention transfer (Zagoruyko & Komodakis 2017): the mean over channels of the squared feature
map, flattened and L2-normalised, compared by mean squared error; it needs no adapter.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtrain.errors import UserError
from kdtrain.losses import feature_loss

AUTO = "auto"
LOSSES = ("mse", "smooth_l1", "cosine", "at")
ALIGNS = ("pool", "interpolate")


@dataclass
class Pair:
    student: str
    teacher: str
    weight: float = 1.0


def classifier_name(model: nn.Module, role: str, key: str = "feature") -> str:
    """Module path of the last nn.Linear: its input is the penultimate feature."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError(
            f"the {role} model has no nn.Linear classifier, so its penultimate feature cannot be found; "
            f"name a layer with {key}.{role}=PATH (see kdtrain-inspect)"
        )
    return names[-1]


def parse_pairs(feature: Any) -> list[Pair]:
    """Pairs from `feature.pairs`, or the short form `feature.student=X feature.teacher=Y`, or `auto`."""
    if feature is None:
        return [Pair(AUTO, AUTO)]
    pairs = list(feature.get("pairs") or [])
    short = feature.get("student"), feature.get("teacher")
    if pairs and any(short):
        raise UserError("give either feature.pairs or feature.student/feature.teacher, not both")
    if any(short):
        return [Pair(str(short[0] or AUTO), str(short[1] or AUTO), 1.0)]
    if not pairs:
        return [Pair(AUTO, AUTO)]
    out = []
    for i, p in enumerate(pairs):
        if not hasattr(p, "get") or p.get("student") is None or p.get("teacher") is None:
            raise UserError(
                f"feature.pairs[{i}] needs student and teacher module paths, e.g. {{student: layer3, teacher: layer3}}"
            )
        try:
            weight = float(p.get("weight", 1.0))
        except (TypeError, ValueError):
            weight = float("nan")
        if not math.isfinite(weight):
            raise UserError(
                f"feature.pairs[{i}].weight={p.get('weight')} is not accepted: it must be a number >= 0 (e.g. 1.0)"
            )
        if weight < 0:
            raise UserError(f"feature.pairs[{i}].weight={weight} is out of range: it must be >= 0")
        out.append(Pair(str(p["student"]), str(p["teacher"]), weight))
    return out


def _module(model: nn.Module, path: str, role: str, key: str = "feature") -> tuple[nn.Module, bool]:
    """(module to hook, capture its input?) for a module path; one clear error for an unknown path, naming
    the setting `key.role` it came from."""
    if path == AUTO:
        return model.get_submodule(classifier_name(model, role, key)), True
    names = [n for n, _ in model.named_modules() if n]
    if path not in names:
        close = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
        hint = f"; nearest: {', '.join(close)}" if close else ""
        raise UserError(
            f"{key}.{role}={path} is not a module of the {role} model{hint}; "
            f"list its module paths with kdtrain-inspect{' --teacher' if role == 'teacher' else ''} (or "
            "model.named_modules())"
        )
    return model.get_submodule(path), False


class Capture:
    """Keeps the outputs of some modules from the latest forward pass; `pop` hands them over and forgets them."""

    def __init__(self, model: nn.Module, paths: list[str], role: str, key: str = "feature"):
        self.values: list[Tensor | None] = [None] * len(paths)
        self.paths = paths
        self.handles = []
        for i, path in enumerate(paths):
            module, use_input = _module(model, path, role, key)
            if use_input:
                self.handles.append(module.register_forward_pre_hook(self._keeper(i, lambda args, out: args[0])))
            else:
                self.handles.append(module.register_forward_hook(self._keeper(i, lambda args, out: out)))

    def _keeper(self, i: int, pick: Callable[[tuple, Any], Any]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: Any = None) -> None:
            value = pick(args, out)
            self.values[i] = value[0] if isinstance(value, (tuple, list)) else value

        return hook

    def pop(self) -> list[Tensor]:
        values, self.values = self.values, [None] * len(self.paths)
        missing = [p for p, v in zip(self.paths, values) if v is None]
        if missing:
            raise RuntimeError(f"the hooked module {missing[0]!r} did not run in the forward pass")
        return values  # type: ignore[return-value]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _flat(x: Tensor) -> Tensor:
    return x.flatten(1)


def _is_map(shape: torch.Size) -> bool:
    return len(shape) == 4


def _resize(x: Tensor, size: tuple[int, int], align: str) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    if align == "pool":
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class Adapter(nn.Module):
    """Maps one student feature onto one teacher feature: `forward(s, t) -> (adapted s, target t)`."""

    def __init__(self, s_shape: torch.Size, t_shape: torch.Size, loss: str, align: str):
        super().__init__()
        self.align = align
        self.kind = "at" if loss == "at" else _kind(s_shape, t_shape)
        self.proj: nn.Module = nn.Identity()
        if self.kind == "at":
            if not (_is_map(s_shape) and _is_map(t_shape)):
                raise UserError(
                    "feature.loss=at compares feature maps: choose conv layers (4-D outputs) for both models"
                )
            self.size = _target_size(s_shape, t_shape, align)
        elif self.kind == "map":
            if s_shape[1] != t_shape[1]:
                self.proj = nn.Sequential(nn.Conv2d(s_shape[1], t_shape[1], 1, bias=False), nn.BatchNorm2d(t_shape[1]))
            self.size = _target_size(s_shape, t_shape, align)
        else:
            s_dim = s_shape[1] if _is_map(s_shape) else _flat_dim(s_shape)
            t_dim = t_shape[1] if _is_map(t_shape) else _flat_dim(t_shape)
            if s_dim != t_dim:
                self.proj = nn.Linear(s_dim, t_dim)

    def forward(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        if self.kind in ("map", "at"):
            s = _resize(self.proj(s), self.size, self.align)
            return s, _resize(t, self.size, self.align)
        if _is_map(s.shape):
            s = F.adaptive_avg_pool2d(s, 1)
        if _is_map(t.shape):
            t = F.adaptive_avg_pool2d(t, 1)
        return self.proj(_flat(s)), _flat(t)


def _kind(s_shape: torch.Size, t_shape: torch.Size) -> str:
    return "map" if _is_map(s_shape) and _is_map(t_shape) else "vector"


def _flat_dim(shape: torch.Size) -> int:
    return int(torch.Size(shape[1:]).numel())


def _target_size(s_shape: torch.Size, t_shape: torch.Size, align: str) -> tuple[int, int]:
    s_hw, t_hw = tuple(s_shape[-2:]), tuple(t_shape[-2:])
    smaller = s_hw if s_hw[0] * s_hw[1] <= t_hw[0] * t_hw[1] else t_hw
    larger = t_hw if smaller == s_hw else s_hw
    return smaller if align == "pool" else larger


def attention_map(f: Tensor) -> Tensor:
    return F.normalize(f.float().pow(2).mean(1).flatten(1), dim=1)


def pair_loss(kind: str, s: Tensor, t: Tensor) -> Tensor:
    """One pair's loss, in float32."""
    if kind == "at":
        return (attention_map(s) - attention_map(t)).pow(2).mean()
    s, t = _flat(s.float()), _flat(t.float())
    if kind == "mse":
        return feature_loss(s, t)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(s, t)
    return (1 - F.cosine_similarity(s, t, dim=1)).mean()


class FeatureDistiller(nn.Module):
    """The feature term: hooks on both models, one adapter per pair, `compute()` -> weighted sum of pair losses.

    Its parameters (the adapters) are training state: optimised, checkpointed and resumed with the
    student, and left out of the exported student weights.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        pairs: list[Pair],
        in_shape: tuple[int, ...],
        device: torch.device,
        loss: str = "mse",
        align: str = "pool",
    ):
        super().__init__()  # `loss` and `align` were checked by config.validate, with the command line
        self.pairs, self.loss_name = pairs, loss
        # Plain attributes (not submodules): the hooks are not state.
        self.__dict__["_student_capture"] = Capture(student, [p.student for p in pairs], "student")
        self.__dict__["_teacher_capture"] = Capture(teacher, [p.teacher for p in pairs], "teacher")
        s_shapes = _probe(student, self._student_capture, in_shape, device)
        t_shapes = _probe(teacher, self._teacher_capture, in_shape, device)
        self.shapes = list(zip(s_shapes, t_shapes))
        self.adapters = nn.ModuleList(Adapter(s, t, loss, align) for s, t in self.shapes)

    def describe(self) -> list[str]:
        return describe_pairs(self.pairs, self.shapes, self.adapters, self.loss_name)

    def compute(self, teacher_feats: list[Tensor] | None = None) -> Tensor:
        """Weighted feature loss of the last forward pass (teacher features from the hooks, or given)."""
        s_feats = self._student_capture.pop()
        t_feats = teacher_feats if teacher_feats is not None else self._teacher_capture.pop()
        return pairs_loss(self.pairs, self.adapters, self.loss_name, s_feats, t_feats)

    def clear(self) -> None:
        """Forget features captured outside a training step (e.g. by evaluation forwards)."""
        self._student_capture.values = [None] * len(self.pairs)
        self._teacher_capture.values = [None] * len(self.pairs)

    def remove(self) -> None:
        self._student_capture.remove()
        self._teacher_capture.remove()


def describe_pairs(pairs: list[Pair], shapes: list[tuple], adapters: nn.ModuleList, loss: str) -> list[str]:
    return [
        f"{p.student} {tuple(s[1:])} -> {p.teacher} {tuple(t[1:])} via {type(a.proj).__name__} "
        f"({loss}, weight {p.weight:g})"
        for p, (s, t), a in zip(pairs, shapes, adapters)
    ]


def pairs_loss(
    pairs: list[Pair], adapters: nn.ModuleList, loss: str, s_feats: list[Tensor], t_feats: list[Tensor]
) -> Tensor:
    """sum over pairs of weight * loss(adapter(student feature), teacher feature), in float32."""
    total = torch.zeros((), device=s_feats[0].device)
    for pair, adapter, s, t in zip(pairs, adapters, s_feats, t_feats):
        adapted, target = adapter(s, t.detach())
        total = total + pair.weight * pair_loss(loss, adapted, target)
    return total


def probe_shapes(
    model: nn.Module, paths: list[str], role: str, in_shape: tuple[int, ...], device: torch.device
) -> list[torch.Size]:
    """Shapes of the features at `paths` (`auto`: the penultimate), from one dry forward of a batch of 2."""
    capture = Capture(model, paths, role)
    try:
        return _probe(model, capture, in_shape, device)
    finally:
        capture.remove()


@torch.no_grad()
def _probe(model: nn.Module, capture: Capture, in_shape: tuple[int, ...], device: torch.device) -> list[torch.Size]:
    """Output shapes of the captured modules, from one dry forward pass at the real input size."""
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros((2, *in_shape), device=device))
        return [v.shape for v in capture.pop()]
    finally:
        model.train(was_training)
