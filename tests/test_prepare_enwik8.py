"""`haed prepare enwik8` on a synthetic 100,000,000-byte source: zip, plain, download, refusals."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
import time
import zipfile

import numpy as np
import pytest

from haed.data import open_dataset


def check_split(out, data: np.ndarray):
    ds = open_dataset(out)
    assert ds.kind == "text"
    bounds = {"train": (0, 90_000_000), "valid": (90_000_000, 95_000_000), "test": (95_000_000, 100_000_000)}
    for s, (a, b) in bounds.items():
        split = ds.split(s)
        assert split.shape == (b - a,)
        assert np.array_equal(split, data[a:b]), s
        assert ds.meta["splits"][s]["sha256"] == hashlib.sha256(data[a:b]).hexdigest()
    assert ds.meta["source"]["sha256"] == hashlib.sha256(data).hexdigest()
    return ds


@pytest.mark.parametrize("kind", ["zip", "plain"])
def test_enwik8_split_90_5_5(kind, synthetic_enwik8, tmp_path, prepare_cli):
    out = tmp_path / "enwik8"
    r = prepare_cli("enwik8", "--source", synthetic_enwik8[kind], "--out", out)
    assert r.exit_code == 0, r.stderr
    check_split(out, synthetic_enwik8["data"])
    assert "90,000,000" in r.stdout and "5,000,000" in r.stdout
    shutil.rmtree(out)  # 100 MB: don't keep it in pytest's temporary folders


def test_enwik8_refuses_other_lengths(tmp_path, prepare_cli, assert_clean_failure):
    for n in (99_999_999, 100_000_001, 1000):
        plain = tmp_path / f"plain{n}"
        with open(plain, "wb") as f:  # sparse: instant whatever its length
            f.truncate(n)
        out = tmp_path / f"out{n}"
        line = assert_clean_failure(
            prepare_cli("enwik8", "--source", plain, "--out", out), out, f"{n:,} bytes", "exactly 100,000,000"
        )
    zpath = tmp_path / "short.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("enwik8", b"<mediawiki>" * 1000)
    out = tmp_path / "out-zip"
    assert_clean_failure(prepare_cli("enwik8", "--source", zpath, "--out", out), out, "11,000 bytes")
    zpath = tmp_path / "long.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr("enwik8", bytes(100_000_001))
    assert_clean_failure(prepare_cli("enwik8", "--source", zpath, "--out", out), out, "100,000,001 bytes")
    zpath = tmp_path / "other.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("a.txt", b"a")
        z.writestr("b.txt", b"b")
    assert_clean_failure(prepare_cli("enwik8", "--source", zpath, "--out", out), out, "no file named enwik8")
    assert_clean_failure(
        prepare_cli("enwik8", "--source", tmp_path / "missing.zip", "--out", out), out, "does not exist"
    )
    assert line


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def local_server(synthetic_enwik8):
    handler = functools.partial(_Quiet, directory=str(synthetic_enwik8["zip"].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_enwik8_download(local_server, synthetic_enwik8, tmp_path, prepare_cli, monkeypatch):
    """The download path, served from loopback (the real URL is the default)."""
    monkeypatch.setenv("HAED_ENWIK8_URL", f"{local_server}/enwik8.zip")
    out = tmp_path / "dl"
    r = prepare_cli("enwik8", "--out", out)
    assert r.exit_code == 0, r.stderr
    ds = check_split(out, synthetic_enwik8["data"])
    assert ds.meta["source"]["origin"].endswith("/enwik8.zip")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.bin", "train.bin", "valid.bin"]
    shutil.rmtree(out)


def test_enwik8_offline_fails_fast_naming_source(tmp_path, prepare_cli, assert_clean_failure, monkeypatch):
    # a closed loopback port: what "no network" looks like, without depending on this machine's network
    monkeypatch.setenv("HAED_ENWIK8_URL", "http://127.0.0.1:9/enwik8.zip")
    out = tmp_path / "offline"
    t = time.monotonic()
    r = prepare_cli("enwik8", "--out", out)
    assert time.monotonic() - t < 15
    assert_clean_failure(r, out, "--source", "cannot download")
    # a lookup that fails (an invalid name) is reported the same way
    monkeypatch.setenv("HAED_ENWIK8_URL", "http://no-such-host.invalid/enwik8.zip")
    assert_clean_failure(prepare_cli("enwik8", "--out", out), out, "--source")
