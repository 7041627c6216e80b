"""User-facing errors and warnings."""

from __future__ import annotations

import warnings


class HaedError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""


class HaedWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints one line)."""


def warn(message: str) -> None:
    warnings.warn(message, HaedWarning, stacklevel=2)
