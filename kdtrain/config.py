"""Typed config schema (registered in Hydra's ConfigStore) and the range checks Hydra cannot express.

Hydra checks types while it merges overrides (`temperature=abc` fails there); `validate` checks
ranges and cross-key rules on the composed config before any work starts.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from dataclasses import dataclass, field, fields, make_dataclass
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from kdtrain.errors import UserError
from kdtrain.terms import LEGACY_COLUMNS, TermConfig


class Mode(Enum):
    """A preset of loss terms and weights (conf/mode/NAME.yaml); `loss=[...]` chooses terms freely."""

    soft = "soft"
    feature = "feature"
    combined = "combined"
    none = "none"
    dkd = "dkd"
    dist = "dist"
    kd_std = "kd_std"
    rkd = "rkd"
    pkt = "pkt"
    sp = "sp"
    crd = "crd"
    reviewkd = "reviewkd"


class Amp(Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    off = "off"


class NanPolicy(Enum):
    stop = "stop"  # keep the last good checkpoint and stop, naming the step and the loss term
    skip = "skip"  # drop the step (no update) and count it in the metrics' skipped_steps


class CachePolicy(Enum):
    auto = "auto"  # in memory when the training inputs are deterministic (no random augmentation)
    off = "off"  # the teacher runs every step
    memory = "memory"  # computed once per run, kept on the training device
    disk = "disk"  # as memory, and kept in teacher_cache_dir for later runs


class CacheDtype(Enum):
    float32 = "float32"
    float16 = "float16"


# logger=NAME or logger=[NAME,...]: where the metrics go besides the run dir's files.
LOGGERS = ("none", "tensorboard", "wandb", "mlflow")


# dataset.loader: auto (memory when the split fits dataset.memory_budget_gb, else stream; logged) | memory
# (decoded once into a uint8 tensor on the training device) | stream (decoded batch by batch by workers).
LOADERS = ("auto", "memory", "stream")
BAD_IMAGES = ("fail", "skip")  # dataset.bad_images


class Progress(Enum):
    auto = "auto"
    bar = "bar"
    log = "log"
    off = "off"


@dataclass
class DatasetConfig:
    name: str = "digits"
    root: str | None = None  # where a dataset keeps its files (digits needs none)
    download: bool = False
    augment: bool = False
    val_size: int = 500  # digits: held-out samples, stratified
    split_seed: int = 0  # fixes the train/val split and the labelled subset
    labelled_per_class: int | None = None  # keep labels for N training samples per class
    exclude_classes: list[int] = field(default_factory=list)  # hidden from the student's data
    image_size: int | None = None
    # Image datasets read from files (imagefolder, ...): see kdtrain/data/batches.py. Plain strings (checked
    # by `validate`), so the dataset node stays JSON-able for the identities of teachers and baselines.
    loader: str = "auto"  # auto | memory | stream
    # auto: the memory path when train + val fit in this many GB as uint8 pixels (on the training device).
    memory_budget_gb: float = 4.0
    workers: int | None = None  # decoding processes; null: the machine's cores (shared by the ranks of a machine)
    bad_images: str = "fail"  # fail: stop naming the file | skip: log it once, count it, replace it
    # dataset=hf (kdtrain/data/hf.py): datasets.load_dataset's `path` (`name` already picks the builder),
    # its data_files, the two splits and the columns.
    path: str | None = None
    data_files: Any = None  # a path or glob, a list of them, or {split: files}
    train_split: str = "train"
    val_split: str = "validation"
    image_column: str = "image"
    label_column: str = "label"


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | multistep | constant
    milestones: list[int] = field(default_factory=list)  # epochs, for multistep
    gamma: float = 0.1
    warmup_epochs: float = 0.0


@dataclass
class TeacherTrainConfig:
    """Recipe for training the teacher when no teacher.checkpoint is given."""

    epochs: int = MISSING  # 0: the teacher as loaded (evaluated and stored, never trained)
    lr: float = MISSING
    batch_size: int = MISSING
    seed: int = MISSING  # separate from the run's seed, so a sweep over seeds shares one teacher
    # A pretrained teacher whose classifier already fits the dataset's classes is used as loaded (epochs 0).
    use_fitting_pretrained: bool = MISSING
    freeze_backbone_epochs: int = MISSING  # train the classifier alone for the first N epochs, then every layer
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass
class FeatureConfig(TermConfig):
    """Which layers the feature term (`feat`) compares, and how."""

    student: str | None = MISSING  # short form for one pair: a module path of the student ...
    teacher: str | None = MISSING  # ... and of the teacher; `auto` = the classifier's input
    pairs: list[Any] = MISSING  # [{student: PATH, teacher: PATH, weight: W}, ...]
    loss: str = MISSING  # mse | smooth_l1 | cosine | at (attention transfer)
    align: str = MISSING  # spatial mismatch: pool the larger map | interpolate the smaller
    hint_epochs: int = MISSING  # FitNets stage 1: epochs of the hint loss alone, before the mode's loss


@dataclass
class WandbConfig:
    """logger=wandb: where the run goes in Weights & Biases."""

    project: str = MISSING
    entity: str | None = MISSING  # null: your default entity
    name: str | None = MISSING  # null: the run dir's name
    mode: str | None = MISSING  # online | offline | disabled; null: WANDB_MODE, else online (offline=true: offline)


@dataclass
class MlflowConfig:
    """logger=mlflow: where the run goes in MLflow."""

    tracking_uri: str | None = MISSING  # null: MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db
    experiment: str = MISSING
    run_name: str | None = MISSING  # null: the run dir's name


@dataclass
class KDConfig:
    """The root schema: types and checks only. Each value has one home, conf/config.yaml (mode, ce_weight and
    kd_weight: the mode group), so the fields it sets are MISSING here; group nodes (dataset, optimizer,
    scheduler) take their values from their option files, falling back on the dataclass defaults.
    tests/test_config.py::test_every_default_has_one_home fails if a key gets a value in both places."""

    teacher: Any = None  # model group entries are free-form: constructor kwargs differ per model
    student: Any = None
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    teacher_train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)

    mode: Mode = MISSING
    loss: list[str] | None = None  # the terms in force, e.g. [ce,dkd,feat]; null: the mode's (soft: [ce,kd])
    temperature: float = MISSING
    alpha: float = MISSING
    ce_weight: float = MISSING
    kd_weight: float = MISSING

    epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    seed: int = MISSING
    device: str = MISSING
    amp: Amp = MISSING
    baseline: bool = MISSING  # also report the student alone (labelled samples only; kdtrain/baseline.py) and the gain
    teacher_store: str = MISSING
    progress: Progress = MISSING
    resume: str | None = MISSING  # a checkpoint file, a run dir (its checkpoints/last.pt), or auto
    nan_policy: NanPolicy = MISSING  # what a non-finite loss does: stop | skip
    feature: FeatureConfig = field(default_factory=FeatureConfig)
    sync_bn: bool = MISSING  # under torchrun: BatchNorm statistics over all ranks (SyncBatchNorm)

    # Speed (see teacher_cache.py): the teacher's outputs computed once instead of at every step.
    teacher_cache: CachePolicy = MISSING
    teacher_cache_dtype: CacheDtype = MISSING
    teacher_cache_topk: int | None = MISSING  # keep the k largest logits per sample (many classes)
    teacher_cache_views: int = MISSING  # under augmentation: cache K fixed augmented views per sample
    teacher_cache_dir: str | None = MISSING  # teacher_cache=disk: null = <teacher_store>/cache
    compile: bool = MISSING  # torch.compile the student's training forward pass
    logger: Any = MISSING  # none | tensorboard | wandb | mlflow, or a list: [tensorboard,mlflow]
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    offline: bool = MISSING  # no network access: pretrained weights from the caches only, trackers offline


@functools.cache
def schema() -> type:
    """The root schema: KDConfig plus one node per registered loss term's options (`dkd`, `dist`, ...)."""
    from kdtrain.terms import load_all

    own = {f.name for f in fields(KDConfig)}
    extra = [
        (cls.config_key, cls.config_class, field(default_factory=cls.config_class))
        for cls in load_all().values()
        if cls.config_class is not None and cls.config_key not in own
    ]
    return make_dataclass("KDConfig", extra, bases=(KDConfig,))


