"""Where a prepare command's files come from: files, folders and `.tar` archives, filtered by patterns.

Users keep large corpora as folders or archives (a Debian source package is a `.tar.xz`; a music
collection a folder of Ogg files). :class:`Sources` lists the files of every path given, in a
documented order, keeps those that match the `--include` patterns and none of the `--exclude`
ones, and reads them in that order. An archive is read from start to end (one pass to list it, one
to read it), never seeked back and forth, so a compressed archive costs two decompressions.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import io
import lzma
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from haed.data import _one_line
from haed.errors import HaedError
from haed.prepare.common import walk_files

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ORDER_RULE = (
    "paths in the order given; a folder contributes every file below it (recursively), sorted by path "
    "relative to the folder (POSIX form, code point order), skipping names that start with '.'; an archive "
    "(.tar, .tar.gz, .tar.bz2, .tar.xz) contributes its regular files in the order they are stored in it"
)
PATTERN_RULE = (
    "shell-style patterns (fnmatch, case-sensitive) matched against each file's path inside its folder or "
    "archive; '*' also matches '/'. A file is kept if it matches an --include pattern (or none are given) "
    "and no --exclude pattern"
)


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass
class SourceFile:
    """One input file: `name` is its path inside the folder or archive it came from (what patterns and
    split rules see); `label` names it for people and meta.json (`folder/name`, `archive:name`)."""

    name: str
    label: str
    size: int
    container: Path | None  # the archive holding it, or None for a file on disk
    path: Path | None = None  # the file on disk (None inside an archive)


def selected(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    base = name.rsplit("/", 1)[-1]
    kept = not include or any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(base, p) for p in include)
    return kept and not any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(base, p) for p in exclude)


class Sources:
    """The files of `paths` (files, folders, archives) that pass the patterns and `keep`, in order.

    `keep(name)` is a second filter of the caller's (audio keeps audio suffixes); `outside` is a folder
    whose files are never read (the output directory, when it lies inside an input folder).
    """

    def __init__(
        self,
        paths: Iterable[str | os.PathLike],
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
        keep: Callable[[str], bool] = lambda name: True,
        outside: Path | None = None,
        what: str = "files",
    ):
        self.paths = [Path(p) for p in paths]
        self.include, self.exclude = tuple(include), tuple(exclude)
        if not self.paths:
            raise HaedError("give at least one file, folder or archive")
        outside = outside.resolve() if outside is not None else None
        self.files: list[SourceFile] = []
        for p in self.paths:
            found = self._list(p, keep, outside)
            if not found:
                kind = "folder" if p.is_dir() else "archive" if is_archive(p) else "file"
                raise HaedError(f"{kind} {p} contains no {what}{self._filter_note()}")
            self.files.extend(found)

    @classmethod
    def from_files(cls, files: list[SourceFile]) -> "Sources":
        """Files listed by the caller (the stdlib corpus walks its own folder)."""
        sources = cls.__new__(cls)
        sources.paths, sources.include, sources.exclude, sources.files = [], (), (), list(files)
        return sources

    def _filter_note(self) -> str:
        notes = [f"match --include {' '.join(self.include)}"] if self.include else []
        notes += [f"escape --exclude {' '.join(self.exclude)}"] if self.exclude else []
        return f" that {' and '.join(notes)}" if notes else ""

    def _list(self, p: Path, keep, outside) -> list[SourceFile]:
        if not p.exists():
            raise HaedError(f"no such file or folder: {p}")
        if p.is_dir():
            inside = walk_files(p)
            if outside is not None:
                inside = [(f, n) for f, n in inside if outside not in f.resolve().parents]
            prefix = p.as_posix().rstrip("/")
            return [
                SourceFile(n, f"{prefix}/{n}", f.stat().st_size, None, f)
                for f, n in inside
                if keep(n) and selected(n, self.include, self.exclude)
            ]
        if is_archive(p):
            return [
                SourceFile(_member_name(m), f"{p.as_posix()}:{_member_name(m)}", m.size, p)
                for m in _archive_members(p)
                if keep(_member_name(m)) and selected(_member_name(m), self.include, self.exclude)
            ]
        if p.is_file():
            name = p.name
            if keep(name) and selected(name, self.include, self.exclude):
                return [SourceFile(name, p.as_posix(), p.stat().st_size, None, p)]
            return []
        raise HaedError(f"{p} is neither a file nor a folder")

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> str:
        n = len(self.files)
        filters = "".join(f" --include {p}" for p in self.include) + "".join(f" --exclude {p}" for p in self.exclude)
        return f"{n:,} file{'s' if n != 1 else ''} from {', '.join(p.as_posix() for p in self.paths)}" + (
            f" ({filters.strip()})" if filters else ""
        )

    def meta(self) -> dict:
        return {
            "paths": [p.as_posix() for p in self.paths],
            "include": list(self.include),
            "exclude": list(self.exclude),
            "order": ORDER_RULE,
            "patterns": PATTERN_RULE,
        }

    def open_each(self, files: list[SourceFile] | None = None) -> Iterator[tuple[SourceFile, io.BufferedIOBase]]:
        """(file, open binary stream) for each of `files` (default: all), in order; archives are read in
        one forward pass. A stream is valid until the next one is yielded."""
        wanted = self.files if files is None else files
        i = 0
        while i < len(wanted):
            f = wanted[i]
            if f.container is None:
                try:
                    fh = open(f.path, "rb")
                except OSError as e:
                    raise HaedError(f"cannot read {f.label}: {_one_line(e)}") from None
                with fh:
                    yield f, fh
                i += 1
                continue
            group = [f]  # the run of consecutive files from the same archive: one pass over it
            while i + len(group) < len(wanted) and wanted[i + len(group)].container == f.container:
                group.append(wanted[i + len(group)])
            yield from _read_archive(f.container, group)
            i += len(group)


def _member_name(member: tarfile.TarInfo) -> str:
    """A member's path without the leading './' of archives made with `tar -C DIR -cf X .`."""
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    return name


