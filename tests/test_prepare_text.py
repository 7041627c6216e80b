"""`haed prepare text` and `haed prepare stdlib`: order, exact round trip, split sizes, meta.json."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from haed.data import SPLITS, open_dataset
from haed.prepare import STDLIB_SKIP_DIRS, prepare_stdlib, prepare_text, stdlib_files


def joined(out) -> bytes:
    ds = open_dataset(out)
    return b"".join(bytes(ds.split(s)) for s in SPLITS)


@pytest.fixture
def tree(tmp_path):
    """A small folder tree with binary content, nested folders, unicode names and hidden entries."""
    rng = np.random.default_rng(0)
    root = tmp_path / "corpus"
    files = {
        "b.txt": "zwei\n".encode() * 300,
        "a.txt": "héllo wörld\n".encode() * 500,
        "sub/z.bin": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "sub/deeper/é.txt": "ünïcode name\n".encode() * 100,
        "sub.txt": b"between sub/ and sub.txt in code point order\n" * 50,
        "empty.txt": b"",
        ".hidden.txt": b"SKIPPED",
        ".git/objects/x": b"SKIPPED",
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    order = ["a.txt", "b.txt", "empty.txt", "sub.txt", "sub/deeper/é.txt", "sub/z.bin"]
    return root, files, order


def test_text_round_trip_is_exact(tree, tmp_path, prepare_cli):
    root, files, order = tree
    extra = tmp_path / "extra.txt"
    extra.write_bytes(b"a single file given after the folder\n" * 20)
    out = tmp_path / "ds"
    r = prepare_cli("text", root, extra, "--out", out, "--valid-fraction", "0.1", "--test-fraction", "0.2")
    assert r.exit_code == 0, r.stderr
    expected = b"".join(files[n] for n in order) + extra.read_bytes()
    assert joined(out) == expected  # concatenating the splits gives the input back, byte for byte
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "text" and "sorted" in meta["order"]
    names = [f["name"] for f in meta["files"]]
    assert names == [f"{root.as_posix()}/{n}" for n in order] + [extra.as_posix()]
    offsets = [f["offset"] for f in meta["files"]]
    lengths = [f["length"] for f in meta["files"]]
    assert offsets == list(np.cumsum([0] + lengths[:-1]))
    for f in meta["files"]:
        assert expected[f["offset"] : f["offset"] + f["length"]] == open(f["name"], "rb").read()
    n = len(expected)
    sizes = [meta["splits"][s]["bytes"] for s in SPLITS]
    assert sizes == [n - round(n * 0.1) - round(n * 0.2), round(n * 0.1), round(n * 0.2)]
    ds = open_dataset(out)
    for s in SPLITS:
        assert meta["splits"][s]["sha256"] == hashlib.sha256(bytes(ds.split(s))).hexdigest()
    # the summary table names every split and the sha256 prefixes
    for s in SPLITS:
        assert s in r.stdout and meta["splits"][s]["sha256"][:16] in r.stdout
    assert b"SKIPPED" not in expected


def test_text_library_function_and_force(tree, tmp_path):
    root, files, order = tree
    out = tmp_path / "ds"
    m1 = prepare_text([root / "a.txt", root / "b.txt"], out)
    assert joined(out) == files["a.txt"] + files["b.txt"]
    m2 = prepare_text([root / "b.txt", root / "a.txt"], out, force=True)  # order of arguments is kept
    assert joined(out) == files["b.txt"] + files["a.txt"]
    assert m1["splits"]["test"]["sha256"] != m2["splits"]["test"]["sha256"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_stdlib_corpus_is_deterministic(tmp_path, prepare_cli):
    r = prepare_cli("stdlib", "--out", tmp_path / "a", "--max-bytes", "300000")
    assert r.exit_code == 0, r.stderr
    meta = prepare_stdlib(tmp_path / "b", max_bytes=300_000)
    assert meta["splits"] == json.loads((tmp_path / "a" / "meta.json").read_text())["splits"]
    assert meta["total_bytes"] == 300_000 and meta["source"]["type"] == "stdlib"
    data = joined(tmp_path / "b")
    files = stdlib_files()
    assert all(not (set(rel.split("/")[:-1]) & STDLIB_SKIP_DIRS) and rel.endswith(".py") for _, rel in files)
    assert [rel for _, rel in files] == sorted(rel for _, rel in files)
    expected = b"".join(p.read_bytes() for p, _ in files[: len(meta["files"])])[:300_000]
    assert data == expected
    assert meta["files"][-1]["offset"] + meta["files"][-1]["length"] == 300_000
    assert b"def " in data and b"import " in data


def test_stdlib_default_size(tmp_path):
    meta = prepare_stdlib(tmp_path / "d")
    assert meta["total_bytes"] == 4_000_000
    assert [meta["splits"][s]["bytes"] for s in SPLITS] == [3_600_000, 200_000, 200_000]
