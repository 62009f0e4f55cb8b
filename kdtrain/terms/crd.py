"""CRD, contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020).

The student's and the teacher's penultimate features are projected by linear embedding heads to
`feat_dim` (128) and L2-normalised. Two memory banks of N x feat_dim (N = the transfer set's size,
unlabelled samples included) hold a running embedding of every sample: `bank_s` the student's,
`bank_t` the teacher's. For each sample of a batch the positive is its own bank row and K negatives
are bank rows drawn with replacement:

- a labelled sample draws from the labelled samples of the *other* classes (RepDistiller's "exact"
  mode); should there be none, from any other sample;
- an unlabelled sample (label -1) draws from every sample other than itself (instance
  discrimination: its class is unknown, so no index can be ruled out but its own).

Scores are exp(<v, bank row> / T); each side's scores are divided by a constant Z fixed from the
first training batch (mean score x N), and the loss is the NCE loss with noise 1/N of the
student-anchored scores (student embedding vs the teacher bank) plus the teacher-anchored ones
(teacher embedding vs the student bank). After the loss, each batch sample's bank rows move to
`momentum * row + (1 - momentum) * embedding`, renormalised to unit length.

The banks, Z and the step counter are persistent buffers: they are checkpointed and resumed with the
term. Negatives come from a generator seeded by (seed, step, rank), so a resumed run draws the same
negatives as an uninterrupted one. Under torchrun every rank gathers all ranks' indices and
embeddings before the bank update, so the banks stay identical on every rank.

Memory: the two banks take 2 x N x feat_dim x 4 bytes; each step gathers 2 x B x (K + 1) x feat_dim
float32 bank rows (kept for the backward pass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from kdtrain import distributed
from kdtrain.errors import UserError
from kdtrain.features import AUTO
from kdtrain.terms import Batch, Setup, Term, TermConfig, register

EPS = 1e-7  # RepDistiller's epsilon in the NCE ratios


class Embed(nn.Module):
    """Linear(d -> feat_dim) then L2 normalisation; maps and vectors are flattened first."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def nce_loss(scores: Tensor, num_samples: int) -> Tensor:
    """NCE loss of normalised scores (B x (K+1), the positive in column 0) with noise distribution 1/N.

    -(sum_b log P_pos / (P_pos + K/N) + sum_b,k log (K/N) / (P_neg + K/N)) / B, as in CRD.
    """
    k = scores.shape[1] - 1
    noise = k / float(num_samples)
    pos, neg = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(pos / (pos + noise + EPS))
    log_d0 = torch.log(noise / (neg + noise + EPS))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


