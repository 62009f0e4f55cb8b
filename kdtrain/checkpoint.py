"""Atomic writes, safe loads and resume checks. Nothing a user hands us is unpickled with code
execution: checkpoints load with `torch.load(weights_only=True)`, weights with safetensors.
Checkpoints carry a checksum of their content (`sha256`), verified on every load."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kdtrain.errors import UserError, write_error


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temp file in the same directory, fsync it, rename it over `path`, fsync the directory.

    A crash at any point leaves either the old file or the new one, never a torn one; the directory
    fsync makes the rename itself survive a power loss. A full disk or a read-only folder raises a
    WriteError (one line naming the path), leaving no temp file. The file gets the permissions of
    the user's umask, as a plain open() would (mkstemp alone makes it 0600).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # after the write: safetensors replaces the file it is given
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as e:
        error = write_error(e, path)  # judged while a partial temp file still takes its space
        if error is None:
            raise
        raise error from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    _kill_point(path)


# Test-only fault injection: KDTRAIN_TEST_KILL_AT=NAME:N SIGKILLs this process right after its N-th
# atomic write of a file named NAME (e.g. best.pt:2), so tests can crash a run at each of its writes.
_WRITES: Counter[str] = Counter()


def _kill_point(path: Path) -> None:
    target = os.environ.get("KDTRAIN_TEST_KILL_AT")
    if not target:
        return
    _WRITES[path.name] += 1
    name, _, n = target.rpartition(":")
    if path.name == name and _WRITES[name] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory handles: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# The key of a checkpoint's checksum: sha256 over every other entry (see state_digest).
CHECKSUM = "sha256"


def state_digest(obj: Any) -> str:
    """sha256 of a checkpoint's content: tensors by dtype, shape and bytes, containers in order, other
    values by type and repr (what torch.load(weights_only=True) gives back unchanged)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}:".encode())
        for value in obj:
            _feed(h, value)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def non_finite(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors in `state` that hold a NaN or an infinity."""
    return [
        k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.isfinite().all()
    ]


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """torch.save `state` atomically, with its checksum (any old one is replaced)."""
    body = {k: v for k, v in state.items() if k != CHECKSUM}
    atomic_write(path, lambda p: torch.save({**body, CHECKSUM: state_digest(body)}, p))


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, Any] | None = None) -> None:
    """Save tensors as safetensors; `metadata` values are stored as JSON strings."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_checkpoint(path: Path, what: str) -> dict[str, Any]:
    """Load a `.pt` checkpoint without executing code; one clear UserError when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist; give the path of a .pt or .safetensors file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{what} {path} {_why_unloadable(e)}") from None
    if not isinstance(state, dict):
        raise UserError(f"{what} {path} holds a {type(state).__name__}, not a checkpoint dictionary")
    # Checkpoints kdtrain wrote carry a checksum; older ones and other tools' files have none.
    if CHECKSUM in state and state_digest({k: v for k, v in state.items() if k != CHECKSUM}) != state[CHECKSUM]:
        raise UserError(
            f"{what} {path} fails its checksum: its content changed after kdtrain wrote it (a bit flip on disk "
            "or in a copy); use an intact copy (a run's checkpoints/best.pt holds its best epoch)"
        )
    return state


def _why_unloadable(e: Exception) -> str:
    """The end of a one-line message saying why torch.load(weights_only=True) refused a file."""
    text = str(e)
    code = re.search(r"GLOBAL ([\w.]+)", text)
    if code:
        return (
            f"was refused: it names Python code ({code.group(1)}) that would run on loading, and kdtrain loads "
            "only tensors and plain values; if you trust the file, re-save its weights as a state dict or .safetensors"
        )
    if "Unsupported operand" in text:
        return (
            "is not a PyTorch checkpoint (a plain pickle or another format, refused unread); "
            "give a file written by torch.save or kdtrain"
        )
    if isinstance(e, EOFError) or "central directory" in text or "PytorchStreamReader" in text:
        return "is truncated or corrupt (an interrupted copy or download?); use an intact copy"
    first = text.strip().splitlines()[-1] if text.strip() else type(e).__name__
    return f"cannot be loaded ({first[:200]}); it is corrupt or not a kdtrain/PyTorch checkpoint"


def load_state_dict_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Model weights from a .safetensors file, or from a .pt file (a state dict, or a checkpoint holding one)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise UserError(f"{what} {path} does not exist; give the path of a .pt or .safetensors file")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(
                f"{what} {path} is not a readable safetensors file ({e}); it may be truncated or corrupt"
            ) from None
    state = load_checkpoint(path, what)
    for key in ("student", "model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{what} {path} holds no model weights (expected a state dict of tensors)")
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """load_state_dict with a one-line error naming the first mismatched keys or shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected:
        raise UserError(
            f"{what} {path} is for another architecture: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}; "
            "check that the model config matches the one the checkpoint was trained with"
        )
    if shapes:
        k = shapes[0]
        raise UserError(
            f"{what} {path} does not fit the model: {k} has shape {tuple(state[k].shape)} in the file but "
            f"{tuple(own[k].shape)} in the model (another number of classes or another width?)"
        )
    model.load_state_dict(state)


# --- resume ----------------------------------------------------------------------------------------

# What engine.fit needs to continue a run; written into every checkpoints/{last,best}.pt.
TRAINING_KEYS = ("model", "adapter", "optimizer", "scheduler", "scaler", "epoch", "step", "rng", "history", "config")
# Settings a checkpoint resumes only into unchanged: they decide the model, its data and the shape
# of the optimizer state and schedule (the first difference is an error).
MUST_MATCH = ("student", "teacher", "dataset", "mode", "loss", "optimizer.name", "batch_size")
# Settings that may change on resume without changing the result.
FREE = ("resume", "progress", "teacher_store", "nan_policy", "baseline", "logger", "wandb", "mlflow", "offline")


def find_resume(value: str | None, run_dir: Path | None) -> Path | None:
    """The checkpoint `resume=value` names: a file, a run dir's checkpoints/last.pt, or for `auto`
    `run_dir`'s checkpoints/last.pt when it exists (None: start fresh)."""
    if not value:
        return None
    if value == "auto":
        last = Path(run_dir) / "checkpoints" / "last.pt" if run_dir is not None else None
        return last if last is not None and last.is_file() else None
    path = Path(value).expanduser()
    if path.is_dir():
        last = path / "checkpoints" / "last.pt"
        if not last.is_file():
            raise UserError(
                f"resume={value} holds no checkpoints/last.pt to continue from; give the run dir of a "
                "kdtrain run that saved a checkpoint, a checkpoint file, or resume=auto"
            )
        return last
    if not path.exists():
        raise UserError(
            f"resume={value} does not exist; give a run dir, a checkpoint file (RUN_DIR/checkpoints/last.pt) or "
            "resume=auto"
        )
    return path


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run dir a checkpoint was written into (RUN_DIR/checkpoints/NAME.pt), or None."""
    checkpoint = Path(checkpoint).resolve()
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def refuse_another_run(run_dir: Path, checkpoint: Path | None) -> None:
    """A run dir that holds a run is written into only by a resume of its own checkpoint."""
    holds_run = (run_dir / "summary.json").exists() or (run_dir / "checkpoints" / "last.pt").exists()
    if holds_run and (checkpoint is None or run_dir_of(checkpoint) != run_dir.resolve()):
        raise UserError(
            f"{run_dir} already holds a run; choose another hydra.run.dir so nothing is overwritten, "
            f"or continue that run with resume={run_dir}"
        )


def load_training_checkpoint(path: Path, config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Load a checkpoint to resume from and check it against the current resolved `config`.

    Raises UserError when the file is unreadable, is not a kdtrain training checkpoint, or was
    trained with other MUST_MATCH settings (naming the first differing key). Returns the state and
    the other settings that differ ("key: old -> new"): they are allowed, but change the result.
    """
    state = load_checkpoint(path, "resume")
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing or not isinstance(state["config"], dict):
        raise UserError(
            f"resume {path} is not a kdtrain training checkpoint (it has no {(missing or ['config'])[0]!r} entry); "
            "give checkpoints/last.pt of a kdtrain run"
        )
    from kdtrain.config import schema_default

    changed = []
    for key, old, new in config_differences(state["config"], config):
        if old is _UNSET and new == schema_default(key):
            continue  # a setting added since the checkpoint was written, at its default: the old behaviour
        if any(key == k or key.startswith(k + ".") for k in MUST_MATCH):
            raise UserError(
                f"resume {path} was trained with {key}={_show(old)} but this run has {key}={_show(new)}; "
                f"resume with the checkpoint's settings, or start a new run without resume"
            )
        if not any(key == k or key.startswith(k + ".") for k in FREE):
            changed.append(f"{key}: {_show(old)} -> {_show(new)}")
    _check_progress(state, path)
    return state, changed


def _check_progress(state: dict[str, Any], path: Path) -> None:
    """The epoch count, metrics history and RNG states are usable (each is restored as it is on resume)."""
    history, rng = state["history"], state["rng"]
    problem = None
    if not isinstance(state["epoch"], int) or not isinstance(history, list) or len(history) != state["epoch"]:
        problem = f"epoch {state['epoch']!r} does not match its {type(history).__name__} of metrics rows"
    elif not all(isinstance(row, dict) and isinstance(row.get("val_acc"), (int, float)) for row in history):
        problem = "its metrics history holds a row that is not an epoch's metrics"
    else:
        try:
            torch.Generator().set_state(rng["torch"])
            torch.Generator().set_state(rng["batches"])
            random.Random().setstate((3, tuple(rng["python"]), None))
        except (TypeError, ValueError, KeyError, RuntimeError, IndexError):
            problem = "its random-number-generator states ('rng') are damaged"
    if problem:
        raise UserError(
            f"resume {path} is damaged: {problem}; resume from another checkpoint (e.g. checkpoints/best.pt) "
            "or start a new run"
        )


_UNSET = object()


def config_differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs, in the old config's key order."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            out += config_differences(old.get(key, _UNSET), new.get(key, _UNSET), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _show(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    return value if isinstance(value, str) else json.dumps(value)
