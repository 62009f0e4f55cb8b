"""The one exception type for mistakes a user can fix (bad config, missing file, corrupt checkpoint)."""


class UserError(Exception):
    """Reported as one line on stderr, with a non-zero exit and no traceback."""