class NegativeSampler:
    """Draws, for each anchor, K bank indices that are never the anchor's own and, for a labelled anchor,
    only labelled samples of the other classes (see the module docstring)."""

    def __init__(self, labels: Tensor):
        labels = labels.long().cpu()
        self.n = len(labels)
        labelled = torch.nonzero(labels >= 0).flatten()
        classes = int(labels.max()) + 1 if len(labelled) else 0
        # Labelled indices grouped by class; class c's group is sorted[start[c] : start[c] + count[c]].
        self.sorted = labelled[torch.argsort(labels[labelled], stable=True)]
        self.count = torch.bincount(labels[labelled], minlength=classes)
        self.start = torch.cumsum(self.count, 0) - self.count
        self.labels = labels

    def to(self, device: torch.device) -> NegativeSampler:
        for name in ("sorted", "count", "start", "labels"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def draw(self, idx: Tensor, k: int, generator: torch.Generator) -> Tensor:
        """(B, k) negative indices for the anchors `idx` (with replacement)."""
        # float64 keeps floor(u * m) uniform for large m (MPS has no float64).
        dtype = torch.float32 if idx.device.type == "mps" else torch.float64
        u = torch.rand((len(idx), k), generator=generator, device=idx.device, dtype=dtype)
        # Any index but the anchor's own: a position among the other N - 1, shifted past the anchor.
        pos = (u * (self.n - 1)).long().clamp(max=self.n - 2)
        negatives = pos + (pos >= idx.unsqueeze(1)).long()
        if len(self.sorted) == 0:
            return negatives
        c = self.labels[idx]
        labelled = c >= 0
        c = c.clamp(min=0)
        others = len(self.sorted) - self.count[c]
        # A labelled anchor: a position among the other classes' labelled samples, skipping class c's group.
        m = others.clamp(min=1).unsqueeze(1)
        pos = (u * m).long().clamp(max=m - 1)
        pos = torch.where(pos < self.start[c].unsqueeze(1), pos, pos + self.count[c].unsqueeze(1))
        class_negatives = self.sorted[pos.clamp(max=len(self.sorted) - 1)]
        return torch.where((labelled & (others > 0)).unsqueeze(1), class_negatives, negatives)


def _gather_rows(t: Tensor) -> Tensor:
    """All ranks' rows of `t`, in rank order (each rank may hold a different number); `t` alone outside torchrun."""
    if not (distributed.enabled() and torch.distributed.is_initialized()):
        return t
    world = distributed.world_size()
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


class CRDLoss(nn.Module):
    """The CRD term: `forward(student_feature, teacher_feature, idx)` -> the unweighted CRD loss.

    Trainable: the two embedding heads (the teacher's head is trained too, the teacher is not).
    Training state (persistent buffers): `bank_s`, `bank_t`, `z` (0 until the first batch fixes it) and
    `steps` (which seeds each step's negatives). In eval mode nothing is updated.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        labels: Tensor,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        seed: int = 0,
    ):
        super().__init__()
        n = len(labels)
        if n < 2:
            raise ValueError("CRD needs a transfer set of at least 2 samples")
        self.embed_s = Embed(student_dim, feat_dim)
        self.embed_t = Embed(teacher_dim, feat_dim)
        self.num_samples, self.k = n, min(int(nce_k), n - 1)
        self.nce_t, self.momentum, self.seed = float(nce_t), float(momentum), int(seed)
        # RepDistiller's initialisation: uniform in +-1/sqrt(feat_dim/3) (rows of about unit length).
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        g = torch.Generator().manual_seed(self.seed)
        self.register_buffer("bank_s", torch.rand(n, feat_dim, generator=g).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("bank_t", torch.rand(n, feat_dim, generator=g).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("z", torch.zeros(2))  # (Z_student_anchored, Z_teacher_anchored), fixed by batch 1
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training steps taken: seeds the draws
        # Host-side copies of `steps` and "Z is fixed", so a step needs no device sync; refreshed on load.
        self.draws, self.z_fixed = 0, False
        self.sampler = NegativeSampler(labels)
        self.register_load_state_dict_post_hook(CRDLoss._loaded)

    @staticmethod
    def _loaded(module: CRDLoss, incompatible: object) -> None:
        module.draws, module.z_fixed = int(module.steps), bool((module.z > 0).all())

    def _generator(self, device: torch.device) -> torch.Generator:
        # A fresh generator per step, seeded from (seed, step, rank): the state to resume is one counter.
        seed = (self.seed * 1_000_003 + self.draws * 8_191 + distributed.rank()) % (2**63)
        return torch.Generator(device=device).manual_seed(seed)

    def forward(self, student_feature: Tensor, teacher_feature: Tensor, idx: Tensor) -> Tensor:
        with torch.autocast(student_feature.device.type, enabled=False):  # float32 heads and scores
            v_s = self.embed_s(student_feature.float())
            v_t = self.embed_t(teacher_feature.detach().float())
            return self._loss(v_s, v_t, idx)

    def _loss(self, v_s: Tensor, v_t: Tensor, idx: Tensor) -> Tensor:
        device = v_s.device
        if self.sampler.labels.device != device:
            self.sampler.to(device)
        idx = idx.to(device).long()
        negatives = self.sampler.draw(idx, self.k, self._generator(device))
        rows = torch.cat([idx.unsqueeze(1), negatives], dim=1)  # (B, K+1), the positive first
        scores_s = torch.exp(torch.einsum("bkd,bd->bk", self.bank_t[rows], v_s) / self.nce_t)
        scores_t = torch.exp(torch.einsum("bkd,bd->bk", self.bank_s[rows], v_t) / self.nce_t)
        z = self.z
        if not self.z_fixed:
            z = torch.stack([scores_s.detach().mean(), scores_t.detach().mean()]) * self.num_samples
            if distributed.enabled() and torch.distributed.is_initialized():
                z = distributed.all_reduce_sum(z) / distributed.world_size()  # the same Z on every rank
            if self.training:
                self.z.copy_(z)
                self.z_fixed = True
        if self.training:
            self.draws += 1
            self.steps += 1
        loss = nce_loss(scores_s / z[0], self.num_samples) + nce_loss(scores_t / z[1], self.num_samples)
        if self.training:
            self._update(idx, v_s.detach(), v_t.detach())
        return loss

    @torch.no_grad()
    def _update(self, idx: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """Momentum update of the batch's bank rows, with every rank's samples under torchrun."""
        idx, v_s, v_t = _gather_rows(idx), _gather_rows(v_s), _gather_rows(v_t)
        for bank, v in ((self.bank_s, v_s), (self.bank_t, v_t)):
            old = bank[idx]
            rows = F.normalize(old * self.momentum + v * (1 - self.momentum), dim=1)
            # A non-finite embedding (a step nan_policy=skip drops) must not poison the bank for good.
            bank.index_copy_(0, idx, torch.where(rows.isfinite().all(1, keepdim=True), rows, old))

    def memory_bytes(self) -> int:
        """Bytes of the banks (the N-dependent part of the term's state)."""
        return self.bank_s.numel() * self.bank_s.element_size() + self.bank_t.numel() * self.bank_t.element_size()


@dataclass
class CRDConfig(TermConfig):
    """Options of `crd` (RepDistiller's defaults; published recipe CE 1 + 0.8 CRD)."""

    weight: float = 0.8
    student: str = AUTO  # the student feature the embedding head reads (module path; auto = penultimate)
    teacher: str = AUTO  # the teacher feature
    feat_dim: int = 128  # embedding size
    nce_k: int = 16384  # negatives per sample (capped at N - 1)
    nce_t: float = 0.07  # temperature of the scores
    momentum: float = 0.5  # memory bank update: row <- normalize(momentum * row + (1 - momentum) * embedding)


@register("crd", CRDConfig)
class CRD(Term):
    """`crd`: the CRD loss of the features at `crd.student` / `crd.teacher` (see the module docstring)."""

    def __init__(self, cfg: CRDConfig, setup: Setup):
        super().__init__(cfg, setup)
        self.student_layers, self.teacher_layers = self.layer_paths(cfg)
        (s,) = setup.shapes("student", self.student_layers)
        (t,) = setup.shapes("teacher", self.teacher_layers)
        self.dims = (_flat_dim(s), _flat_dim(t))
        seed = int(setup.root.seed) if setup.root is not None else 0
        self.loss = CRDLoss(
            *self.dims,
            setup.train.y,
            feat_dim=int(cfg.feat_dim),
            nce_k=int(cfg.nce_k),
            nce_t=float(cfg.nce_t),
            momentum=float(cfg.momentum),
            seed=seed,
        )

    @classmethod
    def layer_paths(cls, cfg: CRDConfig) -> tuple[list[str], list[str]]:
        return [str(cfg.student)], [str(cfg.teacher)]

    @classmethod
    def check(cls, cfg: DictConfig, root: DictConfig) -> None:
        super().check(cfg, root)
        for option, ok, rule in (
            ("feat_dim", cfg.feat_dim >= 1, "an integer >= 1"),
            ("nce_k", cfg.nce_k >= 1, "an integer >= 1"),
            ("nce_t", cfg.nce_t > 0, "> 0"),
            ("momentum", 0 <= cfg.momentum < 1, "in [0, 1)"),
        ):
            if not ok:
                raise UserError(f"crd.{option}={cfg[option]} is out of range: it must be {rule}")

    def forward(self, batch: Batch) -> Tensor:
        s = batch.student_features[self.student_layers[0]]
        t = batch.teacher_features[self.teacher_layers[0]]
        return self.loss(s, t, batch.indices)

    def describe(self) -> list[str]:
        line = (
            f"{self.student_layers[0]} ({self.dims[0]}) and {self.teacher_layers[0]} ({self.dims[1]}) -> "
            f"{self.loss.embed_s.linear.out_features}-d embeddings, {self.loss.k} negatives per sample, "
            f"memory banks 2 x {self.loss.num_samples} rows ({self.loss.memory_bytes() / 2**20:.1f} MiB)"
        )
        return [line]


def _flat_dim(shape: torch.Size) -> int:
    return int(torch.Size(shape[1:]).numel())
