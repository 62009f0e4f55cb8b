"""One kdtrain run: data, teacher, student, distillation, outputs."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from kdtrain import baseline as baseline_store
from kdtrain import distributed
from kdtrain.checkpoint import find_resume, load_training_checkpoint, refuse_another_run, save_weights
from kdtrain.collapse import CollapseWatch, collapse_epoch, warn
from kdtrain.config import Amp
from kdtrain.data import Splits, StreamSet, build_dataset
from kdtrain.data.batches import EVAL_CROP
from kdtrain.engine import FitSpec, Resume, autocast_dtype, fit, predict, wants_channels_last
from kdtrain.errors import UserError
from kdtrain.features import Capture
from kdtrain.models import build_model, count_params
from kdtrain.models.hub import set_offline
from kdtrain.report import MetricsWriter, print_table
from kdtrain.rundir import class_names
from kdtrain.teacher import get_teacher, precision
from kdtrain.teacher_cache import TeacherCache, obtain
from kdtrain.terms import LEGACY_COLUMNS, LossTerms, Setup, TermSpec, resolve
from kdtrain.trackers import Trackers, current, tracking

log = logging.getLogger("kdtrain")

# sync_bn=true below this per-rank batch gets a warning: torch's SyncBatchNorm adds a host sync (a boolean mask)
# and two small collectives (all-gather forward, all-reduce backward) per BatchNorm layer at every step, which
# for small nets likely costs more than the statistics gain.
SYNC_BN_MIN_BATCH = 32


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={name} but CUDA is not available on this machine; use device=cpu or device=auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"device={name} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("device=mps but MPS is not available on this machine; use device=cpu or device=auto")
    return torch.device(name)


def resolve_amp(amp: Amp, device: torch.device) -> torch.dtype | None:
    if amp is Amp.fp16 and device.type != "cuda":
        raise UserError(f"amp=fp16 needs a CUDA device (device is {device.type}); use amp=off, or amp=bf16 on CPU")
    return autocast_dtype(amp.value, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _student(cfg: DictConfig, splits: Splits, device: torch.device) -> torch.nn.Module:
    model = build_model(
        OmegaConf.to_container(cfg.student, resolve=True), splits.num_classes, splits.in_shape, "student"
    )
    return model.to(device)


def _spec(cfg: DictConfig, label: str, checkpoint_dir: Path | None, extra: dict[str, Any]) -> FitSpec:
    return FitSpec(
        epochs=int(cfg.epochs),
        batch_size=int(cfg.batch_size),
        lr=float(cfg.lr),
        seed=int(cfg.seed),
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        label=label,
        progress=cfg.progress.value,
        checkpoint_dir=checkpoint_dir,
        checkpoint_extra=extra,
        nan_policy=cfg.nan_policy.value,
        compile=bool(cfg.compile),
    )


def _extra_columns(cfg: DictConfig, terms: list[str]) -> list[str]:
    """Metrics columns after the fixed ones: a column per loss term beyond ce, kd, feat, then the rest."""
    own = [t for t in terms if t not in LEGACY_COLUMNS]
    return (
        own
        + (["val_acc_excluded"] if cfg.dataset.exclude_classes else [])
        + (["bad_images"] if cfg.dataset.bad_images == "skip" else [])
    )


def _epoch_sink(
    cfg: DictConfig, folder: Path, label: str, terms: list[str], history: list[dict[str, Any]] | None = None
):
    """The per-epoch callback (rank 0): metrics files, the run's trackers (logger=...), and the mean
    validation accuracy on the classes hidden from the student."""
    excluded = list(cfg.dataset.exclude_classes)
    writes = [MetricsWriter(folder, _extra_columns(cfg, terms), history).write]
    trackers = current()
    if trackers is not None:
        writes += trackers.sinks(folder, label)

    def on_epoch(row: dict[str, Any]) -> None:
        if excluded:
            row["val_acc_excluded"] = float(np.mean([row["per_class"][c] for c in excluded]))
        for write in writes:
            write(row)

    return on_epoch


def _sync_bn(student: torch.nn.Module, cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    """sync_bn=true under torchrun on CUDA: the student's BatchNorm layers as SyncBatchNorm (statistics over
    the global batch), with a warning when the per-rank batch is small."""
    if not (cfg.sync_bn and distributed.enabled()):
        return student
    if device.type != "cuda":  # PyTorch's SyncBatchNorm runs on GPUs only
        log.warning("sync_bn=true needs CUDA devices; on %s each rank keeps its own BatchNorm statistics", device.type)
        return student
    if cfg.batch_size < SYNC_BN_MIN_BATCH:
        log.warning(
            "sync_bn=true with batch_size=%d per rank: SyncBatchNorm adds a host sync and two collectives per "
            "BatchNorm layer at every step, which for a small net can make %d GPUs slower than one; use "
            "batch_size>=%d per rank, or sync_bn=false (each rank normalises over its own %d samples), or for a "
            "small net one job per GPU (e.g. a sweep) instead of torchrun",
            cfg.batch_size,
            distributed.world_size(),
            SYNC_BN_MIN_BATCH,
            cfg.batch_size,
        )
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)


def _train_data(cfg: DictConfig, splits: Splits):
    """What the student trains on: the transfer set, or for mode=none (no teacher) its labelled samples,
    exactly as the student-alone baseline does (see kdtrain/baseline.py)."""
    return baseline_store.labelled_only(splits.train) if cfg.mode.value == "none" else splits.train


def run(cfg: DictConfig, run_dir: Path) -> float:
    """Distill as `cfg` says, writing every output into `run_dir`; return the best validation accuracy.

    `cfg` has passed `config.validate` (the command line is checked before Hydra starts; call it yourself when
    composing a config in code); what needs the data (sizes, classes) is checked here."""
    set_offline(cfg.offline)
    with tracking(cfg, run_dir) as trackers:  # a failure marks the trackers' runs failed
        return _run(cfg, run_dir, trackers)


def _run(cfg: DictConfig, run_dir: Path, trackers: Trackers) -> float:
    start = time.time()
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    resume = _resume(cfg, run_dir, config)
    if resume is not None and _finished(resume, cfg, run_dir):
        summary = json.loads((run_dir / "summary.json").read_text())
        log.info("%s is finished (%d epochs); nothing to resume", run_dir, int(cfg.epochs))
        print_table(summary)
        return float(summary["student"]["best_val_acc"])
    device = resolve_device(distributed.device_for_rank(cfg.device))
    amp_dtype = resolve_amp(cfg.amp, device)
    specs = resolve(cfg)
    names = [s.name for s in specs]
    for key, term in (("kd_weight", "kd"), ("alpha", "feat")):
        if cfg[key] > 0 and term not in names and cfg.mode.value != "none":
            log.info("%s=%s is not used: the loss terms in force (%s) leave %s out", key, cfg[key], names, term)
    splits = build_dataset(cfg.dataset)
    if cfg.batch_size > len(splits.train):
        raise UserError(
            f"batch_size={cfg.batch_size} is larger than the training set ({len(splits.train)} samples); lower it"
        )
    log.info(
        "data: %s, %d training samples (%d labelled), %d validation, %d classes, input %s",
        cfg.dataset.name,
        len(splits.train),
        int((splits.train.y >= 0).sum()),
        len(splits.val),
        splits.num_classes,
        splits.in_shape,
    )
    _check_layers(cfg, specs, splits)  # before the teacher trains, which can take long

    # Every run reports against its teacher, mode=none included (it is trained once, then reused).
    # Under torchrun rank 0 gets the teacher first (training and storing it when needed) while the
    # other ranks wait; then they load it from the store. The same for a disk cache below.
    with distributed.rank0_first():
        teacher, teacher_info = get_teacher(cfg, splits, device, amp_dtype)
    teacher_pred = predict(teacher, splits.val, device, amp_dtype)
    log.info(
        "teacher: %s, %d params, val_acc %.4f", teacher_info["name"], teacher_info["params"], teacher_info["val_acc"]
    )

    seed_everything(int(cfg.seed))
    student = _sync_bn(_student(cfg, splits, device), cfg, device)
    setup = Setup(student, teacher, splits.train, splits.num_classes, splits.in_shape, device, cfg)
    terms = LossTerms(specs, setup).to(device)
    for line in terms.describe():
        log.info("loss term %s", line)
    log.info("loss terms in force: %s", _describe_weights(specs))

    with distributed.rank0_first():
        cache = _teacher_cache(cfg, splits, teacher, terms, device, amp_dtype)

    # A resumed run starts its metrics files from the rows of the epochs its checkpoint holds.
    main = distributed.is_main()  # only rank 0 writes files
    history = resume.state["history"] if resume else []
    watch = CollapseWatch("student", splits.num_classes, "lr", float(cfg.lr), skip=_hint_epochs(specs))
    for row in history:
        watch(row)
    if main:
        trackers.start(config)
    on_epoch = watch.then(_epoch_sink(cfg, run_dir, "student", names, history) if main else None)
    result = fit(
        student,
        _train_data(cfg, splits),  # mode=none: the labelled samples only
        splits.val,
        _spec(cfg, "student", run_dir / "checkpoints", {"config": config}),
        device,
        amp_dtype,
        terms=terms,
        teacher=teacher,
        teacher_val_pred=teacher_pred,
        on_epoch=on_epoch,
        augment=splits.augment,
        resume=resume,
        teacher_cache=cache,
    )
    if main:
        meta = {
            "model": OmegaConf.to_container(cfg.student, resolve=True),
            "num_classes": splits.num_classes,
            "in_shape": list(splits.in_shape),
            "mean": splits.mean,
            "std": splits.std,
            "class_names": class_names(cfg.dataset, splits),  # so kdtrain-predict on the bare file names the classes
        }
        if isinstance(splits.val, StreamSet):  # evaluated at image_size / 0.875, centre-cropped: predict does so too
            meta["crop"] = EVAL_CROP
        save_weights(student.state_dict(), run_dir / "student.safetensors", meta)
    baseline = None
    if cfg.baseline and cfg.mode.value != "none":
        with distributed.rank0_first():  # rank 0 alone gets (trains, or loads) the baseline; the others wait
            if main:
                baseline = _baseline(cfg, splits, device, amp_dtype, teacher_pred, run_dir / "baseline")
    if not main:
        return float(result["best_val_acc"])

    last = result["history"][-1]
    weight = {**dict.fromkeys(LEGACY_COLUMNS, 0.0), **{s.name: s.weight for s in specs}}
    summary = {
        "mode": cfg.mode.value,
        "temperature": float(cfg.temperature),
        "weights": {"ce_weight": weight["ce"], "kd_weight": weight["kd"], "alpha": weight["feat"]},
        "loss": {s.name: s.weight for s in specs},  # every term in force and its weight
        "seed": int(cfg.seed),
        "device": str(device),
        "amp": precision(amp_dtype),
        "teacher": teacher_info,
        "student": {
            "name": str(cfg.student.name),
            "params": count_params(student),
            "best_val_acc": result["best_val_acc"],
            "best_epoch": result["best_epoch"],
            "last_val_acc": result["last_val_acc"],
            "agreement": last["agreement"],
            "skipped_steps": sum(int(row.get("skipped_steps", 0)) for row in result["history"]),
            # bad_images=skip: images that could not be read: left out (memory path), or training images
            # replaced in their batches (stream path; an epoch reads each sample once)
            "bad_images": splits.left_out + max(int(row.get("bad_images", 0)) for row in result["history"]),
            "labelled": int((splits.train.y >= 0).sum()),
            "collapsed": watch.epoch is not None,
        },
        "baseline": baseline,
        "gain_vs_baseline": None if baseline is None else result["best_val_acc"] - baseline["best_val_acc"],
        "epochs": int(cfg.epochs),
        "seconds": time.time() - start,
        "run_dir": str(run_dir),
        "resumed_from": str(resume.path) if resume else None,
        "teacher_cache": None
        if cache is None
        else {
            "policy": cfg.teacher_cache.value,
            "key": cache.key,
            "views": cache.views,
            "dtype": cfg.teacher_cache_dtype.value,
            "topk": cfg.teacher_cache_topk,
        },
    }
    if cfg.dataset.exclude_classes:
        summary["student"]["last_val_acc_excluded"] = last.get("val_acc_excluded")
    print_table(summary)
    from kdtrain.report import finish_run  # compression report, curves.png, then summary.json

    finish_run(summary, run_dir, teacher, student, splits.in_shape, device)
    trackers.finish(summary, run_dir)
    return float(result["best_val_acc"])


def _teacher_cache(
    cfg: DictConfig,
    splits: Splits,
    teacher: torch.nn.Module,
    terms: LossTerms,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> TeacherCache | None:
    """The teacher-output cache for this run (teacher_cache=...), or None: the teacher runs every step."""
    if not terms.needs_teacher:
        return None  # e.g. mode=none: no term reads the teacher
    if isinstance(splits.train, StreamSet):
        if cfg.teacher_cache_views:
            raise UserError(
                f"teacher_cache_views={cfg.teacher_cache_views} replays the memory path's crops and flips; on the "
                "stream path set teacher_cache_views=0, or dataset.loader=memory"
            )
        log.info("teacher cache: off on the stream path (the teacher runs every step)")
        return None
    channels_last = wants_channels_last(None, device, teacher)
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
    cache_dir = Path(cfg.teacher_cache_dir or Path(cfg.teacher_store) / "cache").expanduser()
    cache = obtain(
        cfg.teacher_cache.value,
        teacher,
        splits.train,
        splits.num_classes,
        OmegaConf.to_container(cfg.dataset, resolve=True),
        cache_dir,
        device,
        amp_dtype,
        terms.layers("teacher"),
        dtype=cfg.teacher_cache_dtype.value,
        topk=cfg.teacher_cache_topk,
        temperature=float(cfg.temperature),
        views=int(cfg.teacher_cache_views),
        augment=splits.augment,
        channels_last=channels_last,
    )
    return cache


def _resume(cfg: DictConfig, run_dir: Path, config: dict[str, Any]) -> Resume | None:
    """The checkpoint to continue from (resume=PATH|RUN_DIR|auto), checked against this config; None: a new run.

    A run dir that holds a run is written into only by a resume of its own checkpoint."""
    path = find_resume(cfg.resume, run_dir)
    refuse_another_run(run_dir, path)
    if path is None:
        if cfg.resume == "auto":
            log.info("resume=auto: no checkpoint in %s, starting a new run", run_dir / "checkpoints")
        return None
    state, changed = load_training_checkpoint(path, config)
    if changed:
        log.warning(
            "resuming with settings that differ from the checkpoint's (the result will differ from an "
            "uninterrupted run): %s",
            "; ".join(changed),
        )
    return Resume(path, state)


def _finished(resume: Resume, cfg: DictConfig, run_dir: Path) -> bool:
    """A resume of a run that completed every epoch and wrote its summary: nothing left to do."""
    state = resume.state
    return (
        state.get("partial") is None and int(state["epoch"]) == int(cfg.epochs) and (run_dir / "summary.json").is_file()
    )


def _describe_weights(specs: list[TermSpec]) -> str:
    def schedule(s: TermSpec) -> str:
        parts = ([f"from epoch {s.start_epoch}"] if s.start_epoch > 1 else []) + (
            [f"warm-up {s.warmup_epochs} epochs"] if s.warmup_epochs else []
        )
        return f" ({', '.join(parts)})" if parts else ""

    return ", ".join(f"{s.weight:g} x {s.name}{schedule(s)}" for s in specs)


def _check_layers(cfg: DictConfig, specs: list[TermSpec], splits: Splits) -> None:
    """Check that the layers the terms read exist in both models, on the meta device (no memory, no RNG)."""
    wanted = [(s.cls.config_key, s.cls.layer_paths(s.cfg)) for s in specs]
    for i, role in enumerate(("student", "teacher")):
        if not any(paths[i] for _, paths in wanted):
            continue
        try:
            with torch.device("meta"):
                model = build_model(
                    OmegaConf.to_container(cfg[role], resolve=True), splits.num_classes, splits.in_shape, role
                )
        except Exception:
            continue
        for key, paths in wanted:
            Capture(model, paths[i], role, key).remove()


def _hint_epochs(specs: list[TermSpec]) -> int:
    """Epochs before every term is on (FitNets' hint stage): the collapse watch skips them."""
    return max([s.start_epoch - 1 for s in specs if s.weight > 0] or [0])


def _baseline(
    cfg: DictConfig,
    splits: Splits,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    teacher_pred: torch.Tensor,
    folder: Path,
) -> dict[str, Any]:
    """The student alone (CE only, weight 1, on the labelled samples; see kdtrain/baseline.py) with the
    same recipe and seed, from the baseline store (trained there first when needed); its metrics go
    into `folder`."""
    spec = _spec(cfg, "baseline", None, {})
    spec.batch_size *= distributed.world_size()  # trained by rank 0 alone: the student's global batch

    def build() -> torch.nn.Module:
        seed_everything(int(cfg.seed))
        return _student(cfg, splits, device)

    model, result, source = baseline_store.obtain(cfg, splits, device, amp_dtype, build, spec)
    on_epoch = _epoch_sink(cfg, folder, "baseline", ["ce"])
    for row in result["history"]:
        on_epoch(row)
    collapsed = collapse_epoch(result["history"], splits.num_classes)
    if collapsed is not None:
        warn("baseline (the student alone)", collapsed, splits.num_classes, "lr", float(cfg.lr))
    out = {
        "best_val_acc": result["best_val_acc"],
        "best_epoch": result["best_epoch"],
        "last_val_acc": result["last_val_acc"],
        "agreement": baseline_store.agreement(model, splits.val, device, amp_dtype, teacher_pred),
        "labelled": result["labelled"],
        "collapsed": collapsed is not None,
        "source": str(source),
        "reused": result["reused"],
    }
    if cfg.dataset.exclude_classes:
        out["last_val_acc_excluded"] = float(
            np.mean([result["history"][-1]["per_class"][c] for c in cfg.dataset.exclude_classes])
        )
    return out
