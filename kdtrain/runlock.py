"""One run per run dir: an exclusive lock on RUN_DIR/.kdtrain.lock, held while a run writes there.

The lock is an flock on an open file, so the OS drops it when the process ends however it ends
(SIGKILL and power loss included): a crashed run never leaves its run dir locked.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from kdtrain.errors import UserError

LOCK_FILE = ".kdtrain.lock"
_held: dict[Path, int] = {}  # run dir (resolved) -> the open lock file of this process


def hold(run_dir: Path) -> bool:
    """Lock `run_dir` (creating it) for this process; False when this process holds it already.

    Raises UserError, without writing anything, when another process holds it."""
    run_dir = Path(run_dir).expanduser().resolve()
    if run_dir in _held:
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(
            f"{run_dir} is in use by another kdtrain process (it holds {LOCK_FILE} there); wait for that run to "
            "end, or choose another hydra.run.dir"
        ) from None
    _held[run_dir] = fd
    return True


def release(run_dir: Path) -> None:
    """Drop this process's lock on `run_dir` (the lock file stays: removing it would race a new holder)."""
    fd = _held.pop(Path(run_dir).expanduser().resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
