"""The dataset format: opening, memmapped splits, random windows, atomic writing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from haed.data import SPLITS, DatasetWriter, check_output_dir, open_dataset, random_windows
from haed.errors import HaedError


def make_dataset(out, parts=(b"hello world, train", b"valid!", b"test?"), kind="text", **extra):
    with DatasetWriter(out) as w:
        for s, b in zip(SPLITS, parts):
            w.write(s, b)
        return w.finish({"kind": kind, "source": {"type": "test", "description": "unit test"}, **extra})


def test_writer_and_open_dataset(tmp_path):
    out = tmp_path / "nested" / "ds"
    meta = make_dataset(out)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.bin", "train.bin", "valid.bin"]
    assert [p.name for p in (tmp_path / "nested").iterdir()] == ["ds"]  # no temporary sibling left
    ds = open_dataset(out)
    assert ds.kind == "text" and ds.sample_rate is None and ds.path == out
    assert ds.meta == meta == json.loads((out / "meta.json").read_text())
    tr = ds.split("train")
    assert isinstance(tr, np.memmap) and tr.dtype == np.uint8
    assert bytes(tr) == b"hello world, train"
    assert bytes(ds.split("valid")) == b"valid!" and bytes(ds.split("test")) == b"test?"
    import hashlib

    assert meta["splits"]["valid"] == {"bytes": 6, "sha256": hashlib.sha256(b"valid!").hexdigest()}
    assert meta["total_bytes"] == 18 + 6 + 5
    assert meta["created_by"].startswith("haed ")
    with pytest.raises(HaedError, match="unknown split"):
        ds.split("validation")


def test_audio_dataset_sample_rate(tmp_path):
    make_dataset(tmp_path / "a", kind="audio", sample_rate=8000, encoding="mu-law-8")
    ds = open_dataset(tmp_path / "a")
    assert ds.kind == "audio" and ds.sample_rate == 8000


def test_open_dataset_errors(tmp_path):
    with pytest.raises(HaedError, match="dataset not found"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HaedError, match="no meta.json"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(HaedError, match="not a dataset directory"):
        open_dataset(tmp_path / "file")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "meta.json").write_text("{not json")
    with pytest.raises(HaedError, match="cannot be read as JSON"):
        open_dataset(tmp_path / "badjson")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "meta.json").write_text('{"kind": "text"}')
    with pytest.raises(HaedError, match="not a haed dataset"):
        open_dataset(tmp_path / "other")


def test_truncated_split_detected(tmp_path):
    make_dataset(tmp_path / "ds")
    with open(tmp_path / "ds" / "train.bin", "r+b") as f:
        f.truncate(3)
    with pytest.raises(HaedError, match="meta.json says"):
        open_dataset(tmp_path / "ds").split("train")
    (tmp_path / "ds" / "test.bin").unlink()
    with pytest.raises(HaedError, match="no test.bin"):
        open_dataset(tmp_path / "ds").split("test")


def test_writer_failure_leaves_nothing(tmp_path):
    out = tmp_path / "a" / "b" / "ds"
    with pytest.raises(RuntimeError):
        with DatasetWriter(out) as w:
            w.write("train", b"x" * 100)
            raise RuntimeError("boom")
    assert not out.exists() and not (tmp_path / "a").exists()  # created parents removed too
    with pytest.raises(HaedError, match="valid split would be empty"):
        with DatasetWriter(out) as w:
            w.write("train", b"x")
            w.write("test", b"x")
            w.finish({"kind": "text", "source": {}})
    assert list(tmp_path.iterdir()) == []


def test_output_dir_policy(tmp_path):
    out = tmp_path / "ds"
    make_dataset(out)
    with pytest.raises(HaedError, match="already exists.*--force"):
        make_dataset(out)
    # the refused call did not replace it; force does
    assert bytes(open_dataset(out).split("train")) == b"hello world, train"
    with DatasetWriter(out, force=True) as w:
        for s in SPLITS:
            w.write(s, b"new " + s.encode())
        w.finish({"kind": "text", "source": {}})
    assert bytes(open_dataset(out).split("valid")) == b"new valid"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    # never replace something that is not a haed dataset, even with force
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(HaedError, match="not a haed dataset"):
        check_output_dir(other, force=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(HaedError, match="not a directory"):
        check_output_dir(tmp_path / "afile", force=True)
    (tmp_path / "emptydir").mkdir()
    check_output_dir(tmp_path / "emptydir", force=True)


def test_random_windows_shape_dtype_bounds():
    n, seq = 200, 16
    data = np.arange(n, dtype=np.uint8)
    rng = np.random.default_rng(0)
    w = random_windows(data, 64, seq, rng)
    assert w.shape == (64, seq) and w.dtype == np.uint8
    assert np.all(np.diff(w.astype(int), axis=1) == 1)  # contiguous windows
    assert w[:, 0].min() >= 0 and w[:, -1].max() <= n - 1
    # every start offset 0 .. n - seq is reachable, nothing beyond
    small = np.arange(20, dtype=np.uint8)
    starts = random_windows(small, 4000, 5, np.random.default_rng(1))[:, 0]
    assert set(starts.tolist()) == set(range(16))
    # a window exactly the size of the split is fine; longer is an error
    assert random_windows(small, 2, 20, rng).tolist() == [list(range(20))] * 2
    with pytest.raises(HaedError, match="fewer than one window"):
        random_windows(small, 2, 21, rng)
    with pytest.raises(HaedError):
        random_windows(small, 0, 5, rng)


def test_random_windows_on_memmap_is_deterministic(tmp_path):
    make_dataset(tmp_path / "ds", parts=(bytes(range(256)) * 40, b"v" * 10, b"t" * 10))
    tr = open_dataset(tmp_path / "ds").split("train")
    a = random_windows(tr, 8, 100, np.random.default_rng(42))
    b = random_windows(tr, 8, 100, np.random.default_rng(42))
    assert type(a) is np.ndarray and np.array_equal(a, b)
    for row in a:
        start = int(row[0])
        assert bytes(row) == (bytes(range(256)) * 2)[start : start + 100]
