"""Errors for bad input. Library calls raise them; the CLI turns them into a one-line ``SystemExit``."""


class UsageError(ValueError):
    """Bad input the user can fix: the message names the path/key/value and what to do."""


class CorruptImageError(UsageError):
    """An image file that cannot be decoded (``--on-corrupt fail``)."""


class CorruptImageWarning(UserWarning):
    """An image file that cannot be decoded was skipped (``--on-corrupt skip``)."""


class CorruptVideoError(UsageError):
    """A video file or frame folder that cannot be decoded (``--on-corrupt fail``)."""


class CorruptVideoWarning(UserWarning):
    """A video that cannot be decoded was skipped (``--on-corrupt skip``)."""