def register_schema() -> None:
    ConfigStore.instance().store(name="kdtrain_schema", node=schema())


def schema_default(key: str) -> Any:
    """The schema's default of a dotted key (terms' options included), or None."""
    node = OmegaConf.to_container(OmegaConf.structured(schema()), enum_to_str=True)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# Seeds go to torch.manual_seed, which takes -2**63 .. 2**64-1; the split seed also to scikit-learn's
# random_state, which takes 0 .. 2**32-1.
SEED_RANGE = (-(2**63), 2**64 - 1)
SPLIT_SEED_RANGE = (0, 2**32 - 1)
# Below this temperature knowledge distillation does nothing useful: the KD term's gradient shrinks in
# proportion to T (at T = 0.01 it is 0.6 % of its size at T = 4), is exactly 0 in float32 at T <= 1e-21
# and the loss itself at T <= 1e-23 (scripts/kd_small_temperature.py measures both).
MIN_TEMPERATURE = 0.01

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "multistep", "constant")


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise UserError(f"{key}={value} is out of range: {rule}")


def validate(cfg: DictConfig) -> None:
    """Range and cross-key checks on a composed config; raises UserError naming the key."""
    _check_finite(cfg, "")
    _check(cfg.temperature > 0, "temperature", cfg.temperature, "it must be > 0 (e.g. temperature=4)")
    if effective_weights(cfg)["kd"] > 0:
        _check(
            cfg.temperature >= MIN_TEMPERATURE,
            "temperature",
            cfg.temperature,
            f"below {MIN_TEMPERATURE} the KD term's gradient vanishes (it shrinks in proportion to T, and is "
            "exactly 0 in float32 from 1e-21); use temperature >= 1 (e.g. temperature=4)",
        )
    for key, value in (("seed", cfg.seed), ("teacher_train.seed", cfg.teacher_train.seed)):
        _check(SEED_RANGE[0] <= value <= SEED_RANGE[1], key, value, "it must fit in 64 bits (e.g. seed=0)")
    _check(
        SPLIT_SEED_RANGE[0] <= cfg.dataset.split_seed <= SPLIT_SEED_RANGE[1],
        "dataset.split_seed",
        cfg.dataset.split_seed,
        f"it must be in 0..{SPLIT_SEED_RANGE[1]} (2**32-1)",
    )
    excluded = list(cfg.dataset.exclude_classes)
    twice = next((c for i, c in enumerate(excluded) if c in excluded[:i]), None)
    if twice is not None:
        raise UserError(
            f"dataset.exclude_classes={excluded} lists class {twice} more than once; list each hidden class once"
        )
    _validate_feature(cfg)
    loggers(cfg)
    for key in ("alpha", "ce_weight", "kd_weight"):
        _check(cfg[key] >= 0, key, cfg[key], "it must be >= 0")
    _check(cfg.epochs >= 1, "epochs", cfg.epochs, "it must be an integer >= 1")
    _check(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "it must be an integer >= 1")
    _check(cfg.lr > 0, "lr", cfg.lr, "it must be > 0 (e.g. lr=0.05)")
    t = cfg.teacher_train
    _check(t.epochs >= 0, "teacher_train.epochs", t.epochs, "it must be an integer >= 0 (0: the teacher as loaded)")
    _check(
        0 <= t.freeze_backbone_epochs <= t.epochs,
        "teacher_train.freeze_backbone_epochs",
        t.freeze_backbone_epochs,
        f"it must be >= 0 and at most teacher_train.epochs ({t.epochs})",
    )
    _check(t.lr > 0, "teacher_train.lr", t.lr, "it must be > 0")
    _check(t.batch_size >= 1, "teacher_train.batch_size", t.batch_size, "it must be an integer >= 1")
    if not DEVICE_RE.match(cfg.device):
        raise UserError(f"device={cfg.device} is not accepted: use auto, cpu, cuda, cuda:N or mps")
    for prefix, node in (("", cfg), ("teacher_train.", cfg.teacher_train)):
        _validate_recipe(prefix, node.optimizer, node.scheduler)
    d = cfg.dataset
    if d.labelled_per_class is not None:
        _check(
            d.labelled_per_class >= 1,
            "dataset.labelled_per_class",
            d.labelled_per_class,
            "it must be >= 1, or null to keep every label",
        )
    _check(d.val_size >= 1, "dataset.val_size", d.val_size, "it must be >= 1")
    for key, allowed in (("loader", LOADERS), ("bad_images", BAD_IMAGES)):
        if d[key] not in allowed:
            raise UserError(f"dataset.{key}={d[key]} is not accepted: use one of {', '.join(allowed)}")
    _check(d.memory_budget_gb >= 0, "dataset.memory_budget_gb", d.memory_budget_gb, "it must be >= 0")
    if d.workers is not None:
        _check(d.workers >= 0, "dataset.workers", d.workers, "it must be >= 0 (0: decode in the main process)")
    _validate_cache(cfg)
    from kdtrain.models import resolve_builder

    for key in ("teacher", "student"):
        if not isinstance(cfg[key], DictConfig) or "name" not in cfg[key]:
            raise UserError(f"{key} has no model name; choose one with {key}=NAME (see conf/{key}/)")
        resolve_builder(OmegaConf.to_container(cfg[key], resolve=True), key)
    _validate_terms(cfg)


