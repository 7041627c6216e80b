"""Large corpora as users keep them: `.tar.*` archives, folders filtered by patterns, Ogg audio, a split by
file recorded in meta.json, `--max-bytes`; and their bad inputs (one line, exit 1, nothing written)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from haed.data import SPLITS, open_dataset
from haed.prepare import hash_split


@pytest.fixture
def source_tree(tmp_path):
    """A small source tree: C files and headers in nested folders, and files the filters must drop."""
    rng = np.random.default_rng(1)
    root = tmp_path / "linux"
    files = {}
    for i in range(60):
        ext = ".c" if i % 3 else ".h"
        body = f"/* file {i} */\nint f{i}(void) {{ return {i}; }}\n".encode() * int(rng.integers(5, 40))
        files[f"drivers/d{i % 7}/m{i:02d}{ext}"] = body
    files["Documentation/readme.txt"] = b"not C\n" * 100
    files["scripts/build.py"] = b"print('not C')\n" * 50
    files["drivers/d1/generated.c.orig"] = b"backup\n" * 10
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root, files


def make_tar_xz(root, dest, prefix="linux-source-6.1"):
    """The tree as a .tar.xz, members in sorted order under `prefix/` (as a source package stores them)."""
    with tarfile.open(dest, "w:xz") as tar:
        for p in sorted(q for q in root.rglob("*") if q.is_file()):
            tar.add(p, arcname=f"{prefix}/{p.relative_to(root).as_posix()}")
    return dest


def split_files(meta, split):
    return sorted((f for f in meta["files"] if f["split"] == split), key=lambda f: f["offset"])


def test_tar_xz_with_include_filters_split_by_file(source_tree, tmp_path, prepare_cli):
    root, files = source_tree
    archive = make_tar_xz(root, tmp_path / "linux-source-6.1.tar.xz")
    out = tmp_path / "code"
    r = prepare_cli(
        "text", archive, "--include", "*.c", "--include", "*.h", "--split-rule", "hash",
        "--valid-fraction", "0.1", "--test-fraction", "0.1", "--out", out,
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    ds = open_dataset(out)
    meta = ds.meta
    kept = sorted(n for n in files if n.endswith((".c", ".h")))
    names = [f["name"].split(":", 1)[1].split("/", 1)[1] for f in meta["files"]]
    assert sorted(names) == kept  # every C file and header, nothing else (not .c.orig, .txt, .py)
    assert names == kept  # in the order the archive stores them
    assert meta["split_by"] == "file" and "sha256" in meta["split_rule"]
    assert meta["source"]["include"] == ["*.c", "*.h"]
    for s in SPLITS:
        entries = split_files(meta, s)
        assert entries, s
        pos = 0
        for f in entries:  # each file whole, at its recorded offset, in the split the hash rule gives
            member = f["name"].split(":", 1)[1]
            assert f["split"] == hash_split(member, 0.1, 0.1) == s
            assert f["offset"] == pos and f["length"] == len(files[member.split("/", 1)[1]])
            assert bytes(ds.split(s)[pos : pos + f["length"]]) == files[member.split("/", 1)[1]]
            pos += f["length"]
        assert pos == len(ds.split(s))


def test_folder_with_include_and_exclude_equals_the_archive_stream(source_tree, tmp_path, prepare_cli):
    root, files = source_tree
    archive = make_tar_xz(root, tmp_path / "src.tar.xz", prefix=".")
    args = ("--include", "*.c", "--exclude", "drivers/d3/*")
    r1 = prepare_cli("text", root, *args, "--out", tmp_path / "a")
    r2 = prepare_cli("text", archive, *args, "--out", tmp_path / "b")
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.stderr + r2.stderr
    a, b = open_dataset(tmp_path / "a"), open_dataset(tmp_path / "b")
    expected = b"".join(files[n] for n in sorted(files) if n.endswith(".c") and not n.startswith("drivers/d3/"))
    for ds in (a, b):  # the stream rule: the sorted concatenation, cut at its end
        assert b"".join(bytes(ds.split(s)) for s in SPLITS) == expected
        assert ds.meta["split_by"] == "position"
    assert a.meta["splits"] == b.meta["splits"]


def test_max_bytes_cuts_the_last_file(source_tree, tmp_path, prepare_cli):
    root, files = source_tree
    out = tmp_path / "capped"
    r = prepare_cli("text", root, "--include", "*.c", "--max-bytes", "20000", "--out", out)
    assert r.exit_code == 0, r.stderr
    ds = open_dataset(out)
    assert ds.meta["total_bytes"] == 20000 and ds.meta["max_bytes"] == 20000
    last = ds.meta["files"][-1]
    assert last["truncated_from"] > last["length"]
    expected = b"".join(files[n] for n in sorted(files) if n.endswith(".c"))[:20000]
    assert b"".join(bytes(ds.split(s)) for s in SPLITS) == expected


def test_plain_progress_lines_when_output_is_piped(source_tree, tmp_path, prepare_cli):
    root, _ = source_tree
    r = prepare_cli("text", root, "--include", "*.c", "--out", tmp_path / "p")
    assert r.exit_code == 0
    assert "reading text:" in r.stdout and "(100%)" in r.stdout


def test_archive_and_filter_bad_inputs(source_tree, tmp_path, prepare_cli, assert_clean_failure):
    root, _ = source_tree
    archive = make_tar_xz(root, tmp_path / "src.tar.xz")
    out = tmp_path / "out" / "ds"
    assert_clean_failure(
        prepare_cli("text", archive, "--include", "*.rs", "--out", out), out, "contains no files", "--include *.rs"
    )
    assert_clean_failure(prepare_cli("text", root, "--include", "*.zig", "--out", out), out, "--include *.zig")
    broken = tmp_path / "broken.tar.xz"
    broken.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    assert_clean_failure(prepare_cli("text", broken, "--out", out), out, "cannot read the archive")
    # Cut anywhere (at a member's header too, where tarfile's own stream mode would end quietly), refused.
    from haed.errors import HaedError
    from haed.prepare import Sources

    whole = archive.read_bytes()
    for cut in range(100, len(whole), max(1, len(whole) // 37)):
        broken.write_bytes(whole[:cut])
        with pytest.raises(HaedError, match="cannot read the archive"):
            Sources([broken])
    assert_clean_failure(
        prepare_cli("text", root, "--split-rule", "bytes", "--out", out), out, "--split-rule", "stream, hash"
    )
    assert_clean_failure(prepare_cli("text", root, "--max-bytes", "-5", "--out", out), out, "--max-bytes")
    few = tmp_path / "few"
    few.mkdir()
    (few / "only.c").write_bytes(b"int x;\n" * 100)
    assert_clean_failure(prepare_cli("text", few, "--split-rule", "hash", "--out", out), out, "none of the 1")


# --------------------------------------------------------------------------------------------
# audio: Ogg Vorbis through soundfile, a folder filtered, an archive, --max-bytes


FRACTIONS = ("--valid-fraction", "0.2", "--test-fraction", "0.2")


def _tone(seconds: float, rate: int, freq: float, channels: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.3 * np.sin(2 * np.pi * freq * t)
    return np.stack([mono, 0.5 * mono][:channels], axis=1).astype(np.float32)


@pytest.fixture
def ogg_folder(tmp_path):
    sf = pytest.importorskip("soundfile")
    pytest.importorskip("soxr")
    d = tmp_path / "music"
    (d / "core").mkdir(parents=True)
    for i in range(24):
        sf.write(d / "core" / f"track_{i:02d}.ogg", _tone(0.5, 44100, 220 + 20 * i, 2), 44100, format="OGG")
    (d / "core" / "cover.wav").write_bytes(b"")  # not matched by --include '*.ogg'
    (d / "core" / "notes.txt").write_text("not audio")
    return d


def test_ogg_folder_mono_resampled_split_by_file(ogg_folder, tmp_path, prepare_cli):
    out = tmp_path / "music-16k"
    r = prepare_cli(
        "audio", ogg_folder, "--include", "*.ogg", "--sample-rate", "16000",
        "--valid-fraction", "0.2", "--test-fraction", "0.2", "--out", out,
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    ds = open_dataset(out)
    meta = ds.meta
    assert len(meta["files"]) == 24 and meta["split_by"] == "file"
    assert meta["source"]["include"] == ["*.ogg"]
    for f in meta["files"]:
        assert f["source_sample_rate"] == 44100 and f["source_channels"] == 2
        assert f["length"] == pytest.approx(8000, abs=2)  # half a second at 16 kHz
        assert f["split"] == hash_split(f["name"], 0.2, 0.2)
    assert all(meta["file_counts"][s] > 0 for s in SPLITS)
    assert sum(meta["seconds"].values()) == pytest.approx(12.0, abs=0.01)


def test_audio_from_an_archive_with_max_bytes(ogg_folder, tmp_path, prepare_cli):
    archive = tmp_path / "music.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for p in sorted((ogg_folder / "core").glob("*.ogg")):
            tar.add(p, arcname=f"music/{p.name}")
    out = tmp_path / "capped"
    r = prepare_cli(
        "audio", archive, "--sample-rate", "8000", "--max-bytes", "60000",
        "--valid-fraction", "0.25", "--test-fraction", "0.25", "--out", out,
    )  # fmt: skip
    assert r.exit_code == 0, r.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["total_bytes"] == 60000
    assert len(meta["files"]) == 15  # 4,000 samples each at 8 kHz
    assert [f["name"] for f in meta["files"]] == [f"music/track_{i:02d}.ogg" for i in range(15)]


def test_unreadable_ogg_is_one_line(ogg_folder, tmp_path, prepare_cli, assert_clean_failure):
    (ogg_folder / "core" / "track_05.ogg").write_bytes(b"OggS" + bytes(200))
    out = tmp_path / "bad"
    line = assert_clean_failure(
        prepare_cli("audio", ogg_folder, "--include", "*.ogg", "--sample-rate", "16000", *FRACTIONS, "--out", out),
        out,
        "track_05.ogg",
        "--skip-bad",
    )
    assert "cannot read audio file" in line
    none = tmp_path / "none"
    assert_clean_failure(
        prepare_cli("audio", ogg_folder, "--include", "*.flac", "--sample-rate", "16000", "--out", none),
        none,
        "contains no audio files",
    )


def test_archive_member_bytes_decode_like_the_file(ogg_folder):
    """Audio read from an archive member's bytes equals the same file read from disk."""
    from haed.audio import read_audio_info

    path = ogg_folder / "core" / "track_03.ogg"
    a = read_audio_info(path, 16000)[0]
    b = read_audio_info(io.BytesIO(path.read_bytes()).getvalue(), 16000)[0]
    np.testing.assert_array_equal(a, b)
