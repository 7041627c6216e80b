"""`haed prepare text` (files and folders of text) and `haed prepare stdlib` (the offline default corpus).

Both concatenate files in a documented order into one byte stream and split it at its end:
train, then valid, then test.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterable

from haed.data import DatasetWriter, _one_line, check_output_dir
from haed.errors import HaedError
from haed.prepare.common import CHUNK, ProgressTask, StreamSplitter, check_fractions, split_sizes, walk_files

TEXT_ORDER_RULE = (
    "paths in the order given; a folder contributes every file below it (recursively), sorted by "
    "path relative to the folder (POSIX form, code point order), skipping names that start with '.'; "
    "files are concatenated with nothing in between"
)


def collect_text_files(paths: Iterable[str | os.PathLike], exclude: Path | None = None) -> list[tuple[Path, str]]:
    """(path, name) of every input file, in the documented order (:data:`TEXT_ORDER_RULE`)."""
    paths = list(paths)
    if not paths:
        raise HaedError("give at least one file or folder")
    exclude = exclude.resolve() if exclude is not None else None
    files: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if not p.exists():
            raise HaedError(f"no such file or folder: {p}")
        if p.is_file():
            files.append((p, p.as_posix()))
        elif p.is_dir():
            inside = walk_files(p)
            if exclude is not None:
                inside = [(f, n) for f, n in inside if exclude not in f.resolve().parents]
            if not inside:
                raise HaedError(f"folder {p} contains no files")
            files.extend((f, f"{p.as_posix().rstrip('/')}/{n}") for f, n in inside)
        else:
            raise HaedError(f"{p} is neither a file nor a folder")
    return files


def _prepare_files(
    files: list[tuple[Path, str]],
    out,
    *,
    valid_fraction: float,
    test_fraction: float,
    source: dict,
    order: str,
    force: bool,
    progress,
    max_bytes: int | None = None,
) -> dict:
    check_fractions(valid_fraction, test_fraction)
    entries = []
    total = 0
    for path, name in files:
        size = path.stat().st_size
        if max_bytes is not None and total + size > max_bytes:
            size = max_bytes - total
        if size > 0 or max_bytes is None:
            entries.append({"name": name, "offset": total, "length": size, "_path": path})
        total += size
        if max_bytes is not None and total >= max_bytes:
            break
    if total == 0:
        raise HaedError("the input files are all empty (0 bytes)")
    sizes = split_sizes(total, valid_fraction, test_fraction)
    with DatasetWriter(out, force=force) as w:
        splitter = StreamSplitter(w, sizes)
        task = ProgressTask(progress, "reading text", total)
        for e in entries:
            remaining = e["length"]
            try:
                with open(e["_path"], "rb") as fh:
                    while remaining > 0:
                        chunk = fh.read(min(CHUNK, remaining))
                        if not chunk:
                            break
                        splitter.write(chunk)
                        remaining -= len(chunk)
                        task.advance(len(chunk))
            except OSError as err:
                raise HaedError(f"cannot read {e['name']}: {_one_line(err)}") from None
            if remaining != 0:
                raise HaedError(f"{e['name']} changed size while it was being read")
        if splitter.pos != total:
            raise HaedError("the input changed while it was being read")
        for e in entries:
            del e["_path"]
        return w.finish(
            {
                "kind": "text",
                "source": source,
                "order": order,
                "split_rule": (
                    f"the stream split at its end, in order: the first {sizes[0]:,} bytes train, "
                    f"the next {sizes[1]:,} valid, the last {sizes[2]:,} test"
                ),
                "valid_fraction": valid_fraction,
                "test_fraction": test_fraction,
                "files": entries,
            }
        )


def prepare_text(
    paths: Iterable[str | os.PathLike],
    out,
    *,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    force: bool = False,
    progress=None,
) -> dict:
    """Concatenate files and folders (in :data:`TEXT_ORDER_RULE` order) and split the stream at its end."""
    check_fractions(valid_fraction, test_fraction)
    out = check_output_dir(out, force)
    paths = [Path(p) for p in paths]
    files = collect_text_files(paths, exclude=out)
    source = {
        "type": "text",
        "description": f"{len(files):,} file{'s' if len(files) != 1 else ''} from "
        f"{', '.join(p.as_posix() for p in paths)}",
        "paths": [p.as_posix() for p in paths],
    }
    return _prepare_files(
        files,
        out,
        valid_fraction=valid_fraction,
        test_fraction=test_fraction,
        source=source,
        order=TEXT_ORDER_RULE,
        force=force,
        progress=progress,
    )


# --------------------------------------------------------------------------------------------
# the offline default corpus: the Python standard library's own source


STDLIB_DEFAULT_MAX_BYTES = 4_000_000
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
STDLIB_ORDER_RULE = (
    "every .py file below the standard library folder, sorted by relative path (POSIX form, code point "
    "order), skipping folders named " + ", ".join(sorted(STDLIB_SKIP_DIRS)) + " and names that start with '.'; "
    "concatenated with nothing in between and cut at max_bytes"
)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[tuple[Path, str]]:
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise HaedError(f"the Python standard library folder {root} does not exist on this machine")
    files = walk_files(root, keep=lambda n: n.endswith(".py"), skip_dirs=STDLIB_SKIP_DIRS)
    if not files:
        raise HaedError(f"no .py files found in the standard library folder {root} (is this a Python without sources?)")
    return files


def prepare_stdlib(
    out,
    *,
    max_bytes: int | None = STDLIB_DEFAULT_MAX_BYTES,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    force: bool = False,
    progress=None,
) -> dict:
    """The offline default corpus: this Python's standard-library ``.py`` sources, needing no download.

    ``max_bytes`` caps the corpus (the first ``max_bytes`` bytes of the concatenation; ``None`` or
    0: no cap). The content depends on the Python version, which meta.json records.
    """
    check_fractions(valid_fraction, test_fraction)
    if max_bytes is not None and max_bytes < 0:
        raise HaedError(f"--max-bytes must be 0 (no cap) or positive (got {max_bytes})")
    max_bytes = max_bytes or None
    out = check_output_dir(out, force)
    root = stdlib_root()
    files = stdlib_files(root)
    ver = ".".join(map(str, sys.version_info[:3]))
    source = {
        "type": "stdlib",
        "description": f"Python {ver} standard library .py sources"
        + (f", first {max_bytes:,} bytes" if max_bytes else ", all of them"),
        "root": root.as_posix(),
        "python_version": ver,
        "max_bytes": max_bytes,
    }
    return _prepare_files(
        files,
        out,
        valid_fraction=valid_fraction,
        test_fraction=test_fraction,
        source=source,
        order=STDLIB_ORDER_RULE,
        force=force,
        progress=progress,
        max_bytes=max_bytes,
    )
