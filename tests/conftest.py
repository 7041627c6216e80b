"""Shared fixtures, and the rules for running the suite on a GPU host.

- **Which tests see CUDA.** A test whose name contains "cuda" or "gpu", or that is marked `cuda`, runs on
  the GPU where there is one. Every other test is a CPU test, as in CI: while it runs (its fixtures
  included), `torch.cuda.is_available()` is False, so the library's device "auto" is the CPU. On a GPU
  host those tests otherwise trained on the GPU under bf16 autocast and compared with CPU subprocesses
  (torchrun ranks): on an H200, 2 gloo ranks gave 5.470313 at step 2 where the in-process reference,
  on the GPU, gave 5.469629. Subprocesses that must match an in-process CPU result are started with
  CUDA_VISIBLE_DEVICES="" and one thread (`single_thread`).
- **`slow_gpu`.** CUDA tests that compile Triton kernels or torch.compile graphs for minutes. On a CUDA
  host `./dev test` leaves them out and says so in one line; `./dev test --slow-gpu` runs them too. At
  least one test of each sampler path (eager steps, CUDA graphs, whole patches, compiled step, Triton
  kernels) stays in the default run. Without CUDA they are skipped like every CUDA test.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

# Tests never reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the repository (present in CI); HAED_SHARED_DATA overrides it.
SHARED_DATA = Path(os.environ.get("HAED_SHARED_DATA", REPO.parent / "shared" / "data"))

ENWIK8_BYTES = 100_000_000


def pytest_addoption(parser):
    parser.addoption(
        "--slow-gpu",
        action="store_true",
        help="also run the slow_gpu tests (CUDA compilations of minutes), which a CUDA host leaves out by default",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: sees CUDA where there is a GPU (as does any test named *cuda* or *gpu*)")
    config.addinivalue_line("markers", "slow_gpu: a CUDA test that compiles for minutes (run with --slow-gpu)")


def _is_cuda_test(item) -> bool:
    name = getattr(item, "originalname", None) or item.name
    return "cuda" in name or "gpu" in name or item.get_closest_marker("cuda") is not None


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available() or config.getoption("--slow-gpu") or config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow_gpu") is not None]
    if slow:
        items[:] = [item for item in items if item.get_closest_marker("slow_gpu") is None]
        config.hook.pytest_deselected(items=slow)
        config._haed_slow_gpu_left_out = len(slow)
        _say(config, _slow_gpu_line(len(slow)))


def _slow_gpu_line(n: int) -> str:
    return f"haed: {n} slow_gpu tests left out (CUDA compilations of minutes); ./dev test --slow-gpu runs them too"


def _say(config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    left_out = getattr(config, "_haed_slow_gpu_left_out", 0)
    if left_out:
        terminalreporter.write_line(_slow_gpu_line(left_out))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A CPU test (and the fixtures it sets up) runs as on a machine without CUDA."""
    if _is_cuda_test(item) or not torch.cuda.is_available():
        return (yield)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.cuda, "is_available", lambda: False)
            return (yield)
    finally:
        _forget_cuda_probes()


def _forget_cuda_probes() -> None:
    """Forget what torch cached while CUDA was hidden. `torch.utils._triton.has_triton` is cached and asks
    `torch.cuda.is_available()`: after a CPU test that compiled, every later compiled CUDA test failed with
    TritonMissing (H100, torch 2.11, 2026-12-07: 2 of the 11 failures of the suite's first GPU run)."""
    import torch.utils._triton as triton_probes

    for name in dir(triton_probes):
        cache_clear = getattr(getattr(triton_probes, name), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()


@contextlib.contextmanager
def single_thread():
    """torch's intra-op threads pinned to one, as in the subprocesses the tests start (OMP_NUM_THREADS=1),
    for results compared with theirs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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

    from haed.recipe import debug_recipe
    from haed.train import train

    root = tmp_path_factory.mktemp("faults")
    train(debug_recipe(str(make_text_dataset(root / "words"))), "full", root / "run", device="cpu")
    return root
