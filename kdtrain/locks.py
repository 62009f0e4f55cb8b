"""The file locks parallel kdtrain jobs wait on (a stored teacher, a teacher cache file), waiting visibly.

The wait polls a non-blocking flock instead of blocking in the kernel, so it says what it waits for
(at once, then every WAIT_LOG_SECONDS) and a SIGINT/SIGTERM ends it at once: under
`engine.stop_on_signals` (the CLI) with `Interrupted` (one line, exit 130/143), otherwise as the signal's
usual handler does (KeyboardInterrupt, or the process ends).
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO

log = logging.getLogger("kdtrain")

WAIT_LOG_SECONDS = 30.0
POLL_SECONDS = 0.1


@contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created when missing); `what` names what it guards, for the wait's log."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        _acquire(f, path, what)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _acquire(f: IO[str], path: Path, what: str) -> None:
    from kdtrain.engine import STOP, Interrupted  # (the engine imports the teacher cache, which imports this)

    started, since, next_log = time.monotonic(), datetime.now().strftime("%Y-%m-%d %H:%M:%S"), 0.0
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        waited = time.monotonic() - started
        if waited >= next_log:
            log.info(
                "waiting for %s: another kdtrain process holds %s (waiting since %s, %.0f s so far)",
                what,
                path,
                since,
                waited,
            )
            next_log = waited + WAIT_LOG_SECONDS
        if STOP.signum is not None:
            raise Interrupted(STOP.signum, None, f"the wait for {what}")
        time.sleep(POLL_SECONDS)