def _validate_terms(cfg: DictConfig) -> None:
    from kdtrain.terms import resolve

    specs = resolve(cfg)
    for spec in specs:
        _check(spec.weight >= 0, spec.cls.weight_key, spec.weight, "it must be >= 0")
        if spec.cfg is not None:
            spec.cls.check(spec.cfg, cfg)
    if not any(s.weight for s in specs):
        raise UserError(
            f"every loss weight in force is 0 for mode={cfg.mode.value}; set ce_weight, kd_weight or alpha > 0"
            if cfg.loss is None
            else f"every loss weight in force is 0 for loss=[{','.join(s.name for s in specs)}]; set a weight > 0"
        )
    if not any(s.weight and s.start_epoch == 1 for s in specs):
        raise UserError("no loss term is on at epoch 1; lower a term's start_epoch to 1")


def loggers(cfg: DictConfig) -> list[str]:
    """The trackers `logger` names (a name or a list of names; none: no tracker), each one installed."""
    value = cfg.logger
    names = [str(v) for v in value] if isinstance(value, (list, ListConfig)) else [str(value)]
    for name in names:
        if name not in LOGGERS:
            raise UserError(
                f"logger={name} is not accepted: use one of {', '.join(LOGGERS)}, or a list like "
                "logger=[tensorboard,mlflow]"
            )
    names = [n for n in dict.fromkeys(names) if n != "none"]
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise UserError(
                f"logger={name} needs the {name} package, which is not installed: pip install 'kdtrain[{name}]'"
            )
    return names


