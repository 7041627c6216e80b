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

from haed.data import SPLITS, DatasetWriter, _one_line, check_output_dir
from haed.errors import HaedError
from haed.prepare.common import (
    CHUNK,
    HASH_SPLIT_RULE,
    ProgressTask,
    StreamSplitter,
    check_fractions,
    hash_split,
    split_sizes,
    walk_files,
)
from haed.prepare.sources import ORDER_RULE, SourceFile, Sources

TEXT_ORDER_RULE = ORDER_RULE + "; files are concatenated with nothing in between"
TEXT_SPLIT_RULES = ("stream", "hash")


def _take(files: list[SourceFile], max_bytes: int | None) -> list[tuple[SourceFile, int]]:
    """(file, bytes taken) in order until `max_bytes` (None: all); the file that crosses the cap is cut."""
    taken, total = [], 0
    for f in files:
        if max_bytes is not None and total >= max_bytes:
            break
        n = f.size if max_bytes is None else min(f.size, max_bytes - total)
        taken.append((f, n))
        total += n
    return taken


def _split_of_files(
    taken: list[tuple[SourceFile, int]], rule: str, valid_fraction: float, test_fraction: float
) -> tuple[list[str] | None, tuple[int, int, int] | None, str]:
    """(each file's split under the hash rule, or the split sizes under the stream rule, which splits by
    position; the rule as meta.json states it)."""
    total = sum(n for _, n in taken)
    if total == 0:
        raise HaedError("the input files are all empty (0 bytes)")
    if rule == "stream":
        sizes = split_sizes(total, valid_fraction, test_fraction)
        return (
            None,
            sizes,
            (
                f"the stream split at its end, in order: the first {sizes[0]:,} bytes train, "
                f"the next {sizes[1]:,} valid, the last {sizes[2]:,} test"
            ),
        )
    splits = [hash_split(f.name, valid_fraction, test_fraction) for f, _ in taken]
    for s in SPLITS:
        if not any(n for (_, n), split in zip(taken, splits) if split == s):
            raise HaedError(
                f"--split-rule hash puts none of the {len(taken):,} non-empty files in the {s} split; "
                "use more files or a larger --valid-fraction/--test-fraction"
            )
    return splits, None, HASH_SPLIT_RULE


def _prepare_files(
    sources: Sources,
    out,
    *,
    valid_fraction: float,
    test_fraction: float,
    source: dict,
    order: str,
    force: bool,
    progress,
    max_bytes: int | None = None,
    split_rule: str = "stream",
) -> dict:
    taken = _take(sources.files, max_bytes)
    splits, sizes, rule_text = _split_of_files(taken, split_rule, valid_fraction, test_fraction)
    total = sum(n for _, n in taken)
    entries = []
    with DatasetWriter(out, force=force) as w:
        w.expect(total)
        splitter = StreamSplitter(w, sizes) if splits is None else None
        task = ProgressTask(progress, "reading text", total)
        for i, (f, fh) in enumerate(sources.open_each([f for f, _ in taken])):
            split, length = (splits[i] if splits is not None else None), taken[i][1]
            entry = {"name": f.label, **({"split": split} if split else {})}
            entry.update(offset=w.bytes_written(split) if split else splitter.pos, length=length)
            write = splitter.write if split is None else (lambda b, s=split: w.write(s, b))
            remaining = length
            while remaining > 0:
                chunk = _read(fh, min(CHUNK, remaining), f.label)
                if not chunk:
                    raise HaedError(f"{f.label} changed size while it was being read")
                write(chunk)
                remaining -= len(chunk)
                task.advance(len(chunk))
            if length < f.size:
                entry["truncated_from"] = f.size
            entries.append(entry)
        return w.finish(
            {
                "kind": "text",
                "source": source,
                "order": order,
                "split_rule": rule_text,
                "split_by": "file" if splits is not None else "position",
                "valid_fraction": valid_fraction,
                "test_fraction": test_fraction,
                "max_bytes": max_bytes,
                "files": entries,
            }
        )


def _read(fh, n: int, label: str) -> bytes:
    try:
        return fh.read(n)
    except (OSError, EOFError) as err:
        raise HaedError(f"cannot read {label}: {_one_line(err)}") from None


def prepare_text(
    paths: Iterable[str | os.PathLike],
    out,
    *,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    split_rule: str = "stream",
    max_bytes: int | None = None,
    force: bool = False,
    progress=None,
) -> dict:
    """Concatenate files, folders and .tar archives (in :data:`TEXT_ORDER_RULE` order, filtered by the
    `include` / `exclude` patterns), cut at `max_bytes` (None or 0: all), and split the stream at its end
    (`split_rule="stream"`) or each whole file by a hash of its name (`"hash"`: no file is cut in two)."""
    check_fractions(valid_fraction, test_fraction)
    if max_bytes is not None and max_bytes < 0:
        raise HaedError(f"--max-bytes must be 0 (no cap) or positive (got {max_bytes})")
    if split_rule not in TEXT_SPLIT_RULES:
        raise HaedError(f"unknown --split-rule {split_rule!r}: choose {', '.join(TEXT_SPLIT_RULES)}")
    out = check_output_dir(out, force)
    sources = Sources(paths, include, exclude, outside=out)
    source = {"type": "text", "description": sources.describe(), **sources.meta()}
    return _prepare_files(
        sources,
        out,
        valid_fraction=valid_fraction,
        test_fraction=test_fraction,
        source=source,
        order=TEXT_ORDER_RULE,
        force=force,
        progress=progress,
        max_bytes=max_bytes or None,
        split_rule=split_rule,
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
    files = Sources.from_files([SourceFile(n, n, p.stat().st_size, None, p) for p, n in stdlib_files(root)])
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
