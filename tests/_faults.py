"""Helpers of the fault tests (imported by test modules): the CLI in-process, the one-line check, small
disks (a tmpfs where the tests may mount one), and writers that fail as a full or read-only disk does."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import CliResult
from typer.testing import CliRunner

from haed_cli.main import app

runner = CliRunner()


def cli(*args) -> CliResult:
    return CliResult(runner.invoke(app, [str(a) for a in args]))


def one_error(r: CliResult, *contains: str, code: int = 1) -> str:
    """A refusal: exit `code`, exactly one `error:` line (warnings aside) holding `contains`, no traceback,
    no advice to turn a safety check off."""
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr, r.exception)
    text = r.stdout + r.stderr
    assert "Traceback" not in text and "weights_only=False" not in text
    lines = [line for line in r.error_lines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for part in contains:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def temporaries(folder: Path) -> list[str]:
    """Hidden temporaries (.NAME.PID.HEX.tmp, .NAME.tmp-..., .NAME.old-...) left anywhere below `folder`."""
    return [str(p) for p in Path(folder).rglob(".*") if ".tmp" in p.name or ".old-" in p.name]


@contextlib.contextmanager
def small_disk(path: Path, size: str = "4m", read_only: bool = False):
    """A tmpfs of `size` mounted at `path` for the test; skipped where the tests may not mount (not root,
    or a container that forbids it)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path) -> None:
    """Fill the file system of `folder` to its last byte."""
    with open(folder / f"filler-{uuid.uuid4().hex}", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    with contextlib.suppress(OSError):
        while True:
            with open(folder / f"filler-{uuid.uuid4().hex}", "wb") as f:
                f.write(b"\0")


class FailingFile(io.RawIOBase):
    """A file for writing whose writes fail with `code` (ENOSPC: a full disk) once `after` bytes are in."""

    def __init__(self, path, mode: str, code: int, after: int):
        self.f = open(path, mode if "b" in mode else mode + "b")
        self.code, self.left = code, after

    def writable(self):
        return True

    def readable(self):
        return True

    def read(self, *args):
        return self.f.read(*args)

    def fileno(self):
        return self.f.fileno()

    def truncate(self, *args):
        return self.f.truncate(*args)

    def write(self, b):
        if len(b) > self.left:
            raise OSError(self.code, os.strerror(self.code))
        self.left -= len(b)
        return self.f.write(b)

    def seek(self, *args):
        return self.f.seek(*args)

    def close(self):
        self.f.close()
        super().close()


def failing_open(code: int = errno.ENOSPC, after: int = 0):
    """An `open` for a module's globals: reading as usual, writing through a `FailingFile`."""

    def fake_open(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            if "x" in mode:
                raise OSError(code, os.strerror(code))
            return FailingFile(path, mode, code, after)
        return open(path, mode, *args, **kwargs)

    return fake_open
