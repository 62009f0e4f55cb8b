"""ReviewKD, knowledge review (Chen, Liu, Zhao & Jia, CVPR 2021), with mdistiller's CIFAR settings.

The student's stage features are fused top-down by attention-based fusion (ABF) modules: the deepest
stage (the pooled penultimate feature, as a C x 1 x 1 map) goes through its ABF first; every shallower
stage's ABF maps its own feature to `mid_channels` (1x1 conv + BN), upsamples the fused feature of the
stage below it to its own size, fuses the two with two sigmoid attention maps computed by a 1x1 conv on
their concatenation, and maps the result to the teacher stage's channels and size (3x3 conv + BN). Each
output is compared with the teacher's feature at the same stage by the hierarchical context loss (HCL):
the MSE at full size plus the MSE after adaptive average pooling to 4x4, 2x2 and 1x1 (levels smaller than
the map only), weighted 1, 1/2, 1/4, 1/8 and normalised by the sum of the weights used. The loss is the
sum over stages.

Stages are module paths (features captured by forward hooks, shapes found by one dry forward); when none
are given, `default_stages` picks the last block of each resolution among the model's top-level
containers plus the pooled penultimate feature (`auto`). mdistiller compares the teacher's
pre-activation stage outputs; hooks see what a module returns, which for kdtrain's CIFAR ResNets is the
post-ReLU block output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from kdtrain.errors import UserError
from kdtrain.features import AUTO, Capture, _probe
from kdtrain.terms import Batch, Setup, Term, TermConfig, register

HCL_LEVELS = (4, 2, 1)


def hcl_loss(student_feats: list[Tensor], teacher_feats: list[Tensor]) -> Tensor:
    """Hierarchical context loss summed over stages (float32); each pair must have the same shape."""
    total = torch.zeros((), device=student_feats[0].device)
    for fs, ft in zip(student_feats, teacher_feats, strict=True):
        fs, ft = fs.float(), ft.float()
        loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
        for level in HCL_LEVELS:
            if level >= min(fs.shape[-2:]):
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
            weights += weight
        total = total + loss / weights
    return total


class ABF(nn.Module):
    """Attention-based fusion of one student stage with the fused feature of the deeper stages."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.out = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)  # as the reference implementation
        nn.init.kaiming_uniform_(self.out[0].weight, a=1)

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(output at the teacher stage's channels and size, fused feature handed to the next shallower stage)."""
        x = self.reduce(x)
        if self.attention is not None:
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            a = self.attention(torch.cat([x, deeper], dim=1))
            x = x * a[:, :1] + deeper * a[:, 1:]
        out = x if tuple(x.shape[-2:]) == out_size else F.interpolate(x, size=out_size, mode="nearest")
        return self.out(out), x


def as_map(x: Tensor) -> Tensor:
    """A pooled vector (B, C) as a (B, C, 1, 1) map; maps pass through."""
    return x if x.dim() == 4 else x.flatten(1)[:, :, None, None]


class ReviewKDLoss(nn.Module):
    """ABFs over the student's stages (shallowest first, the deepest last), `forward(s_feats, t_feats)` -> HCL.

    Built from the captured shapes (batch dimension included, as the probe gives them): every stage a
    4-D map or a vector (the pooled penultimate, treated as C x 1 x 1).
    """

    def __init__(self, student_shapes: list[torch.Size], teacher_shapes: list[torch.Size], mid_channels: int | None):
        super().__init__()
        if len(student_shapes) != len(teacher_shapes):
            raise UserError(
                f"reviewkd compares stage by stage: {len(student_shapes)} student stages but "
                f"{len(teacher_shapes)} teacher stages; give as many of each"
            )
        s_ch = [int(s[1]) for s in student_shapes]
        self.out_sizes = [tuple(t[-2:]) if len(t) == 4 else (1, 1) for t in teacher_shapes]
        for role, shapes in (("student", student_shapes), ("teacher", teacher_shapes)):
            bad = [tuple(s[1:]) for s in shapes if len(s) not in (2, 4)]
            if bad:
                raise UserError(
                    f"reviewkd needs feature maps (C x H x W) or pooled vectors; a {role} stage has shape {bad[0]}"
                )
        mid = int(mid_channels) if mid_channels else min(512, s_ch[-1])
        last = len(s_ch) - 1
        self.abfs = nn.ModuleList(
            ABF(c, mid, int(t[1]), fuse=i < last) for i, (c, t) in enumerate(zip(s_ch, teacher_shapes))
        )

    def fuse(self, student_feats: list[Tensor]) -> list[Tensor]:
        """The ABF outputs, shallowest stage first, fused top-down from the deepest."""
        outs: list[Tensor] = []
        deeper = None
        for abf, x, size in zip(reversed(self.abfs), reversed(student_feats), reversed(self.out_sizes)):
            out, deeper = abf(as_map(x), deeper, size)
            outs.insert(0, out)
        return outs

    def forward(self, student_feats: list[Tensor], teacher_feats: list[Tensor]) -> Tensor:
        return hcl_loss(self.fuse(student_feats), [as_map(t.detach()) for t in teacher_feats])


def _stage_root(model: nn.Module) -> tuple[str, nn.Module]:
    """(path prefix, module) past single-child wrappers such as kdtrain's InputAdapter (`net`)."""
    prefix = ""
    children = list(model.named_children())
    while len(children) == 1 and list(children[0][1].children()):
        name, model = children[0]
        prefix += name + "."
        children = list(model.named_children())
    return prefix, model


@torch.no_grad()
def default_stages(model: nn.Module, in_shape: tuple[int, ...], device: torch.device, role: str) -> list[str]:
    """The last top-level container (a module with submodules) at each spatial resolution, in definition order,
    then `auto` (the pooled penultimate feature): layer1..layer3 for CIFAR ResNets, block1..block3 for WRNs,
    layer1..layer4 for torchvision ResNets; `auto` alone for a model without feature maps (an MLP)."""
    prefix, root = _stage_root(model)
    names = [prefix + name for name, m in root.named_children() if list(m.children())]
    if names:
        capture = Capture(model, names, role)
        try:
            shapes = _probe(model, capture, in_shape, device)
        finally:
            capture.remove()
    else:
        shapes = []
    stages: list[str] = []
    last_size = None
    for name, shape in zip(names, shapes):
        if len(shape) != 4:
            continue
        if tuple(shape[-2:]) == last_size:
            stages[-1] = name  # same resolution: the later block is the stage's last one
        else:
            stages.append(name)
        last_size = tuple(shape[-2:])
    return [*stages, AUTO]


def match_stages(student: list[str], teacher: list[str]) -> tuple[list[str], list[str]]:
    """Default stage lists of different lengths: keep the deepest stages both have."""
    n = min(len(student), len(teacher))
    return student[-n:], teacher[-n:]


@dataclass
class ReviewKDConfig(TermConfig):
    """Options of `reviewkd` (mdistiller's CIFAR settings; published recipe CE 1 + 5 ReviewKD)."""

    weight: float = 5.0
    warmup_epochs: int = 20  # the weight ramps linearly over the first 20 epochs
    student_stages: list[str] | None = None  # module paths, shallowest first; null: default_stages
    teacher_stages: list[str] | None = None  # as many as the student's
    mid_channels: int | None = None  # the ABFs' width; null: min(512, the student's last stage channels)


@register("reviewkd", ReviewKDConfig)
class ReviewKD(Term):
    """`reviewkd`: ABF fusion of the student's stages against the teacher's, by HCL (see the module docstring)."""

    def __init__(self, cfg: ReviewKDConfig, setup: Setup):
        super().__init__(cfg, setup)
        student, teacher = self.layer_paths(cfg)
        if not student or not teacher:
            given = student or teacher
            student = student or default_stages(setup.student, setup.in_shape, setup.device, "student")
            teacher = teacher or default_stages(setup.teacher, setup.in_shape, setup.device, "teacher")
            if not given:
                student, teacher = match_stages(student, teacher)
            elif given is student:
                teacher = teacher[-len(student) :]
            else:
                student = student[-len(teacher) :]
        self.student_layers, self.teacher_layers = student, teacher
        self.shapes = list(zip(setup.shapes("student", student), setup.shapes("teacher", teacher)))
        self.loss = ReviewKDLoss([s for s, _ in self.shapes], [t for _, t in self.shapes], cfg.mid_channels)

    @classmethod
    def layer_paths(cls, cfg: ReviewKDConfig) -> tuple[list[str], list[str]]:
        return [str(p) for p in cfg.student_stages or []], [str(p) for p in cfg.teacher_stages or []]

    @classmethod
    def check(cls, cfg: DictConfig, root: DictConfig) -> None:
        super().check(cfg, root)
        if cfg.mid_channels is not None and cfg.mid_channels < 1:
            raise UserError(f"reviewkd.mid_channels={cfg.mid_channels} is out of range: it must be >= 1 (or null)")
        s, t = cls.layer_paths(cfg)
        if s and t and len(s) != len(t):
            raise UserError(
                f"reviewkd.student_stages has {len(s)} paths and reviewkd.teacher_stages {len(t)}: give as many of each"
            )

    def forward(self, batch: Batch) -> Tensor:
        s = [batch.student_features[p] for p in self.student_layers]
        t = [batch.teacher_features[p] for p in self.teacher_layers]
        return self.loss(s, t)

    def describe(self) -> list[str]:
        return [
            f"{p} {tuple(s[1:])} -> {q} {tuple(t[1:])}"
            for p, q, (s, t) in zip(self.student_layers, self.teacher_layers, self.shapes)
        ] + [f"ABF width {self.loss.abfs[0].reduce[0].out_channels}"]
