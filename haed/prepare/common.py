"""Helpers shared by the data sources: progress, splitting a byte stream, walking folders, downloading.

Writing itself goes through :class:`haed.data.DatasetWriter`: everything lands in a temporary
sibling of the output folder, renamed into place only when the dataset is complete, so an error
or an interruption leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

from haed.data import SPLITS, DatasetWriter, _one_line
from haed.errors import HaedError

CHUNK = 1 << 20
NETWORK_TIMEOUT_S = 5.0

# --------------------------------------------------------------------------------------------
# progress helper


class ProgressTask:
    """A progress task that does nothing when there is no progress display."""

    def __init__(self, progress, description: str, total: float | None):
        self.progress = progress
        self.id = progress.add_task(description, total=total) if progress is not None else None

    def advance(self, n: float) -> None:
        if self.progress is not None:
            self.progress.advance(self.id, n)


# --------------------------------------------------------------------------------------------
# splitting a byte stream by position


def check_fractions(valid_fraction: float, test_fraction: float) -> None:
    for flag, f in (("--valid-fraction", valid_fraction), ("--test-fraction", test_fraction)):
        if not (0.0 < f < 1.0):
            raise HaedError(f"{flag} must be between 0 and 1, exclusive (got {f}); every split needs some data")
    if valid_fraction + test_fraction >= 1.0:
        raise HaedError(
            f"--valid-fraction {valid_fraction} plus --test-fraction {test_fraction} leaves nothing for the train split"
        )


def split_sizes(total: int, valid_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """Byte counts (train, valid, test) for a stream of ``total`` bytes split at its end."""
    check_fractions(valid_fraction, test_fraction)
    n_valid = int(round(total * valid_fraction))
    n_test = int(round(total * test_fraction))
    n_train = total - n_valid - n_test
    for name, n, flag in (
        ("valid", n_valid, "--valid-fraction"),
        ("test", n_test, "--test-fraction"),
        ("train", n_train, None),
    ):
        if n <= 0:
            how = f"{flag} {valid_fraction if name == 'valid' else test_fraction}" if flag else "the fractions"
            raise HaedError(
                f"the input has {total:,} bytes: {how} leaves the {name} split empty; use more data or "
                + (f"a larger {flag}" if flag else "smaller --valid-fraction and --test-fraction")
            )
    return n_train, n_valid, n_test


class StreamSplitter:
    """Route a byte stream into train / valid / test by position."""

    def __init__(self, writer: DatasetWriter, sizes: tuple[int, int, int]):
        self.writer = writer
        self.ends = [sizes[0], sizes[0] + sizes[1], sizes[0] + sizes[1] + sizes[2]]
        self.pos = 0

    def write(self, b) -> None:
        mv = memoryview(b).cast("B")
        while len(mv):
            i = next((k for k, e in enumerate(self.ends) if self.pos < e), None)
            if i is None:
                raise HaedError("the input grew while it was being read")
            take = min(len(mv), self.ends[i] - self.pos)
            self.writer.write(SPLITS[i], mv[:take])
            self.pos += take
            mv = mv[take:]


HASH_SPLIT_RULE = (
    "by file: u = (first 8 bytes of sha256 of the file's path inside its folder or archive, UTF-8, as a "
    "big-endian integer) / 2^64; u < test_fraction -> test, u < test_fraction + valid_fraction -> valid, else train"
)


def hash_split(name: str, valid_fraction: float, test_fraction: float) -> str:
    """The default audio split rule: u = first 8 bytes of sha256(name) / 2^64;
    u < test_fraction -> test, u < test_fraction + valid_fraction -> valid, else train."""
    u = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + valid_fraction:
        return "valid"
    return "train"


# --------------------------------------------------------------------------------------------
# folders


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def walk_files(
    folder: Path, keep: Callable[[str], bool] = lambda n: True, skip_dirs: frozenset = frozenset()
) -> list[tuple[Path, str]]:
    """(path, name relative to ``folder``) of every file below it, sorted by name; hidden names and
    ``skip_dirs`` left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d) and d not in skip_dirs]
        for f in filenames:
            if _is_hidden(f) or not keep(f):
                continue
            p = Path(dirpath) / f
            if p.is_file():
                found.append((p, p.relative_to(folder).as_posix()))
    found.sort(key=lambda t: t[1])
    return found


# --------------------------------------------------------------------------------------------
# network


def resolve_host(host: str, port: int, timeout: float) -> None:
    """Name lookup with a deadline (getaddrinfo itself has none)."""
    result: dict = {}

    def run():
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            result["ok"] = True
        except OSError as e:
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise OSError(f"looking up {host} took more than {timeout:g} s")
    if "error" in result:
        raise result["error"]


def download(url: str, dest: Path, progress=None, timeout: float = NETWORK_TIMEOUT_S, what: str = "file") -> None:
    """Download ``url`` to ``dest`` with a progress bar; a clear HaedError, within seconds, if offline."""
    parsed = urllib.parse.urlparse(url)
    try:
        if parsed.hostname:
            resolve_host(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80), timeout)
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            task = ProgressTask(progress, f"downloading {what}", int(length) if length and length.isdigit() else None)
            with open(dest, "wb") as fh:
                while True:
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    fh.write(chunk)
                    task.advance(len(chunk))
    except (urllib.error.URLError, OSError, ValueError, socket.timeout) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError) else e
        raise HaedError(f"cannot download {what} from {url} ({_one_line(reason)})") from None
