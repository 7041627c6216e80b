"""Data preparation: enwik8, text files, the offline standard-library corpus, and raw audio.

Every function here writes one dataset directory (see :mod:`haed.data`) through
:class:`haed.data.DatasetWriter` (temporary sibling, renamed on success) and returns the
``meta.json`` it wrote. Bad input raises :class:`haed.errors.HaedError` with a one-line message
before or instead of leaving anything on disk.

``progress`` is an optional ``rich.progress.Progress`` (the CLI passes one); library callers may
leave it out.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
import sysconfig
import threading
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from haed.data import SPLITS, DatasetWriter, _one_line, check_output_dir
from haed.errors import HaedError

CHUNK = 1 << 20

# --------------------------------------------------------------------------------------------
# progress helper


class _Task:
    """A progress task that does nothing when there is no progress display."""

    def __init__(self, progress, description: str, total: float | None):
        self.progress = progress
        self.id = progress.add_task(description, total=total) if progress is not None else None

    def advance(self, n: float) -> None:
        if self.progress is not None:
            self.progress.advance(self.id, n)

    def update(self, **kw) -> None:
        if self.progress is not None:
            self.progress.update(self.id, **kw)


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
    for name, n, flag in (("valid", n_valid, "--valid-fraction"), ("test", n_test, "--test-fraction"), ("train", n_train, None)):
        if n <= 0:
            how = f"{flag} {valid_fraction if name == 'valid' else test_fraction}" if flag else "the fractions"
            raise HaedError(f"the input has {total:,} bytes: {how} leaves the {name} split empty; use more data or larger fractions")
    return n_train, n_valid, n_test


class _StreamSplitter:
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


# --------------------------------------------------------------------------------------------
# text


TEXT_ORDER_RULE = (
    "paths in the order given; a folder contributes every file below it (recursively), sorted by "
    "path relative to the folder (POSIX form, code point order), skipping names that start with '.'; "
    "files are concatenated with nothing in between"
)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_files(folder: Path, keep: Callable[[str], bool] = lambda n: True, skip_dirs: frozenset = frozenset()) -> list[tuple[Path, str]]:
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
            inside = _walk_files(p)
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
        splitter = _StreamSplitter(w, sizes)
        task = _Task(progress, "reading text", total)
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
        "description": f"{len(files):,} file{'s' if len(files) != 1 else ''} from {', '.join(p.as_posix() for p in paths)}",
        "paths": [p.as_posix() for p in paths],
    }
    return _prepare_files(
        files, out, valid_fraction=valid_fraction, test_fraction=test_fraction, source=source,
        order=TEXT_ORDER_RULE, force=force, progress=progress,
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
    files = _walk_files(root, keep=lambda n: n.endswith(".py"), skip_dirs=STDLIB_SKIP_DIRS)
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
        files, out, valid_fraction=valid_fraction, test_fraction=test_fraction, source=source,
        order=STDLIB_ORDER_RULE, force=force, progress=progress, max_bytes=max_bytes,
    )


# --------------------------------------------------------------------------------------------
# enwik8


ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_BYTES = 100_000_000
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)
NETWORK_TIMEOUT_S = 5.0


def _enwik8_url() -> str:
    return os.environ.get("HAED_ENWIK8_URL", ENWIK8_URL)


def _refuse_length(name: str, n: int) -> HaedError:
    return HaedError(f"{name} has {n:,} bytes; enwik8 must be exactly {ENWIK8_BYTES:,} bytes, refusing it")


def _resolve(host: str, port: int, timeout: float) -> None:
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
            _resolve(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80), timeout)
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            task = _Task(progress, f"downloading {what}", int(length) if length and length.isdigit() else None)
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


def _open_enwik8_source(source: Path):
    """(readable binary stream, length, description) of a zip or an extracted enwik8 file."""
    if not source.exists():
        raise HaedError(f"--source {source} does not exist")
    if source.is_dir():
        raise HaedError(f"--source {source} is a folder; give enwik8.zip or the extracted enwik8 file")
    if zipfile.is_zipfile(source):
        try:
            z = zipfile.ZipFile(source)
            members = [i for i in z.infolist() if not i.is_dir()]
        except (zipfile.BadZipFile, OSError) as e:
            raise HaedError(f"{source} is not a readable zip file: {_one_line(e)}") from None
        named = [i for i in members if Path(i.filename).name == "enwik8"]
        if named:
            info = named[0]
        elif len(members) == 1:
            info = members[0]
        else:
            z.close()
            raise HaedError(f"zip {source} holds no file named enwik8")
        if info.file_size != ENWIK8_BYTES:
            z.close()
            raise _refuse_length(f"{info.filename} in {source}", info.file_size)
        try:
            stream = z.open(info)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError) as e:
            z.close()
            raise HaedError(f"cannot read {info.filename} in {source}: {_one_line(e)}") from None
        return stream, z, f"{info.filename} in {source.name}"
    size = source.stat().st_size
    if size != ENWIK8_BYTES:
        raise _refuse_length(str(source), size)
    return open(source, "rb"), None, source.name


def prepare_enwik8(out, *, source: str | os.PathLike | None = None, force: bool = False, progress=None) -> dict:
    """enwik8 (exactly 100,000,000 bytes), split in order 90M / 5M / 5M.

    ``source``: ``enwik8.zip`` or the extracted ``enwik8``; without it the zip is downloaded
    (into the temporary output folder, removed afterwards).
    """
    out = check_output_dir(out, force)
    if source is not None:
        source = Path(source)
        _open_enwik8_source(source)[0].close()  # check before creating anything
    with DatasetWriter(out, force=force) as w:
        if source is None:
            url = _enwik8_url()
            zpath = w.tmp / "enwik8.zip.download"
            try:
                download(url, zpath, progress, what="enwik8.zip")
            except HaedError as e:
                raise HaedError(
                    f"{e}; with no network, get enwik8.zip elsewhere and pass --source PATH (the zip or the extracted enwik8)"
                ) from None
            origin = url
            stream, z, desc = _open_enwik8_source(zpath)
        else:
            origin = str(source)
            stream, z, desc = _open_enwik8_source(source)
        sha = hashlib.sha256()
        splitter = _StreamSplitter(w, ENWIK8_SPLIT)
        task = _Task(progress, "splitting enwik8", ENWIK8_BYTES)
        try:
            while True:
                try:
                    chunk = stream.read(8 * CHUNK)
                except (zipfile.BadZipFile, OSError, EOFError) as e:
                    raise HaedError(f"cannot read {desc}: {_one_line(e)}") from None
                if not chunk:
                    break
                if splitter.pos + len(chunk) > ENWIK8_BYTES:
                    raise _refuse_length(desc, splitter.pos + len(chunk))
                splitter.write(chunk)
                sha.update(chunk)
                task.advance(len(chunk))
        finally:
            stream.close()
            if z is not None:
                z.close()
        if splitter.pos != ENWIK8_BYTES:
            raise _refuse_length(desc, splitter.pos)
        if source is None:
            zpath.unlink()
        return w.finish(
            {
                "kind": "text",
                "source": {
                    "type": "enwik8",
                    "description": "enwik8: the first 10^8 bytes of an English Wikipedia XML dump (Hutter Prize)",
                    "origin": origin,
                    "bytes": ENWIK8_BYTES,
                    "sha256": sha.hexdigest(),
                },
                "split_rule": "in order: bytes [0, 90,000,000) train, [90,000,000, 95,000,000) valid, [95,000,000, 100,000,000) test",
            }
        )


# --------------------------------------------------------------------------------------------
# audio


AUDIO_EXTENSIONS = (".wav", ".flac")
ENCODE_BATCH_SAMPLES = 1 << 21
SPLIT_RULES = ("hash", "fsdd", "dataset")
FSDD_NAME = re.compile(r"^(\d+)_([^_/]+)_(\d+)$")
HF_SPLIT_NAMES = {
    "train": "train",
    "validation": "valid", "valid": "valid", "dev": "valid", "val": "valid",
    "test": "test",
}


def hash_split(name: str, valid_fraction: float, test_fraction: float) -> str:
    """The default audio split rule: u = first 8 bytes of sha256(name) / 2^64;
    u < test_fraction -> test, u < test_fraction + valid_fraction -> valid, else train."""
    u = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + valid_fraction:
        return "valid"
    return "train"


def fsdd_split(name: str) -> str:
    """Free Spoken Digit Dataset rule on ``{digit}_{speaker}_{index}.wav``: the dataset's own rule
    puts indices 0-4 in test (and 5-49 in train); haed takes indices 5-9 out of train as valid."""
    stem = Path(name).name.rsplit(".", 1)[0]
    m = FSDD_NAME.match(stem)
    if not m:
        raise HaedError(f"{name} does not look like an FSDD file name {{digit}}_{{speaker}}_{{index}}.wav (needed by --split-rule fsdd)")
    index = int(m.group(3))
    if index <= 4:
        return "test"
    if index <= 9:
        return "valid"
    return "train"


SPLIT_RULE_TEXT = {
    "hash": "by file: u = (first 8 bytes of sha256 of the file's relative path, UTF-8, as a big-endian integer) / 2^64; "
    "u < test_fraction -> test, u < test_fraction + valid_fraction -> valid, else train",
    "fsdd": "Free Spoken Digit Dataset, by file name {digit}_{speaker}_{index}: index 0-4 -> test (the dataset's own rule), "
    "index 5-9 -> valid, index 10 and up -> train",
    "dataset": "the Hugging Face dataset's own splits: train -> train; validation, valid, val, dev -> valid; test -> test",
}


def collect_audio_files(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    folder = Path(folder)
    if not folder.exists():
        raise HaedError(f"audio source not found: {folder}")
    if not folder.is_dir():
        raise HaedError(f"{folder} is not a folder; give a folder of WAV/FLAC files")
    everything = _walk_files(folder)
    if not everything and not any(folder.iterdir()):
        raise HaedError(f"folder {folder} is empty")
    files = [(p, n) for p, n in everything if p.suffix.lower() in AUDIO_EXTENSIONS]
    if not files:
        raise HaedError(f"no WAV or FLAC files found under {folder} (searched recursively)")
    return files


@dataclass
class _AudioItem:
    name: str
    split: str
    load: Callable[[], tuple]  # -> (float32 mono at the target rate, source rate, source channels)


def _hf_items(name: str, config: str | None, sample_rate: int, rule: str, valid_fraction, test_fraction) -> tuple[Iterator[_AudioItem], int, dict]:
    """Items of a Hugging Face ``datasets`` audio dataset, decoded with soundfile (never torchcodec)."""
    local = Path(name).exists()
    offline_reason = None
    if not local and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "", "false", "no") and os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ).lower() in ("0", "", "false", "no"):
        endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
        try:
            _resolve(host, port, NETWORK_TIMEOUT_S)
            socket.create_connection((host, port), timeout=NETWORK_TIMEOUT_S).close()
        except OSError as e:
            offline_reason = f"cannot reach {host} ({_one_line(e)})"
            # go offline before the first import of datasets / huggingface_hub, so the cache is used and nothing hangs
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError:
        raise HaedError("--hf needs the `datasets` package: pip install 'haed[hf]'") from None
    if offline_reason is not None:
        try:  # in case datasets was already imported in this process
            datasets.config.HF_HUB_OFFLINE = True
            datasets.config.HF_DATASETS_OFFLINE = True
        except AttributeError:
            pass
    try:
        dsd = datasets.load_dataset(name, config) if config else datasets.load_dataset(name)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "could not load"
        if offline_reason is not None:
            raise HaedError(f"{offline_reason} and the dataset {name} is not in the local cache; with no network, give a folder of WAV/FLAC files instead") from None
        raise HaedError(f"cannot load the Hugging Face dataset {name}: {_one_line(e)}") from None
    if isinstance(dsd, datasets.Dataset):
        dsd = datasets.DatasetDict({"train": dsd})
    hf_splits = list(dsd.keys())
    if rule == "dataset":
        unknown = [s for s in hf_splits if s not in HF_SPLIT_NAMES]
        if unknown:
            raise HaedError(f"dataset {name} has splits {', '.join(hf_splits)}; haed cannot place {', '.join(unknown)} (use --split-rule hash)")
        missing = [s for s in SPLITS if s not in {HF_SPLIT_NAMES[h] for h in hf_splits}]
        if missing:
            raise HaedError(f"dataset {name} has no {' or '.join(missing)} split (it has {', '.join(hf_splits)}); use --split-rule hash")
    first = dsd[hf_splits[0]]
    cols = [c for c, f in first.features.items() if isinstance(f, datasets.Audio)]
    if not cols:
        raise HaedError(f"dataset {name} has no audio column (columns: {', '.join(first.features)})")
    col = cols[0]
    total = sum(len(dsd[s]) for s in hf_splits)
    if total == 0:
        raise HaedError(f"dataset {name} has no rows")

    from haed.audio import read_audio_info

    def items() -> Iterator[_AudioItem]:
        for s in hf_splits:
            ds = dsd[s].cast_column(col, datasets.Audio(decode=False))
            for i, row in enumerate(ds):
                a = row[col] or {}
                path = a.get("path")
                item_name = f"{s}/{i:07d}" + (f":{Path(path).name}" if path else "")
                if rule == "dataset":
                    split = HF_SPLIT_NAMES[s]
                elif rule == "fsdd":
                    split = fsdd_split(Path(path).name if path else item_name)
                else:
                    split = hash_split(item_name, valid_fraction, test_fraction)
                data = a.get("bytes")
                src = data if data is not None else path
                if src is None:
                    def load(n=item_name):
                        raise HaedError(f"cannot read audio file {n}: the row holds neither bytes nor a path")
                else:
                    def load(src=src, n=item_name):
                        return read_audio_info(src, sample_rate, name=n)
                yield _AudioItem(item_name, split, load)

    source = {
        "type": "huggingface",
        "description": f"Hugging Face dataset {name}" + (f" ({config})" if config else "") + f", splits {', '.join(hf_splits)}",
        "name": name,
        "config": config,
        "audio_column": col,
        "dataset_splits": hf_splits,
    }
    return items(), total, source


def prepare_audio(
    source: str | os.PathLike | None,
    out,
    *,
    sample_rate: int,
    hf: str | None = None,
    hf_config: str | None = None,
    split_rule: str | None = None,
    valid_fraction: float | None = None,
    test_fraction: float | None = None,
    skip_bad: bool = False,
    force: bool = False,
    progress=None,
) -> dict:
    """Audio files -> mono, ``sample_rate`` (soxr), 8-bit mu-law, split by whole file.

    ``source``: a folder of WAV/FLAC files (recursive), or ``hf``: a Hugging Face datasets name.
    ``split_rule``: ``hash`` (default for folders), ``fsdd``, or ``dataset`` (default for ``hf``).
    """
    if (source is None) == (hf is None):
        raise HaedError("give either a SOURCE folder or --hf NAME (exactly one)")
    if not isinstance(sample_rate, int) or sample_rate < 1000 or sample_rate > 384_000:
        raise HaedError(f"--sample-rate must be an integer between 1000 and 384000 Hz (got {sample_rate})")
    rule = split_rule or ("dataset" if hf is not None else "hash")
    if rule not in SPLIT_RULES:
        raise HaedError(f"unknown --split-rule {rule!r}: choose {', '.join(SPLIT_RULES)}")
    if rule == "dataset" and hf is None:
        raise HaedError("--split-rule dataset needs --hf (a folder has no splits of its own; use hash or fsdd)")
    if rule != "hash" and (valid_fraction is not None or test_fraction is not None):
        raise HaedError(f"--valid-fraction and --test-fraction apply only to --split-rule hash, not {rule}")
    valid_fraction = 0.05 if valid_fraction is None else valid_fraction
    test_fraction = 0.05 if test_fraction is None else test_fraction
    if rule == "hash":
        check_fractions(valid_fraction, test_fraction)
    out = check_output_dir(out, force)
    for mod in ("soundfile", "soxr"):
        try:
            __import__(mod)
        except ImportError:
            raise HaedError(f"prepare audio needs the `{mod}` package: pip install 'haed[audio]'") from None
    from haed.audio import ENCODING, QUANTIZATION_CHANNELS, encode_to_bytes, read_audio_info

    if hf is None:
        folder = Path(source)
        files = collect_audio_files(folder)
        items_list = []
        for p, n in files:
            split = fsdd_split(n) if rule == "fsdd" else hash_split(n, valid_fraction, test_fraction)
            items_list.append(_AudioItem(n, split, lambda p=p, n=n: read_audio_info(p, sample_rate, name=n)))
        counts = {s: sum(1 for it in items_list if it.split == s) for s in SPLITS}
        empty = [s for s in SPLITS if counts[s] == 0]
        if empty:
            raise HaedError(
                f"the split rule {rule} puts none of the {len(items_list):,} files in the {' or '.join(empty)} split; "
                + ("use more files or larger fractions" if rule == "hash" else "use --split-rule hash")
            )
        items: Iterable[_AudioItem] = items_list
        total = len(items_list)
        src_meta = {"type": "audio-folder", "description": f"{total:,} WAV/FLAC files under {folder.as_posix()}", "path": folder.as_posix()}
    else:
        items, total, src_meta = _hf_items(hf, hf_config, sample_rate, rule, valid_fraction, test_fraction)

    entries = []
    skipped = []
    with DatasetWriter(out, force=force) as w:
        task = _Task(progress, "encoding audio", total)
        position = {s: 0 for s in SPLITS}
        pending: list[tuple[str, np.ndarray]] = []
        pending_samples = 0

        def flush() -> None:
            # one mu-law call for many files: far fewer (threaded) torch calls than one per file
            nonlocal pending, pending_samples
            if not pending:
                return
            codes = encode_to_bytes(np.concatenate([x for _, x in pending]))
            start = 0
            for split, x in pending:
                w.write(split, codes[start : start + len(x)])
                start += len(x)
            pending, pending_samples = [], 0

        for it in items:
            try:
                samples, src_rate, src_channels = it.load()
            except HaedError as e:
                if not skip_bad:
                    raise HaedError(f"{e} (pass --skip-bad to leave such files out)") from None
                skipped.append({"name": it.name, "error": str(e)})
                task.advance(1)
                continue
            entries.append(
                {
                    "name": it.name,
                    "split": it.split,
                    "offset": position[it.split],
                    "length": int(samples.shape[0]),
                    "source_sample_rate": src_rate,
                    "source_channels": src_channels,
                }
            )
            position[it.split] += int(samples.shape[0])
            pending.append((it.split, samples))
            pending_samples += samples.shape[0]
            if pending_samples >= ENCODE_BATCH_SAMPLES:
                flush()
            task.advance(1)
        flush()
        assert all(position[s] == w.bytes_written(s) for s in SPLITS)
        if not entries:
            raise HaedError(f"none of the {total:,} audio files could be read" + (f" (skipped {len(skipped)})" if skipped else ""))
        per_split = {s: sum(e["length"] for e in entries if e["split"] == s) for s in SPLITS}
        return w.finish(
            {
                "kind": "audio",
                "source": src_meta,
                "sample_rate": sample_rate,
                "encoding": ENCODING,
                "mu_law": {"quantization_channels": QUANTIZATION_CHANNELS, "formula": "torchaudio mu_law_encoding, input clipped to [-1, 1]"},
                "processing": "channels averaged to mono; resampled with soxr (HQ) when the rate differs; 8-bit mu-law",
                "split_rule": {"name": rule, "description": SPLIT_RULE_TEXT[rule]}
                | ({"valid_fraction": valid_fraction, "test_fraction": test_fraction} if rule == "hash" else {}),
                "seconds": {s: per_split[s] / sample_rate for s in SPLITS},
                "file_counts": {s: sum(1 for e in entries if e["split"] == s) for s in SPLITS},
                "files": entries,
                "skipped_count": len(skipped),
                "skipped": skipped,
            }
        )
