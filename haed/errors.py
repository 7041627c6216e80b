"""User-facing errors and warnings."""

from __future__ import annotations

import warnings
from pathlib import Path


class HaedError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits with `exit_code`."""

    exit_code = 1


class WriteError(HaedError):
    """A file or folder could not be written (a full disk, a read-only folder, no permission)."""


class RunStopped(HaedError):
    """Training stopped because it could not write (a checkpoint, its metrics); the last intact
    checkpoint is still the resume point. Exit status 75 (EX_TEMPFAIL: try again once there is room)."""

    exit_code = 75


def stop_exit_status(signal_name: str) -> int:
    """The exit status of a command that a stop request ended: 128 + the signal's number, as its default
    action would give (130 for SIGINT, 143 for SIGTERM)."""
    return 130 if signal_name == "SIGINT" else 143


class StopRequested(HaedError):
    """A stop request (Ctrl-C, SIGTERM) ended one phase of a command of several (compare, quickstart) at its
    checkpoint: the command stops there instead of starting the next phase, and run again it continues from
    that checkpoint. Exit status as for `haed train` (`stop_exit_status`)."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.exit_code = stop_exit_status(signal_name)


class HaedWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints one line)."""


def warn(message: str) -> None:
    warnings.warn(message, HaedWarning, stacklevel=2)


def os_reason(e: OSError) -> str:
    """The cause of an OSError in a few words: "no space left on device", "permission denied", ..."""
    text = e.strerror or str(e) or type(e).__name__
    return " ".join(text.split()).lower()


def write_error(path: Path | str, e: OSError) -> WriteError:
    """The one line for a failed write: the path and the cause."""
    return WriteError(f"cannot write {path}: {os_reason(e)}")