def _check_finite(node: Any, prefix: str) -> None:
    """Every float in the config (model options included) is finite: inf and NaN get one line naming the key."""
    for key in node if isinstance(node, DictConfig) else range(len(node)):
        if OmegaConf.is_missing(node, key):  # `???`: reported by the check that needs it
            continue
        value = node[key]
        name = f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}{'.' if prefix else ''}{key}"
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{name}={value} is not accepted: it must be a finite number")
        if isinstance(value, (DictConfig, ListConfig)):
            _check_finite(value, name)


def _validate_feature(cfg: DictConfig) -> None:
    from kdtrain.features import ALIGNS, LOSSES, parse_pairs

    f = cfg.feature
    if f.loss not in LOSSES:
        raise UserError(f"feature.loss={f.loss} is not accepted: use one of {', '.join(LOSSES)}")
    if f.align not in ALIGNS:
        raise UserError(f"feature.align={f.align} is not accepted: use one of {', '.join(ALIGNS)}")
    _check(
        0 <= f.hint_epochs < cfg.epochs,
        "feature.hint_epochs",
        f.hint_epochs,
        f"it must be >= 0 and less than epochs ({cfg.epochs}), so the mode's loss trains at least one epoch",
    )
    if f.hint_epochs and not effective_weights(cfg)["feat"]:
        raise UserError(
            "feature.hint_epochs needs the feature term: use mode=feature or mode=combined with alpha > 0 "
            "(or put feat in loss=[...])"
        )
    parse_pairs(f)


def _validate_cache(cfg: DictConfig) -> None:
    if cfg.teacher_cache_topk is not None:
        _check(
            cfg.teacher_cache_topk >= 1,
            "teacher_cache_topk",
            cfg.teacher_cache_topk,
            "it must be >= 1 (and below the number of classes), or null to keep every logit",
        )
    _check(
        cfg.teacher_cache_views >= 0,
        "teacher_cache_views",
        cfg.teacher_cache_views,
        "it must be >= 0 (0: no augmented views; K: K fixed views per sample)",
    )
    if cfg.teacher_cache_views and cfg.teacher_cache.value == "off":
        raise UserError(
            f"teacher_cache_views={cfg.teacher_cache_views} needs the teacher cache, but teacher_cache=off; "
            "set teacher_cache=auto (or memory, disk), or teacher_cache_views=0"
        )


def _validate_recipe(prefix: str, opt: DictConfig, sched: DictConfig) -> None:
    if opt.name not in OPTIMIZERS:
        raise UserError(f"{prefix}optimizer.name={opt.name} is not accepted: use one of {', '.join(OPTIMIZERS)}")
    if sched.name not in SCHEDULERS:
        raise UserError(f"{prefix}scheduler.name={sched.name} is not accepted: use one of {', '.join(SCHEDULERS)}")
    _check(opt.weight_decay >= 0, f"{prefix}optimizer.weight_decay", opt.weight_decay, "it must be >= 0")
    _check(0 <= opt.momentum < 1, f"{prefix}optimizer.momentum", opt.momentum, "it must be in [0, 1)")
    _check(0 < sched.gamma <= 1, f"{prefix}scheduler.gamma", sched.gamma, "it must be in (0, 1]")
    _check(sched.warmup_epochs >= 0, f"{prefix}scheduler.warmup_epochs", sched.warmup_epochs, "it must be >= 0")


def effective_weights(cfg: DictConfig) -> dict[str, float]:
    """Loss weights in force: ce, kd, feat (0 when off, as the metrics columns), then the other terms in force."""
    from kdtrain.terms import resolve

    weights = dict.fromkeys(LEGACY_COLUMNS, 0.0)
    weights.update({spec.name: spec.weight for spec in resolve(cfg)})
    return weights
