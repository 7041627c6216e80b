"""`haed profile-memory` on the CPU: the sweep, OOM handling, the JSON schema, the plot, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import typer
from _tiny import make_text_dataset, tiny_model
from typer.testing import CliRunner

from haed.config import TrainConfig
from haed.errors import HaedError
from haed.model import forward_flops
from haed.objectives import iem_loss
from haed.profile import (
    NO_CUDA_MESSAGE,
    SCHEMA,
    compute_ratios,
    max_context,
    merge_profiles,
    plot_profile,
    profile_memory,
    read_profile_json,
    step_flops,
    write_profile_json,
)
from haed.recipe import debug_recipe
from haed.steps import train_step

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CELL_KEYS = {
    "objective",
    "seq_len",
    "batch_size",
    "status",
    "memory",
    "peak_allocated_gib",
    "peak_reserved_gib",
    "step_ms",
    "median_step_ms",
    "bytes_per_second",
    "candidates_mean",
    "flops_per_step",
    "achieved_tflops",
    "fraction_of_peak",
    "error",
}


def fast(**kw):
    args = dict(seq_lens=[64, 128], batch_sizes=[2], steps=1, warmup=1, device="cpu")
    args.update(kw)
    return args


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one thread is many times faster than several contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sweep(one_thread):
    return profile_memory(debug_recipe(), ["iem", "decoder", "full", "flat"], **fast())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_text_dataset(tmp_path_factory.mktemp("data") / "words")


def oom_in(objective_loss, seq_len):
    """A step function that runs out of memory in the cell of (loss function, seq_len) only."""

    def step(model, optimizer, params, loss_fn, cfg, batches, device):
        if getattr(loss_fn, "loss", loss_fn) is objective_loss and batches[0][0].shape[1] == seq_len:
            waste = torch.zeros(1000)  # something the failed cell holds when it fails
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 80.00 GiB ({waste.numel()})")
        return train_step(model, optimizer, params, loss_fn, cfg, batches, device)

    return step


def test_sweep_measures_every_cell(sweep):
    cells = sweep["cells"]
    assert [(c["objective"], c["seq_len"]) for c in cells] == [
        (o, n) for o in ("iem", "decoder", "full", "flat") for n in (64, 128)
    ]
    for c in cells:
        assert CELL_KEYS <= set(c), CELL_KEYS - set(c)
        assert c["status"] == "ok" and c["batch_size"] == 2
        assert len(c["step_ms"]) == 1 and c["median_step_ms"] > 0
        assert c["bytes_per_second"] == pytest.approx(2 * c["seq_len"] / (c["median_step_ms"] / 1e3))
        assert c["flops_per_step"] > 0 and c["loss_last"] > 0
        assert c["peak_allocated_gib"] is None and c["memory"] == "not measured (CPU)"
    iem = [c for c in cells if c["objective"] == "iem"]
    # random bytes: every patch of the batch is distinct, and every one is a candidate
    assert [c["candidates_mean"] for c in iem] == [2 * 64 / 4, 2 * 128 / 4]
    assert all(c["candidates_mean"] is None for c in cells if c["objective"] != "iem")
    assert sweep["data"] == "random bytes" and sweep["dataset"] is None
    assert sweep["environment"]["memory_note"] == "not measured (CPU)"
    assert set(sweep["parameters"]) == {"haed", "flat"} and sweep["parameters"]["haed"]["total"] > 0
    pairs = {(r["numerator"], r["denominator"]) for r in sweep["ratios"]}
    assert {("full", "iem"), ("decoder", "iem"), ("flat", "iem")} <= pairs
    assert all(r["peak_allocated"] is None and r["bytes_per_second"] > 0 for r in sweep["ratios"])


def test_oom_cell_is_reported_and_the_sweep_goes_on():
    result = profile_memory(debug_recipe(), ["iem", "full"], **fast(step_fn=oom_in(iem_loss, 128)))
    status = {(c["objective"], c["seq_len"]): c["status"] for c in result["cells"]}
    assert status == {("iem", 64): "ok", ("iem", 128): "OOM", ("full", 64): "ok", ("full", 128): "ok"}
    oom = next(c for c in result["cells"] if c["status"] == "OOM")
    assert "out of memory" in oom["error"] and oom["median_step_ms"] is None and oom["bytes_per_second"] is None
    # the ratio needs both cells: only seq 64 has one
    assert [(r["seq_len"]) for r in result["ratios"] if (r["numerator"], r["denominator"]) == ("full", "iem")] == [64]


def test_other_errors_stop_the_sweep_unless_keep_going():
    def broken(model, optimizer, params, loss_fn, cfg, batches, device):
        if batches[0][0].shape[1] == 64:
            raise RuntimeError("cuDNN says no (a bug, not an OOM)")
        return train_step(model, optimizer, params, loss_fn, cfg, batches, device)

    with pytest.raises(RuntimeError, match="cuDNN says no"):
        profile_memory(debug_recipe(), ["iem"], **fast(step_fn=broken))
    result = profile_memory(debug_recipe(), ["iem"], **fast(step_fn=broken, keep_going=True))
    assert [c["status"] for c in result["cells"]] == ["error", "ok"]
    assert "cuDNN says no" in result["cells"][0]["error"]


def test_real_windows_from_a_dataset(dataset):
    result = profile_memory(debug_recipe(str(dataset)), ["iem"], **fast(seq_lens=[64]))
    assert result["dataset"] == str(dataset) and result["data"].startswith("train split of")
    c = result["cells"][0]
    assert c["status"] == "ok"
    assert c["candidates_mean"] < 2 * 64 / 4  # text repeats patches: fewer candidates than patches
    assert c["candidates_mean"] == c["distinct_patches_mean"]
    with pytest.raises(HaedError, match="dataset not found"):
        profile_memory(debug_recipe(), ["iem"], **fast(seq_lens=[64], dataset=dataset.parent / "missing"))


def test_bad_sweeps_are_refused():
    with pytest.raises(HaedError, match="multiples of the patch size"):
        profile_memory(debug_recipe(), ["iem"], **fast(seq_lens=[66]))
    with pytest.raises(HaedError, match="unknown objective"):
        profile_memory(debug_recipe(), ["nope"], **fast())
    with pytest.raises(HaedError, match="compile scope"):
        profile_memory(debug_recipe(), ["iem"], **fast(compile_scope="sometimes"))


def test_json_schema_round_trip(sweep, tmp_path):
    path = write_profile_json(sweep, tmp_path / "out" / "profile.json")
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA
    assert {
        "schema",
        "created",
        "command",
        "environment",
        "recipe",
        "data",
        "dataset",
        "settings",
        "parameters",
        "cells",
        "ratios",
        "max_context",
    } <= set(data)
    assert {"device", "gpu", "torch", "cuda", "dtype", "compile", "memory_measured", "memory_note"} <= set(
        data["environment"]
    )
    assert {"objectives", "seq_lens", "batch_sizes", "steps", "warmup"} <= set(data["settings"])
    assert data["recipe"]["model"]["patch_size"] == 4
    assert data == json.loads(json.dumps(sweep))  # nothing lost or changed on the way
    assert read_profile_json(path) == data
    assert not [p for p in path.parent.iterdir() if p.name != "profile.json"]  # no temporary left
    with pytest.raises(HaedError, match="does not exist"):
        read_profile_json(tmp_path / "missing.json")


def test_plot_file_is_a_png_with_oom_cells(sweep, tmp_path):
    result = dict(sweep, cells=[dict(c) for c in sweep["cells"]])
    result["cells"][-1].update(status="OOM", median_step_ms=None, bytes_per_second=None)
    # a measured-memory look too (as on a GPU)
    for i, c in enumerate(result["cells"][:-1]):
        c["peak_allocated_gib"] = 0.1 * (i + 1)
    path = plot_profile(result, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    plot_profile(sweep, tmp_path / "cpu.png")  # memory not measured: still a plot
    assert (tmp_path / "cpu.png").read_bytes()[:8] == PNG_MAGIC


def test_merge_adds_the_peer_and_its_ratios(sweep):
    peer_cell = dict(next(c for c in sweep["cells"] if c["objective"] == "full" and c["seq_len"] == 64))
    peer_cell.update(objective="megabyte-peer", bytes_per_second=peer_cell["bytes_per_second"] / 2)
    merged = merge_profiles(sweep, {"cells": [peer_cell], "created": "now"})
    assert len(merged["cells"]) == len(sweep["cells"]) + 1
    r = next(r for r in merged["ratios"] if (r["numerator"], r["denominator"]) == ("full", "megabyte-peer"))
    assert r["bytes_per_second"] == pytest.approx(2.0)
    assert compute_ratios(sweep["cells"]) == sweep["ratios"]
    again = dict(peer_cell, bytes_per_second=peer_cell["bytes_per_second"] * 2)  # a later run of the same cell
    remerged = merge_profiles(merged, {"cells": [again]})
    assert len(remerged["cells"]) == len(merged["cells"]) and remerged["cells"][-1] is again
    assert remerged["settings"]["objectives"] == ["iem", "decoder", "full", "flat", "megabyte-peer"]


def test_max_context_doubles_then_bisects():
    def fits_up_to_300(model, optimizer, params, loss_fn, cfg, batches, device):
        if batches[0][0].shape[1] > 300:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return train_step(model, optimizer, params, loss_fn, cfg, batches, device)

    [entry] = max_context(
        debug_recipe(),
        ["decoder"],
        [1],
        start_seq_len=64,
        device="cpu",
        step_fn=fits_up_to_300,
        refine_steps=4,
    )
    probed = [(p["seq_len"], p["status"]) for p in entry["probes"]]
    assert probed == [
        (64, "ok"),
        (128, "ok"),
        (256, "ok"),
        (512, "OOM"),
        (384, "OOM"),
        (320, "OOM"),
        (288, "ok"),
        (304, "OOM"),
    ]
    assert entry["max_seq_len"] == 288 and entry["first_failure"] == 304 and entry["failure"] == "OOM"
    assert not entry["capped"]
    [capped] = max_context(debug_recipe(), ["decoder"], [1], start_seq_len=64, device="cpu", max_seq_len=128)
    assert capped["max_seq_len"] == 128 and capped["capped"]


# --------------------------------------------------------------------------------------------
# the command


@pytest.fixture
def cli():
    from haed_cli.profile import register

    app = typer.Typer()
    register(app)

    @app.command("other")  # two commands, so the app dispatches by name as the real one does
    def other():
        pass

    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["profile-memory", *map(str, args)])


def _stderr(result) -> str:
    try:
        return result.stderr
    except ValueError:  # older click: mixed
        return result.output


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_no_cuda_says_so_in_one_line(cli, monkeypatch, tmp_path, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = cli("--compare-full", "--device", device, "--json", tmp_path / "p.json", "--plot", tmp_path / "p.png")
    assert result.exit_code != 0
    lines = [line for line in _stderr(result).splitlines() if line.strip()]
    assert lines == [f"error: {NO_CUDA_MESSAGE}"]
    assert "Traceback" not in result.output
    assert not (tmp_path / "p.json").exists()


def test_cli_on_cpu_end_to_end(cli, tmp_path):
    out_json, out_png = tmp_path / "p.json", tmp_path / "p.png"
    result = cli(
        "--recipe",
        "tiny",
        "--compare-full",
        "--objectives",
        "flat",
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
        "--set",
        "data.dataset=nowhere",
        "--json",
        out_json,
        "--plot",
        out_png,
    )
    assert result.exit_code == 0, _stderr(result) + result.output
    data = json.loads(out_json.read_text())
    assert [c["objective"] for c in data["cells"]] == [
        "iem",
        "iem",
        "decoder",
        "decoder",
        "full",
        "full",
        "flat",
        "flat",
    ]
    assert all(c["status"] == "ok" for c in data["cells"])
    assert data["recipe"]["model"]["main"]["layers"] == 1 and data["data"] == "random bytes"
    assert data["environment"]["device"] == "cpu" and data["command"]
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    assert "objective" in result.output and "full / iem" in result.output and "n/m" in result.output


def test_cli_refuses_bad_lists(cli, tmp_path):
    result = cli("--device", "cpu", "--seq-lens", "64,abc", "--json", tmp_path / "p.json")
    assert result.exit_code != 0 and "--seq-lens" in _stderr(result)
    result = cli("--device", "cpu", "--objectives", "iem,nope", "--json", tmp_path / "p.json")
    assert result.exit_code != 0 and "unknown objective" in _stderr(result)


def test_step_flops_count_the_byte_loss_and_the_decoder_phases_trained_main_blocks():
    """IEM's byte loss adds the decoder, trained, on its share of rows and bytes; the decoder phase with
    `main_layers` adds the backward pass of main's top blocks: with every block trained, the main model
    counts as in full training."""
    model = tiny_model(patch_size=4)
    B, N = 2, 64
    parts = forward_flops(model, B, N)
    plain = TrainConfig()
    iem = step_flops(model, "iem", B, N, cfg=plain)
    assert iem == pytest.approx(3 * (parts["encoder"] + parts["main"] + parts["scores"]))
    half = step_flops(model, "iem", B, N, cfg=replace(plain, byte_loss_fraction=0.5))
    assert half == pytest.approx(iem + 1.5 * parts["decoder"])
    first_byte = step_flops(model, "iem", B, N, cfg=replace(plain, byte_loss_fraction=0.5, byte_loss_bytes=1))
    assert first_byte == pytest.approx(iem + 1.5 * parts["decoder"] / 4)
    frozen = step_flops(model, "decoder", B, N, cfg=plain)
    assert frozen == pytest.approx(parts["encoder"] + parts["main"] + 3 * parts["decoder"])
    layers = model.cfg.main.layers
    every_block = step_flops(model, "decoder", B, N, cfg=replace(plain, main_layers=layers))
    assert every_block == pytest.approx(step_flops(model, "full", B, N) - 2 * parts["encoder"])
