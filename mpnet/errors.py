"""User-facing errors: the CLIs print these as one line on stderr and exit non-zero, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad input, bad config, wrong device); the message says how."""
