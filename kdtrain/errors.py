"""The one exception type for mistakes a user can fix (bad config, missing file, corrupt checkpoint), the
write failures a user fixes on the machine (a full disk, a read-only folder), and the wrapper that turns
them into one line for every command-line tool."""

from __future__ import annotations

import errno
import functools
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class UserError(Exception):
    """Reported as one line on stderr, with a non-zero exit and no traceback."""


class WriteError(UserError):
    """A file could not be written because its file system is full or its folder is not writable."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
NO_WRITE = {errno.EACCES, errno.EPERM, errno.EROFS}
# torch.save and safetensors report a failed write without an errno: in words, or (torch.save) only as
# "unexpected pos" / "file write failed", which means a full disk when almost no space is left.
NO_SPACE_WORDS = ("No space left", "Disk quota")
WRITE_FAILED = ("unexpected pos", "write failed")
LOW_SPACE = 1 << 20  # bytes


def write_problem(e: BaseException, folder: Path) -> str | None:
    """Why writing into `folder` failed, when the disk or the folder is to blame: "full" or "not writable";
    None for any other error (a bug, to be raised as it is)."""
    code = getattr(e, "errno", None)
    if code in NO_SPACE or any(words in str(e) for words in NO_SPACE_WORDS):
        return "full"
    if code in NO_WRITE or "Read-only file system" in str(e) or "Permission denied" in str(e):
        return "not writable"
    if any(text in str(e) for text in WRITE_FAILED):
        try:
            if shutil.disk_usage(folder).free < LOW_SPACE:
                return "full"
        except OSError:
            pass
    return None


def write_error(e: BaseException, path: Path) -> WriteError | None:
    """The one-line WriteError for a failed write of `path` (naming it and what to do), or None (not a disk or
    permission problem)."""
    path = Path(path)
    problem = write_problem(e, path.parent)
    if problem == "full":
        try:
            left = shutil.disk_usage(path.parent).free
            free = f"{left / 2**20:.0f} MB free" if left >= 10 * 2**20 else f"{left / 2**10:.0f} KB free"
        except OSError:
            free = "no space left"
        return WriteError(
            f"cannot write {path}: its file system is full ({free}); free space there (or choose another folder) "
            "and run again; files written before are intact",
            path,
        )
    if problem == "not writable":
        return WriteError(
            f"cannot write {path}: {path.parent} is read-only or not writable for this user; make it writable "
            "(or choose another folder) and run again",
            path,
        )
    return None


def one_line_errors(tool: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap an entry point: a UserError becomes `TOOL: error: MESSAGE` on stderr and exit status 2."""

    def wrap(main: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(main)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                return main(*args, **kwargs)
            except UserError as e:
                print(f"{tool}: error: {e}", file=sys.stderr)
                sys.exit(2)

        return wrapped

    return wrap
