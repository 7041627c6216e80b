"""What `haed profile-memory` measures when not told: the device's defaults, and synthetic windows."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from haed.profile import (
    CUDA_DEFAULTS,
    SYNTHETIC_NOTE,
    default_sweep,
    describe_defaults,
    describe_measured,
    plan_sweep,
)


@pytest.fixture
def no_gpu_calls(monkeypatch):
    """Fail if anything asks CUDA about itself."""

    def refuse(*args, **kwargs):
        raise AssertionError("CUDA was touched")

    for name in ("is_available", "device_count", "get_device_name", "get_device_properties", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, refuse)


def test_defaults_follow_the_device_without_touching_cuda(no_gpu_calls):
    for device in ("cuda", "cuda:1", torch.device("cuda")):
        d = default_sweep(device)
        assert d.recipe == "enwik8" and d.seq_lens == (2048, 4096, 8192, 16384) and d.batch_sizes == (16,)
        assert "README" in d.why
    d = default_sweep(torch.device("cpu"))
    assert d.recipe == "tiny" and d.batch_sizes == (4, 8, 16) and "CPU-timed" in d.why


def test_plan_on_cuda_takes_the_headline_configuration(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolving the device runs nothing on it
    plan = plan_sweep("auto")
    assert plan.device.type == "cuda"
    assert plan.recipe.name == "enwik8" and plan.recipe.model.patch_size == 8 and plan.recipe.model.main.dim == 768
    assert plan.seq_lens == [2048, 4096, 8192, 16384] and plan.batch_sizes == [16]
    assert (plan.warmup, plan.steps) == (20, 20)  # short host-bound steps settle slowly (see CUDA_DEFAULTS)
    assert plan.defaults["used"] == ["recipe", "seq_lens", "batch_sizes"] and plan.defaults["recipe"] == "enwik8"
    assert describe_defaults(plan.defaults).startswith(
        "no --recipe, --seq-lens, --batch-sizes given: the defaults on CUDA"
    )
    given = plan_sweep("cuda", "tiny", ["main.layers=1"], [64], None)
    assert given.recipe.name == "tiny" and given.recipe.model.main.layers == 1
    assert given.seq_lens == [64] and given.batch_sizes == list(CUDA_DEFAULTS.batch_sizes)
    assert given.defaults["used"] == ["batch_sizes"]
    assert (plan_sweep("cuda", warmup=1, steps=3).warmup, plan_sweep("cpu").steps) == (1, 5)


def test_plan_on_cpu_keeps_the_tiny_recipe():
    plan = plan_sweep("cpu", seq_lens=[64], batch_sizes=[2])
    assert plan.device == torch.device("cpu") and plan.recipe.name == "tiny"
    assert plan.defaults["used"] == ["recipe"] and plan.defaults["device"] == "cpu"
    assert describe_defaults(plan_sweep("cpu", "tiny", (), [64], [2]).defaults) is None


def test_measured_line_names_what_ran_on_a_gpu():
    result = {
        "environment": {"device": "cuda", "gpu": "NVIDIA H200", "dtype": "bfloat16 autocast", "compile": True},
        "recipe": {"name": "enwik8"},
        "data": "random bytes",
        "data_note": SYNTHETIC_NOTE,
        "settings": {"seq_lens": [2048, 16384], "batch_sizes": [16], "steps": 5, "warmup": 2},
    }
    line = describe_measured(result)
    assert line.startswith(
        "measured: recipe enwik8 on NVIDIA H200 (bfloat16 autocast, compiled); data: random bytes (synthetic"
    )
    assert "seq 2,048, 16,384; batch 16; 2 warm-up + 5 timed steps per cell" in line
    result["cells"] = [
        {"objective": objective, "compile_mode": mode}
        for objective, mode in (("iem", "reduce-overhead"), ("full", "reduce-overhead"), ("decoder", "default"))
    ]
    assert "(bfloat16 autocast, compiled; full, iem as CUDA graphs)" in describe_measured(result)


def test_cli_without_recipe_on_cpu_times_tiny_on_synthetic_bytes(tmp_path, monkeypatch):
    from haed_cli.profile import register

    monkeypatch.chdir(tmp_path)  # no recipe dataset here: the windows are synthetic
    app = typer.Typer()
    register(app)
    app.command("other")(lambda: None)  # two commands, so the app dispatches by name as the real one does
    out_json = tmp_path / "p.json"
    result = CliRunner().invoke(
        app,
        [
            "profile-memory",
            "--compare-full",
            "--device",
            "cpu",
            "--seq-lens",
            "64,128",
            "--batch-sizes",
            "2",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--set",
            "main.layers=1",
            "--json",
            str(out_json),
            "--plot",
            str(tmp_path / "p.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out_json.read_text())
    assert data["recipe"]["name"] == "tiny" and data["environment"]["device"] == "cpu"
    assert data["defaults"]["used"] == ["recipe"] and data["defaults"]["recipe"] == "tiny"
    assert data["data"] == "random bytes" and data["data_note"] == SYNTHETIC_NOTE and data["dataset"] is None
    assert [c["status"] for c in data["cells"]] == ["ok"] * 6
    assert [c["candidates_mean"] for c in data["cells"] if c["objective"] == "iem"] == [2 * 64 / 4, 2 * 128 / 4]
    output = " ".join(result.output.split())
    assert "no --recipe given: the defaults on CPU are the CPU-sized tiny recipe, CPU-timed" in output
    assert "measured: recipe tiny CPU-timed (float32; memory not measured); data: random bytes (synthetic" in output
