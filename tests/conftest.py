"""Shared fixtures for the data-preparation tests (and anyone else's)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

# Tests never reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the repository (present in CI); HAED_SHARED_DATA overrides it.
SHARED_DATA = Path(os.environ.get("HAED_SHARED_DATA", REPO.parent / "shared" / "data"))

ENWIK8_BYTES = 100_000_000


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA} (expected ../shared/data beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fsdd_dir(shared_data) -> Path:
    d = shared_data / "fsdd"
    if not d.is_dir():
        pytest.skip(f"{d} not found")
    return d


def synthetic_enwik8_bytes(n: int = ENWIK8_BYTES) -> np.ndarray:
    """n bytes that deflate well (a 251-byte ramp) yet differ at every 1,000,003-byte block, so a
    split taken from the wrong offset has the wrong content."""
    block = 1_000_003
    ramp = np.tile(np.arange(251, dtype=np.uint8), block // 251 + 2)
    out = np.empty(n, dtype=np.uint8)
    for k, start in enumerate(range(0, n, block)):
        m = min(block, n - start)
        out[start : start + m] = ramp[(k * 7) % 251 : (k * 7) % 251 + m] + np.uint8(k % 256)
    return out


@pytest.fixture(scope="session")
def synthetic_enwik8(tmp_path_factory):
    """A 100,000,000-byte stand-in for enwik8, written once per session, plain and zipped."""
    d = tmp_path_factory.mktemp("enwik8")
    data = synthetic_enwik8_bytes()
    plain = d / "enwik8"
    data.tofile(plain)
    zpath = d / "enwik8.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.write(plain, "enwik8")
    yield {"data": data, "plain": plain, "zip": zpath}
    plain.unlink()


class CliResult:
    def __init__(self, r):
        self.exit_code = r.exit_code
        self.stdout = r.stdout
        try:
            self.stderr = r.stderr
        except ValueError:  # old click: stderr mixed into stdout
            self.stderr = r.output
        self.exception = r.exception

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


@pytest.fixture
def prepare_cli():
    """Run `haed prepare ARGS...` in-process; returns exit code, stdout and stderr."""
    from typer.testing import CliRunner

    from haed_cli.main import app

    runner = CliRunner()

    def run(*args) -> CliResult:
        return CliResult(runner.invoke(app, ["prepare", *[str(a) for a in args]]))

    return run


@pytest.fixture
def assert_clean_failure():
    """A failed prepare: non-zero exit, exactly one 'error:' line on stderr, no output left behind."""

    def check(result: CliResult, out: Path, *must_contain: str) -> str:
        assert result.exit_code != 0, result.stdout
        lines = result.error_lines()
        assert len(lines) == 1, f"expected one error line, got {lines!r}"
        assert lines[0].startswith("error: "), lines[0]
        assert "Traceback" not in result.stdout + result.stderr
        for text in must_contain:
            assert text in lines[0], f"{text!r} not in {lines[0]!r}"
        assert not out.exists(), f"{out} was left behind"
        if out.parent.exists():
            leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
            assert not leftovers, f"temporary folders left behind: {leftovers}"
        return lines[0]

    return check


@pytest.fixture(scope="session")
def text_run(tmp_path_factory):
    """A folder holding `words` (a tiny text dataset) and `run`, a finished full run of the debug recipe on it
    (step-000002, step-000004, best/), shared by the fault tests: copy it before changing it."""
    from _tiny import make_text_dataset

    from haed.config import debug_recipe
    from haed.train import train

    root = tmp_path_factory.mktemp("faults")
    train(debug_recipe(str(make_text_dataset(root / "words"))), "full", root / "run", device="cpu")
    return root
