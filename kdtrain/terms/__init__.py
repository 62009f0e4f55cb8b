"""Loss terms: a run's loss is `sum over the terms in force of weight * term`.

A term is one registered unit, one file in this package (every module here is imported when the
registry is first used, so adding a method takes that one file):

    @dataclass
    class MyConfig(TermConfig):          # the options under `my.` on the command line (my.beta=2)
        weight: float = 1.0              # the published weight of the term
        beta: float = 8.0

    @register("my", MyConfig)
    class MyTerm(Term):
        uses_teacher_logits = True       # batch.teacher_logits is filled (from the teacher or its cache)

        def __init__(self, cfg: MyConfig, setup: Setup):
            super().__init__(cfg, setup)
            self.student_layers = ["auto"]        # features by module path, `auto` = penultimate,
            self.teacher_layers = ["layer3"]      # captured by kdtrain.features' hooks
            (s,) = setup.shapes("student", self.student_layers)   # one dry forward at the input size
            self.head = nn.Linear(s[1], 128)      # parameters: trained, checkpointed, resumed
            self.register_buffer("bank", torch.zeros(setup.num_train, 128))  # buffers: checkpointed

        def forward(self, batch: Batch) -> Tensor:  # the unweighted scalar (float32)
            return my_loss(batch.student_features["auto"], batch.teacher_logits, self.cfg.beta)

What the engine gives each term per step (`Batch`): the student's logits, the labels (-1 for an
unlabelled sample), the sample indices into the training set (0..N-1, stable across epochs; N =
`setup.num_train`, unlabelled samples included), the epoch, the teacher's logits when
`uses_teacher_logits`, and the features at `student_layers` / `teacher_layers` keyed by path.
A term's parameters are optimised with the student (gradients averaged across ranks under
torchrun); its parameters and persistent buffers are saved in every checkpoint and restored on
resume; the student's exported weights never include them. `setup` has the models, the training
set (`setup.train.y`: labels, -1 = unlabelled), the number of classes, the input shape, the device
and the composed config (`setup.root`).

The engine knows no term by name: `LossTerms` builds the terms in force, gives each what it
declared, sums `weight * term` with the weight ramped over `warmup_epochs` and zero before
`start_epoch`, and reports each term as a metrics column named after it.

The weight of a term is read from `<config key>.weight`, except for the three original terms, whose
weights keep their documented keys: ce_weight (ce), kd_weight (kd) and alpha (feat).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kdtrain.errors import UserError

# The terms of the original modes, always reported as metrics columns (0 when off), in this order.
LEGACY_COLUMNS = ("ce", "kd", "feat")
# mode -> terms for the original modes (their mode files set no `loss`).
LEGACY_MODES = {"soft": ["ce", "kd"], "feature": ["ce", "feat"], "combined": ["ce", "kd", "feat"], "none": ["ce"]}


@dataclass
class TermConfig:
    """Options every term has."""

    warmup_epochs: int = 0  # the weight ramps linearly over the first N epochs of the term: min(e / N, 1)
    start_epoch: int = 1  # the term is off before this epoch (FitNets' hint stage starts the others later)


@dataclass
class Setup:
    """What a term may use while it is built."""

    student: nn.Module
    teacher: nn.Module | None
    train: Any  # kdtrain.data.TensorSet: x (N, ...), y (N,) with -1 for unlabelled samples
    num_classes: int
    in_shape: tuple[int, ...]
    device: torch.device
    root: DictConfig | None = None  # the composed config (e.g. `temperature`)

    @property
    def num_train(self) -> int:
        return len(self.train.y)

    def shapes(self, role: str, paths: list[str]) -> list[torch.Size]:
        """Shapes (batch of 2 first) of the features at `paths` of the student or teacher, from one dry forward."""
        from kdtrain.features import probe_shapes

        model = self.student if role == "student" else self.teacher
        return probe_shapes(model, paths, role, self.in_shape, self.device)


@dataclass
class Batch:
    """What the engine hands every term at a step."""

    student_logits: Tensor
    labels: Tensor
    indices: Tensor
    epoch: int
    teacher_logits: Tensor | None = None
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)


class Term(nn.Module):
    """Base class of a loss term; see the module docstring. `forward(batch)` returns an unweighted scalar."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type | None] = None
    config_key: ClassVar[str] = ""  # where its options live in the config (`feature` for feat)
    weight_key: ClassVar[str] = ""  # where its weight lives (`<config_key>.weight` unless registered otherwise)
    uses_teacher_logits: ClassVar[bool] = False

    def __init__(self, cfg: Any, setup: Setup):
        super().__init__()
        self.cfg = cfg
        self.student_layers: list[str] = []
        self.teacher_layers: list[str] = []

    def forward(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def describe(self) -> list[str]:
        """Lines for the run log (e.g. the layers and adapters chosen)."""
        return []

    @classmethod
    def layer_paths(cls, cfg: Any) -> tuple[list[str], list[str]]:
        """(student, teacher) module paths the term reads with these options; checked on both models
        before the teacher trains, so a typo fails at once. Terms that read features override this."""
        return [], []

    @classmethod
    def check(cls, cfg: DictConfig, root: DictConfig) -> None:
        """Range checks on the term's options (UserError naming the key); called for the terms in force."""
        key = cls.config_key
        for option, rule in (("warmup_epochs", lambda v: v >= 0), ("start_epoch", lambda v: v >= 1)):
            if option in cfg and not rule(cfg[option]):
                bound = ">= 0" if option == "warmup_epochs" else ">= 1"
                raise UserError(f"{key}.{option}={cfg[option]} is out of range: it must be an integer {bound}")
        if "start_epoch" in cfg and cfg.start_epoch > root.epochs:
            raise UserError(
                f"{key}.start_epoch={cfg.start_epoch} is out of range: the run has {root.epochs} epochs, so the "
                "term would never train; lower it"
            )


@dataclass
class LayerPairConfig(TermConfig):
    """Options of a term that compares one student layer with one teacher layer."""

    student: str = "auto"  # module path of the student (auto: the classifier's input, the penultimate feature)
    teacher: str = "auto"  # module path of the teacher


class LayerPairTerm(Term):
    """A term on the features of one student layer and one teacher layer (`<name>.student`, `<name>.teacher`)."""

    def __init__(self, cfg: LayerPairConfig, setup: Setup):
        super().__init__(cfg, setup)
        self.student_layers, self.teacher_layers = self.layer_paths(cfg)

    @classmethod
    def layer_paths(cls, cfg: Any) -> tuple[list[str], list[str]]:
        return [str(cfg.student)], [str(cfg.teacher)]

    def pair(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(student feature, teacher feature) of this step."""
        return batch.student_features[self.student_layers[0]], batch.teacher_features[self.teacher_layers[0]]

    def describe(self) -> list[str]:
        return [f"student {self.student_layers[0]} <-> teacher {self.teacher_layers[0]}"]


TERMS: dict[str, type[Term]] = {}


def register(
    name: str, config: type | None = None, key: str | None = None, weight_key: str | None = None
) -> Callable[[type[Term]], type[Term]]:
    """Class decorator: register a term under `name` with its options dataclass `config` (stored in Hydra's
    ConfigStore as `term/<name>` and added to the root schema under `key`, default `name`)."""

    def add(cls: type[Term]) -> type[Term]:
        if name in TERMS:
            raise ValueError(f"a loss term named {name!r} is already registered ({TERMS[name].__qualname__})")
        cls.name, cls.config_class, cls.config_key = name, config, key or name
        cls.weight_key = weight_key or f"{cls.config_key}.weight"
        if config is not None:
            from hydra.core.config_store import ConfigStore

            ConfigStore.instance().store(group="term", name=name, node=config)
        TERMS[name] = cls
        return cls

    return add


def load_all() -> dict[str, type[Term]]:
    """Import every term module of this package (each registers itself) and return the registry."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return TERMS


@dataclass
class TermSpec:
    """One term in force: its class, options, weight and schedule."""

    cls: type[Term]
    cfg: Any  # the term's options (a DictConfig node), or None
    weight: float
    warmup_epochs: int = 0
    start_epoch: int = 1

    @property
    def name(self) -> str:
        return self.cls.name

    def weight_at(self, epoch: int) -> float:
        if epoch < self.start_epoch:
            return 0.0
        if self.warmup_epochs > 0:
            return self.weight * min((epoch - self.start_epoch + 1) / self.warmup_epochs, 1.0)
        return self.weight


def term_names(cfg: DictConfig) -> list[str]:
    """The terms a config puts in force: `loss` when given, else the original mode's terms."""
    if cfg.get("loss") is not None:
        return [str(n) for n in cfg.loss]
    mode = cfg.mode.value if hasattr(cfg.mode, "value") else str(cfg.mode)
    if mode not in LEGACY_MODES:
        raise UserError(f"mode={mode} sets no loss terms; give them with loss=[ce,...]")
    return list(LEGACY_MODES[mode])


def resolve(cfg: DictConfig) -> list[TermSpec]:
    """The terms in force with their weights and schedules (FitNets' hint stage: the other terms start
    after `feature.hint_epochs`)."""
    load_all()
    names = term_names(cfg)
    unknown = [n for n in names if n not in TERMS]
    if unknown:
        raise UserError(f"loss={_show(names)}: {unknown[0]} is not a loss term; choose from {', '.join(sorted(TERMS))}")
    if len(set(names)) != len(names):
        raise UserError(f"loss={_show(names)} names a term twice; give each term once")
    hint = int(cfg.feature.hint_epochs) if "feat" in names else 0
    specs = []
    for name in names:
        cls = TERMS[name]
        node = OmegaConf.select(cfg, cls.config_key) if cls.config_class is not None else None
        weight = float(OmegaConf.select(cfg, cls.weight_key))
        warmup = int(node.get("warmup_epochs", 0)) if node is not None else 0
        start = int(node.get("start_epoch", 1)) if node is not None else 1
        if hint and name != "feat":
            start = max(start, hint + 1)
        specs.append(TermSpec(cls, node, weight, warmup, start))
    return specs


def _show(names: list[str]) -> str:
    return "[" + ",".join(names) + "]"


def ce_only(weight: float = 1.0) -> list[TermSpec]:
    """The student (or teacher) alone on the labels."""
    load_all()
    return [TermSpec(TERMS["ce"], None, weight)]


class LossTerms(nn.Module):
    """The terms in force, built: `forward(batch, epoch)` -> ({name: unweighted value}, weighted total).

    Parameters and buffers of every term live here (`terms.<name>.`), so one state dict checkpoints them.
    """

    def __init__(self, specs: list[TermSpec], setup: Setup | None = None):
        super().__init__()
        self.specs = specs
        built = {}
        for spec in specs:
            if setup is None and (spec.cls.config_class is not None or spec.cls.uses_teacher_logits):
                raise ValueError(f"the {spec.name} term needs a Setup to be built")
            built[spec.name] = spec.cls(spec.cfg, setup)
        self.terms = nn.ModuleDict(built)
        # Computed at every step: the terms with a weight, and those that read only the student's logits
        # and the labels (ce's column shows CE even at ce_weight=0, as before the registry).
        self.reported = [
            s.name
            for s, t in zip(specs, built.values())
            if s.weight > 0 or not (t.uses_teacher_logits or t.student_layers or t.teacher_layers)
        ]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def columns(self) -> list[str]:
        """Metrics columns: ce, kd, feat (always, as before), then the other terms in force."""
        return list(LEGACY_COLUMNS) + [n for n in self.names if n not in LEGACY_COLUMNS]

    def weights_at(self, epoch: int) -> dict[str, float]:
        return {s.name: s.weight_at(epoch) for s in self.specs}

    @property
    def needs_teacher(self) -> bool:
        return any(
            s.weight > 0 and (t.uses_teacher_logits or t.teacher_layers)
            for s, t in zip(self.specs, self.terms.values())
        )

    def some_off(self, epoch: int) -> bool:
        """Some term in force is still off at `epoch` (then some parameters may get no gradient)."""
        return any(s.weight > 0 and s.weight_at(epoch) == 0 for s in self.specs)

    def layers(self, role: str) -> list[str]:
        """Every module path the terms in force read on the student or teacher side, each once, in order."""
        out: list[str] = []
        for s, t in zip(self.specs, self.terms.values()):
            if s.weight > 0:
                out += [p for p in (t.student_layers if role == "student" else t.teacher_layers) if p not in out]
        return out

    def forward(self, batch: Batch) -> tuple[dict[str, Tensor], Tensor]:
        """Every reported term's value, and the loss: the terms on at `batch.epoch`,
        weighted. A term off at this epoch (before its start) is left out of the graph, so parameters only
        it reaches get no gradient and SGD leaves them alone, weight decay included."""
        weights = self.weights_at(batch.epoch)
        values = {name: self.terms[name](batch) for name in self.reported}
        weighted = [weights[name] * value for name, value in values.items() if weights[name] != 0]
        if not weighted:
            raise ValueError(f"no loss term is on at epoch {batch.epoch}")
        return values, torch.stack(weighted).sum() if len(weighted) > 1 else weighted[0]

    def describe(self) -> list[str]:
        return [f"{name}: {line}" for name, term in self.terms.items() for line in term.describe()]
