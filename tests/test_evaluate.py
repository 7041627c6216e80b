"""Exact bits per byte."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny import random_bytes, tiny_model
from conftest import CliResult
from typer.testing import CliRunner

from haed.evaluate import bits_per_byte
from haed_cli.main import app


@pytest.mark.parametrize("arch", ["haed", "flat"])
@pytest.mark.parametrize("n", [128, 150])
def test_bits_per_byte_is_mean_cross_entropy_over_ln2(arch, n):
    model = tiny_model(patch_size=4, arch=arch)
    data = random_bytes(n, seed=n).numpy()
    result = bits_per_byte(model, data, seq_len=32, batch_size=3)
    # Direct: every byte's cross-entropy given the bytes before it in its 32-byte window.
    total = 0.0
    with torch.no_grad():
        for start in range(0, n, 32):
            window = torch.from_numpy(data[start : start + 32].copy())
            length = len(window)
            padded = torch.zeros(-(-length // 4) * 4, dtype=torch.uint8)
            padded[:length] = window
            logits = model(padded.view(1, -1))[0, :length]
            total += F.cross_entropy(logits.double(), window.long(), reduction="sum").item()
    assert result["bytes"] == n
    assert result["windows"] == math.ceil(n / 32)
    assert result["bits_per_byte"] == pytest.approx(total / n / math.log(2), rel=1e-6)
    assert "non-overlapping" in result["windowing"]


def test_an_untrained_model_is_near_eight_bits():
    model = tiny_model(patch_size=4)
    result = bits_per_byte(model, np.arange(256, dtype=np.uint8).repeat(2), seq_len=64)
    assert 7.5 < result["bits_per_byte"] < 8.5


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--max-bytes", "-5"), ("--seq-len", "0")])
def test_bad_evaluate_option_is_one_line(option, value, tmp_path):
    result = CliResult(CliRunner().invoke(app, ["evaluate", "--run", str(tmp_path), option, value]))
    assert result.exit_code == 1
    assert result.error_lines() == [f"error: {option} must be >= 1, not {value}"]
