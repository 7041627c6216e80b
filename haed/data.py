"""The haed dataset directory: reading it (memmap, random windows) and writing it atomically.

A dataset directory holds

- ``train.bin``, ``valid.bin``, ``test.bin``: raw ``uint8`` bytes (UTF-8 text, or 8-bit mu-law
  audio samples), read with :func:`numpy.memmap`, never loaded whole;
- ``meta.json``: what the bytes are (``kind`` ``"text"`` or ``"audio"``), where they came from,
  the byte count and sha256 of every split, the haed version that wrote them and, for audio, the
  sample rate, the encoding (``"mu-law-8"``) and the split, offset and length of every source file.

Writers go through :class:`DatasetWriter`, which builds the directory as a hidden temporary
sibling of the target and renames it into place only when everything succeeded, so a failed or
interrupted ``haed prepare`` leaves no output directory behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from haed import __version__
from haed.atomic import check_free_space, remove_quietly, temporary_sibling
from haed.errors import HaedError, WriteError, write_error

SPLITS = ("train", "valid", "test")
META_NAME = "meta.json"
FORMAT_NAME = "haed-dataset"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# reading


class ByteDataset:
    """An opened dataset directory. ``split(name)`` gives a read-only ``uint8`` memmap."""

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self.kind: str = meta["kind"]
        self.sample_rate: int | None = meta.get("sample_rate") if self.kind == "audio" else None
        self._cache: dict[str, np.ndarray] = {}

    def _check_split_name(self, name: str) -> None:
        if name not in SPLITS:
            raise HaedError(f"unknown split {name!r}: a dataset has the splits {', '.join(SPLITS)}")

    def split(self, name: str) -> np.ndarray:
        """The bytes of split ``name`` (train, valid or test) as a read-only ``uint8`` memmap."""
        self._check_split_name(name)
        if name in self._cache:
            return self._cache[name]
        file = self.path / f"{name}.bin"
        if not file.is_file():
            raise HaedError(f"dataset {self.path} has no {file.name}; prepare it again with `haed prepare`")
        size = file.stat().st_size
        expected = self.meta["splits"][name]["bytes"]
        if expected is not None and int(expected) != size:
            raise HaedError(
                f"dataset {self.path}: {file.name} has {size:,} bytes but meta.json says {int(expected):,}; "
                "prepare it again with `haed prepare ... --force`"
            )
        if size == 0:
            raise HaedError(f"dataset {self.path}: split {name!r} is empty")
        data = np.memmap(file, dtype=np.uint8, mode="r", shape=(size,))
        self._cache[name] = data
        return data

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        sizes = ", ".join(
            f"{s}={self.meta['splits'][s]['bytes']:,}" for s in SPLITS if s in self.meta.get("splits", {})
        )
        return f"ByteDataset({str(self.path)!r}, kind={self.kind!r}, {sizes})"


def read_meta(path: str | os.PathLike) -> dict:
    """Parse ``meta.json`` of a dataset directory, with a clear HaedError for anything wrong."""
    path = Path(path)
    if not path.exists():
        raise HaedError(
            f"dataset not found: {path} (make one with `haed prepare`, e.g. `haed prepare stdlib --out {path}`)"
        )
    if not path.is_dir():
        raise HaedError(f"{path} is not a dataset directory (it is a file)")
    meta_file = path / META_NAME
    if not meta_file.is_file():
        raise HaedError(f"{path} is not a haed dataset: it has no {META_NAME} (make one with `haed prepare`)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HaedError(f"{meta_file} cannot be read as JSON: {_one_line(e)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise HaedError(f"{path} is not a haed dataset: {META_NAME} does not say format {FORMAT_NAME!r}")
    if meta.get("kind") not in ("text", "audio"):
        raise HaedError(f"{meta_file}: unknown dataset kind {meta.get('kind')!r}")
    if meta["kind"] == "audio" and not isinstance(meta.get("sample_rate"), int):
        raise HaedError(f"{meta_file}: an audio dataset needs an integer sample_rate")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or any(not isinstance(splits.get(s), dict) for s in SPLITS):
        raise HaedError(f"{meta_file}: splits must be an object with an entry for each of {', '.join(SPLITS)}")
    for name in SPLITS:
        size = splits[name].get("bytes")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise HaedError(f"{meta_file}: splits.{name}.bytes must be a byte count, not {size!r}")
    return meta


def open_dataset(path: str | os.PathLike) -> ByteDataset:
    """Open a dataset directory written by ``haed prepare``."""
    path = Path(path)
    return ByteDataset(path, read_meta(path))


def random_windows(data: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """``batch_size`` windows of ``seq_len`` consecutive bytes at uniformly random start offsets.

    Returns a fresh ``(batch_size, seq_len)`` ``uint8`` array; only the touched pages of a memmap
    are read. Every start offset in ``0 .. len(data) - seq_len`` is equally likely.
    """
    if batch_size <= 0 or seq_len <= 0:
        raise HaedError(f"batch size and sequence length must be positive (got {batch_size} and {seq_len})")
    n = int(data.shape[0])
    if n < seq_len:
        raise HaedError(f"the split has {n:,} bytes, fewer than one window of seq_len={seq_len:,}")
    starts = rng.integers(0, n - seq_len + 1, size=batch_size)
    index = starts[:, None] + np.arange(seq_len)[None, :]
    return np.asarray(data[index], dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# writing


def _one_line(e: BaseException | str) -> str:
    text = str(e) or type(e).__name__
    return " ".join(text.split())


def is_haed_dataset(path: Path) -> bool:
    try:
        read_meta(path)
        return True
    except HaedError:
        return False


def check_output_dir(out: str | os.PathLike, force: bool) -> Path:
    """Validate ``--out`` before any work: refuse an existing path unless ``force`` and safe to replace."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise HaedError(
                f"output directory {out} already exists; choose another --out or pass --force to replace it"
            )
        if not out.is_dir() or out.is_symlink():
            raise HaedError(f"{out} exists and is not a directory; refusing to replace it")
        if any(out.iterdir()) and not is_haed_dataset(out):
            raise HaedError(f"{out} exists and is not a haed dataset; refusing to replace it even with --force")
    return out


