"""The one exception type for mistakes a user can fix (bad config, missing file, corrupt checkpoint), and the
wrapper that turns it into one line for every command-line tool."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """Reported as one line on stderr, with a non-zero exit and no traceback."""


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