def _open_archive(path: Path):
    """The archive as a tar stream. Compressed archives are read through the decompressors' own file
    objects, which raise on a stream cut short (tarfile's stream mode would end quietly at a header)."""
    name = path.name.lower()
    for suffixes, opener in (((".xz", ".txz"), lzma.open), ((".gz", ".tgz"), gzip.open), ((".bz2", ".tbz2"), bz2.open)):
        if name.endswith(suffixes):
            return tarfile.open(fileobj=opener(path, "rb"), mode="r|")
    return tarfile.open(path, "r|")


def _archive_members(path: Path) -> list[tarfile.TarInfo]:
    try:
        with _open_archive(path) as tar:
            members = [m for m in tar if m.isreg()]
            # tarfile stops at the archive's first end block: read what follows (the padding, and a
            # compressed stream's index and footer) so that a stream cut there is refused as well.
            while tar.fileobj.read(1 << 20):
                pass
            return members
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError) as e:
        raise HaedError(f"cannot read the archive {path}: {_one_line(e)}") from None


def _read_archive(path: Path, group: list[SourceFile]) -> Iterator[tuple[SourceFile, io.BufferedIOBase]]:
    by_name = {}
    for f in group:
        by_name.setdefault(f.name, []).append(f)
    found = 0
    try:
        with _open_archive(path) as tar:
            for member in tar:
                todo = by_name.get(_member_name(member))
                if not todo or not member.isreg():
                    continue
                fh = tar.extractfile(member)
                if fh is None:
                    continue
                found += 1
                yield todo.pop(0), fh
                if found == len(group):
                    return
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError) as e:
        raise HaedError(f"cannot read the archive {path}: {_one_line(e)}") from None
    if found != len(group):
        raise HaedError(f"the archive {path} changed while it was being read")
