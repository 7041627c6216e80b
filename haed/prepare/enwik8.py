"""`haed prepare enwik8`: the first 10^8 bytes of an English Wikipedia dump, split 90M / 5M / 5M in order."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

from haed.data import DatasetWriter, _one_line, check_output_dir
from haed.errors import HaedError
from haed.prepare.common import CHUNK, ProgressTask, StreamSplitter, download

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_BYTES = 100_000_000
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)


def _enwik8_url() -> str:
    return os.environ.get("HAED_ENWIK8_URL", ENWIK8_URL)


def _refuse_length(name: str, n: int) -> HaedError:
    return HaedError(f"{name} has {n:,} bytes; enwik8 must be exactly {ENWIK8_BYTES:,} bytes, refusing it")


def _open_enwik8_source(source: Path):
    """(readable binary stream, the open zip file or None, description) of a zip or an extracted enwik8 file."""
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
        w.expect(ENWIK8_BYTES)
        if source is None:
            url = _enwik8_url()
            zpath = w.tmp / "enwik8.zip.download"
            try:
                download(url, zpath, progress, what="enwik8.zip")
            except HaedError as e:
                raise HaedError(
                    f"{e}; with no network, get enwik8.zip elsewhere and pass --source PATH (the zip or the "
                    "extracted enwik8)"
                ) from None
            origin = url
            stream, z, desc = _open_enwik8_source(zpath)
        else:
            origin = str(source)
            stream, z, desc = _open_enwik8_source(source)
        sha = hashlib.sha256()
        splitter = StreamSplitter(w, ENWIK8_SPLIT)
        task = ProgressTask(progress, "splitting enwik8", ENWIK8_BYTES)
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
                "split_rule": "in order: bytes [0, 90,000,000) train, [90,000,000, 95,000,000) valid, [95,000,000, "
                "100,000,000) test",
            }
        )