class _SplitFile:
    """One split being written; a failed write or close is a WriteError naming the dataset (`label`)."""

    def __init__(self, path: Path, label: str):
        self.path, self.label = path, label
        try:
            self.fh = open(path, "wb")
        except OSError as e:
            raise write_error(label, e) from None
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, b) -> None:
        mv = memoryview(b).cast("B")
        try:
            self.fh.write(mv)
        except OSError as e:
            raise write_error(self.label, e) from None
        self.sha.update(mv)
        self.bytes += len(mv)

    def close(self) -> None:
        if not self.fh.closed:
            try:
                self.fh.close()
            except OSError as e:
                raise write_error(self.label, e) from None


class DatasetWriter:
    """Build a dataset in a temporary sibling of ``out`` and rename it into place on success.

    Use as a context manager::

        with DatasetWriter(out, force=False) as w:
            w.write("train", some_bytes)
            ...
            meta = w.finish({"kind": "text", "source": {...}})

    Leaving the block by an exception (or without ``finish``) removes the temporary directory and
    any parent directories that this writer created, so nothing is left behind.
    """

    def __init__(self, out: str | os.PathLike, force: bool = False):
        self.out = check_output_dir(out, force)
        self.force = force
        self._created_parents: list[Path] = []
        parent = self.out.absolute().parent
        missing = []
        p = parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(parent, e) from None
        self._created_parents = missing  # deepest first
        self.tmp = temporary_sibling(self.out)
        try:
            self.tmp.mkdir()
        except OSError as e:
            self._remove_parents()
            raise write_error(f"the dataset {self.out}", e) from None
        self._files: dict[str, _SplitFile] = {}
        self.finished = False
        try:
            for s in SPLITS:
                self._files[s] = _SplitFile(self.tmp / f"{s}.bin", f"the dataset {self.out}")
        except WriteError:
            self.abort()
            raise

    # -- writing --------------------------------------------------------------------------------

    def write(self, split: str, b) -> None:
        self._files[split].write(b)

    def expect(self, size: int) -> None:
        """Refuse, before writing, a dataset of `size` bytes that the disk has no room for."""
        check_free_space(self.out.absolute().parent, size, f"the dataset {self.out}")

    def bytes_written(self, split: str) -> int:
        return self._files[split].bytes

    def finish(self, meta: dict) -> dict:
        """Check every split is non-empty, add sizes and hashes to ``meta``, write it, rename into place."""
        for f in self._files.values():
            f.close()
        empty = [s for s in SPLITS if self._files[s].bytes == 0]
        if empty:
            raise HaedError(
                f"the {' and '.join(empty)} split{'s' if len(empty) > 1 else ''} would be empty; "
                "use more data or other split fractions (--valid-fraction, --test-fraction)"
            )
        full = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "kind": meta["kind"],
            "created_by": f"haed {__version__}",
            "created_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "splits": {s: {"bytes": self._files[s].bytes, "sha256": self._files[s].sha.hexdigest()} for s in SPLITS},
            "total_bytes": sum(self._files[s].bytes for s in SPLITS),
        }
        full.update({k: v for k, v in meta.items() if k not in full})
        try:
            text = json.dumps(full, indent=2, ensure_ascii=False) + "\n"
            (self.tmp / META_NAME).write_text(text, encoding="utf-8")
        except OSError as e:
            raise write_error(f"the dataset {self.out}", e) from None
        self._install()
        self.finished = True
        return full

    def _install(self) -> None:
        old = None
        if self.out.exists():
            # --force was checked in check_output_dir; re-check now in case it changed meanwhile.
            check_output_dir(self.out, force=True)
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        try:
            os.replace(self.tmp, self.out)
        except OSError as e:
            if old is not None:
                os.replace(old, self.out)
            raise HaedError(f"cannot move the finished dataset to {self.out}: {_one_line(e)}") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    # -- cleanup --------------------------------------------------------------------------------

    def _remove_parents(self) -> None:
        for p in self._created_parents:
            try:
                p.rmdir()
            except OSError:
                break

    def abort(self) -> None:
        for f in self._files.values():
            with contextlib.suppress(OSError, WriteError):  # a full disk fails the final flush too
                f.close()
        remove_quietly(self.tmp)
        self._remove_parents()

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.finished:
            self.abort()
