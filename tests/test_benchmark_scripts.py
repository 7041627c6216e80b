"""The measuring scripts of benchmarks/ that the reports rely on: their counts and replays on small inputs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from _tiny import load_benchmark, tiny_model

from haed.config import TrainConfig
from haed.model import forward_flops


def test_the_flops_benchmark_adds_each_recomputed_stacks_forward_on_the_rows_it_trains():
    """benchmarks/step_flops.py's "with recomputation" columns: a recomputed stack's forward runs once more,
    on the rows its phase trains it on (IEM's byte loss: its fraction of the patches)."""
    script = load_benchmark("step_flops")
    model = tiny_model(patch_size=4)
    parts = forward_flops(model, 2, 64)
    cfg = TrainConfig(byte_loss_fraction=0.25)
    assert script.recomputed_flops(model, "iem", parts, cfg) == 0
    assert script.recomputed_flops(model, "iem", parts, replace(cfg, recompute="main")) == pytest.approx(parts["main"])
    every = replace(cfg, recompute="encoder,main,decoder")
    expected = parts["encoder"] + parts["main"] + 0.25 * parts["decoder"]
    assert script.recomputed_flops(model, "iem", parts, every) == pytest.approx(expected)
    full = replace(TrainConfig(), recompute="decoder")
    assert script.recomputed_flops(model, "full", parts, full) == pytest.approx(parts["decoder"])


def test_trace_step_counts_the_operators_a_step_runs_outside_compiled_graphs_and_the_optimizer():
    """benchmarks/trace_step.py's host-side count: each top-level operator once (not the operators it calls),
    none inside a compiled graph's range or the optimizer's step."""
    from torch.profiler import profile, record_function

    trace_step = load_benchmark("trace_step")
    x, w = torch.ones(4), torch.ones(2, 4)
    with profile() as prof:
        x + 1  # one operator
        torch.nn.functional.linear(x, w)  # one, though it calls others
        with record_function("Torch-Compiled Region: 0/0"):
            x * 3
        with record_function("Optimizer.step#AdamW.step"):
            x.mul_(2).add_(1)
    counts = trace_step.uncompiled_operators(prof, steps=1)
    assert counts["uncompiled_operators_per_step"] == 2
    assert counts["uncompiled_operators_host_ms_per_step"] > 0


def test_trace_step_names_the_compile_mode_and_lists_each_steps_loss(tmp_path, monkeypatch):
    """benchmarks/trace_step.py: a phase's compile_mode names the row's variant, and the losses of every step
    are listed (on the CPU nothing is compiled, so both rows must list the same losses)."""
    trace_step = load_benchmark("trace_step")
    rows = []
    for extra in ([], ["--set", "iem.compile_mode=reduce-overhead"]):
        out = tmp_path / ("graphs" if extra else "plain")
        argv = ["trace_step.py", "--recipe", "tiny", "--objectives", "iem", "--seq-len", "128", "--batch-size", "2"]
        argv += ["--warmup", "1", "--steps", "2", "--profile-steps", "1", "--device", "cpu", "--out", str(out)]
        monkeypatch.setattr("sys.argv", argv + extra)
        trace_step.main()
        rows.append(json.loads((out / "trace-steps.jsonl").read_text()))
    assert [r["variant"] for r in rows] == ["compiled", "compiled-reduce-overhead"]
    assert len(rows[0]["losses"]) == 3 and rows[0]["losses"] == rows[1]["losses"]


def test_trace_step_finds_what_is_alive_at_a_steps_memory_peak():
    """benchmarks/trace_step.py --memory-peak: the allocator's trace replayed; at the peak, the blocks alive
    grouped by haed's innermost frame (or the innermost frame where there is none of haed's)."""
    trace_step = load_benchmark("trace_step")
    loss = [{"filename": "/x/torch/nn/functional.py", "line": 3, "name": "linear"}]
    loss.append({"filename": "/repo/haed/objectives.py", "line": 87, "name": "iem_loss"})
    engine = [{"filename": "/tmp/torchinductor_u/ab/cab.py", "line": 9, "name": "call"}]

    def alloc(addr, size, frames):
        return {"action": "alloc", "addr": addr, "size": size, "frames": frames}

    def free(addr):
        return {"action": "free_requested", "addr": addr, "size": 0, "frames": []}

    events = [alloc(1, 100, loss), alloc(2, 50, loss), free(1), alloc(3, 300, engine), alloc(4, 20, [])]
    events += [free(3), alloc(5, 10, loss), {"action": "free_completed", "addr": 4, "size": 20, "frames": []}]
    events.append(free(99))  # a block allocated before the recording: not the step's
    peak, groups = trace_step.peak_composition(events)
    assert peak == 370  # blocks 2, 3 and 4
    assert groups == [
        (300, 1, "cab.py call"),
        (50, 1, "haed/objectives.py:87 iem_loss"),
        (20, 1, "(no Python frame: the backward pass's C++ or a compiled graph's)"),
    ]


def tiny_step(objective_name: str, recompute: str, batch: int, seq_len: int):
    """The tiny recipe's model for `objective_name` with the phase recomputing `recompute`, as
    saved_for_backward.py builds it, and a batch of its built-in windows: (model, objective, cfg, x)."""
    from haed.objectives import get_objective
    from haed.profile import WindowSource, build_for_objective, objective_train_config
    from haed.recipe import load_recipe

    objective = get_objective(objective_name)
    recipe = load_recipe("tiny", [f"{objective.name}.recompute={recompute}", "data.dataset="])
    x = torch.from_numpy(WindowSource.for_recipe(recipe, None).windows(0, batch, seq_len).copy())
    cfg = objective_train_config(recipe, objective, batch, False)
    model, _, _ = build_for_objective(recipe, objective, cfg, torch.device("cpu"), False)
    return model, objective, cfg, x


def test_saved_for_backward_drops_what_recomputation_recomputes():
    """benchmarks/saved_for_backward.py: recomputing the decoder keeps fewer bytes for the backward pass, and
    the same setting gives the same count."""
    script = load_benchmark("saved_for_backward")
    assert script.parse_variant("rc:iem.recompute=main+decoder,iem.lr=1e-3") == (
        "rc",
        ["iem.recompute=main,decoder", "iem.lr=1e-3"],
    )
    counts = []
    for recompute in ("", "decoder", ""):
        counts.append(script.saved_bytes(*tiny_step("full", recompute, batch=2, seq_len=64)))
    assert counts[1] < counts[0] == counts[2]


def test_step_peak_follows_each_storage_until_freed_and_drops_with_the_encoder_recomputed():
    """benchmarks/saved_for_backward.py --peak: a storage counts from its allocation until it is freed, the
    peak is the most alive at once; recomputing the encoder (in chunks of patches) lowers an IEM step's
    peak, and the same setting repeats its bytes."""
    script = load_benchmark("saved_for_backward")
    with script.LiveBytes() as mode:
        a = torch.zeros(1000)
        b = torch.zeros(2000)
        del a
        c = torch.zeros(500)
    assert (mode.peak, mode.now) == (4000 + 8000, 8000 + 2000) and (b.numel(), c.numel()) == (2000, 500)
    peaks = []
    for recompute in ("", "encoder", ""):
        model, objective, cfg, x = tiny_step("iem", recompute, batch=4, seq_len=256)
        model.train()
        peaks.append(script.step_peak(model, objective, cfg, x))
    assert peaks[1][0] < peaks[0][0] == peaks[2][0]
    assert all(at.startswith(("forward, aten.", "backward, aten.")) for _, at in peaks)


def test_the_generation_benchmark_times_every_stream_count_and_writes_its_samples(tmp_path):
    """benchmarks/generation_speed.py on the CPU (eager only, random weights): a row per stream count, a text
    model's continuation, an audio model's WAV of the length asked, and generation.json with all of it."""
    import soundfile

    script = load_benchmark("generation_speed")
    args = ["--device", "cpu", "--recipe", "tiny", "--recipe", "speech", "--streams", "1,2", "--bytes", "16"]
    results = script.main([*args, "--repeats", "1", "--wav", "speech", "--wav-seconds", "0.05", "--out", str(tmp_path)])
    for name in ("tiny", "speech"):
        runs = results["models"][name]["runs"]
        assert [(r["mode"], r["streams"]) for r in runs] == [("eager", 1), ("eager", 2)]
        assert all(r["median_samples_per_second"] > 0 for r in runs)
    assert (tmp_path / "tiny-sample.bin").read_bytes().startswith(script.TEXT_PROMPT)
    audio, rate = soundfile.read(tmp_path / "speech-sample.wav")
    assert rate == 8000 and len(audio) == 400 == results["models"]["speech"]["wav"]["seconds_of_audio"] * rate
    assert json.loads((tmp_path / "generation.json").read_text())["models"]["speech"]["kind"] == "audio"


def test_the_ptx_benchmark_keeps_machine_code_and_compares_it(tmp_path, capsys):
    """benchmarks/kernel_ptx.py: line information and debug sections (which move with the source) are
    dropped, instructions kept; --compare says which files differ and exits 1 for any."""
    script = load_benchmark("kernel_ptx")
    ptx = (
        '.version 8.7\n.file 1 "stages.py"\n.visible .entry k(\n)\n{\n$L__tmp3:\n\t.loc 1 120 8\n'
        "\tld.global.b32 %r1, [%rd1];\n\t// begin inline asm\n\tst.global.b32 [%rd2], %r1;\n}\n"
        "\t.section\t.debug_abbrev\n\t{\n.b8 1\n\t}\n"
    )
    moved = ptx.replace(".loc 1 120 8", ".loc 1 98 12").replace("$L__tmp3", "$L__tmp7")
    kept = script.machine_code(ptx)
    assert kept == script.machine_code(moved)
    assert "ld.global.b32 %r1, [%rd1];" in kept and "st.global.b32" in kept
    assert ".loc" not in kept and ".debug" not in kept and "$L__tmp" not in kept and ".file" not in kept
    before, after = tmp_path / "before", tmp_path / "after"
    for folder, code in ((before, kept), (after, kept)):
        folder.mkdir()
        (folder / "decoder_kernel-speech-0.ptx").write_text(code)
    assert script.compare(after, before) == 0
    assert "1 of 1 the same" in capsys.readouterr().out
    (after / "decoder_kernel-speech-0.ptx").write_text(kept.replace("%r1, [%rd1]", "%r2, [%rd1]"))
    assert script.compare(after, before) == 1
    assert "decoder_kernel-speech-0.ptx: DIFFERENT" in capsys.readouterr().out
