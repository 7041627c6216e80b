"""The suite's own rules on a GPU host (tests/conftest.py), checked here by a pytest run in a subprocess
that believes CUDA is available: CPU tests see no CUDA, CUDA tests do, and slow_gpu tests are left out
with one line that says so, unless --slow-gpu."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SAMPLE = """
import pytest
import torch


def test_on_the_cpu(tmp_path):
    assert not torch.cuda.is_available()


@pytest.fixture(scope="module")
def built_by_a_cpu_test():
    return torch.cuda.is_available()


def test_module_fixture_of_a_cpu_test(built_by_a_cpu_test):
    assert built_by_a_cpu_test is False


def test_cuda_sees_the_gpu():
    assert torch.cuda.is_available()


@pytest.mark.cuda
def test_marked_sees_the_gpu():
    assert torch.cuda.is_available()


@pytest.mark.slow_gpu
def test_cuda_compiles_for_minutes():
    assert torch.cuda.is_available()


def test_after_them_the_cpu_again():
    assert not torch.cuda.is_available()


def test_a_cpu_test_that_asks_whether_triton_works():
    import torch.utils._triton

    torch.utils._triton.has_triton()  # cached by torch, and answered with CUDA hidden


@pytest.mark.cuda
def test_a_later_gpu_test_finds_no_answer_cached_while_cuda_was_hidden():
    import torch.utils._triton

    assert torch.utils._triton.has_triton.cache_info().currsize == 0
"""

# Loaded with -p before the conftest: a machine with a GPU, as far as torch.cuda.is_available() tells.
FAKE_GPU = "import torch\n\ntorch.cuda.is_available = lambda: True\n"


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "fake_gpu.py").write_text(FAKE_GPU)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "fake_gpu", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_gpu_host_runs_cpu_tests_without_cuda_and_says_what_it_leaves_out(tmp_path):
    default = _pytest(tmp_path, "test_sample.py")
    assert default.returncode == 0, default.stdout + default.stderr
    assert "7 passed, 1 deselected" in default.stdout
    line = "haed: 1 slow_gpu tests left out (CUDA compilations of minutes); ./dev test --slow-gpu runs them too"
    assert default.stdout.count(line) == 2  # after collection, and in the summary
    every = _pytest(tmp_path, "test_sample.py", "--slow-gpu")
    assert every.returncode == 0 and "8 passed" in every.stdout and "slow_gpu tests left out" not in every.stdout
