"""Writing files so that a reader never sees half of one: a uniquely named temporary sibling, then a rename.

A crash (or kill -9) at any moment leaves either the old file or the new one under the real name,
plus at worst a temporary `.NAME.PID.HEX.tmp` beside it. A write that fails (a full disk, a read-only
folder) removes its temporary and raises a `WriteError` naming the path and the cause.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from haed.errors import HaedError, WriteError, write_error

FREE_SPACE_MARGIN = 1 << 20  # bytes kept free beyond a write's known size


def temporary_sibling(path: Path) -> Path:
    """A name beside `path` that no other writer (process or thread) can be using."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def remove_quietly(path: Path) -> None:
    """Remove a file or folder if it is there; a failure to remove is not an error (clean-up only)."""
    path = Path(path)
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write (a file or a folder); on success it replaces `path`.

    An OSError while writing becomes a `WriteError` naming `path`; the temporary is removed either way.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        remove_quietly(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def existing_ancestor(path: Path) -> Path:
    """`path` itself if it exists, else its nearest existing parent folder."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, size: int = 0, what: str = "") -> None:
    """Refuse, before any work, an output that cannot be written: `path` names a folder, or its folder
    (the nearest one that exists) refuses a new file, or has less free space than `size` bytes."""
    path = Path(path)
    label = f"{what} {path}".strip()
    if path.is_dir():
        raise HaedError(f"{label} is a folder: give a file name")
    folder = existing_ancestor(path.parent)
    if not folder.is_dir():
        raise HaedError(f"cannot write {label}: {folder} is a file, not a folder")
    probe = temporary_sibling(folder / "write-probe")
    try:
        with open(probe, "xb"):
            pass
    except OSError as e:
        raise write_error(label, e) from None
    finally:
        remove_quietly(probe)
    check_free_space(folder, size, label)


def check_free_space(folder: Path, size: int, label: str) -> None:
    """A `WriteError` when `folder`'s file system has less than `size` bytes (and a margin) free."""
    if size <= 0:
        return
    free = shutil.disk_usage(existing_ancestor(folder)).free
    if free < size + FREE_SPACE_MARGIN:
        raise WriteError(
            f"cannot write {label}: not enough free space (it needs about {_megabytes(size)}, "
            f"{existing_ancestor(folder)} has {_megabytes(free)} free)"
        )


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG atomically, and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    except OSError as e:
        raise write_error(path.parent, e) from None
    finally:
        plt.close(fig)
    return path
