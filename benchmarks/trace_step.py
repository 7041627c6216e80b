"""Where the time of one training step goes: median step time and a torch.profiler table per objective.

Builds the model of a recipe exactly as `haed profile-memory` does (same trainer step, optimizer,
autocast, compilation), runs warm-up steps, times `--steps` steps with CUDA synchronisation, then
profiles `--profile-steps` more with torch.profiler and writes the kernels sorted by CUDA time, with the
GPU's busy time per step, kernel launches and host waits (a step far above its busy time is host-bound);
on CUDA also the operators by host time (`OBJECTIVE-VARIANT-host.txt`), and with `--chrome-trace` the
timeline for chrome://tracing or Perfetto.

    python benchmarks/trace_step.py --recipe enwik8 --dataset data/enwik8-head \
        --objectives iem,full --seq-len 8192 --batch-size 16 --out trace [--no-compile] [--legacy-gather] \
        [--chrome-trace] [--set iem.compile_mode=reduce-overhead --set full.compile_mode=reduce-overhead]

`--legacy-gather` puts back plain advanced indexing (`table[index]`) for the gather of patch vectors,
to measure before/after the embedding-backward gather (see haed.model.gather_rows). A phase's
`compile_mode` (`--set iem.compile_mode=reduce-overhead`: its stacks as CUDA graphs, for a host-bound step)
names the row's variant; each row lists its steps' losses, which another mode or variant must repeat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import haed.model  # noqa: E402
from haed.objectives import get_objective  # noqa: E402
from haed.profile import WindowSource, build_for_objective, objective_train_config  # noqa: E402
from haed.recipe import load_recipe  # noqa: E402
from haed.steps import compile_stacks, to_device, torch_generator, train_step  # noqa: E402


def host_side(averages, steps: int) -> dict:
    """Per profiled step: GPU busy time (kernels and copies) against launches and host waits.

    A step whose GPU busy time is far below its wall time is bound by the host (launches, waits),
    not by the GPU; the count of launches and the time spent waiting on the device say which.
    """
    from torch.autograd import DeviceType

    busy = sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA)
    launches = sum(e.count for e in averages if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"))
    waits = sum(
        e.cpu_time_total
        for e in averages
        if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize")
    )
    return {
        "gpu_busy_ms_per_step": busy / 1e3 / steps,
        "kernel_launches_per_step": launches / steps,
        "host_wait_ms_per_step": waits / 1e3 / steps,
    }


def _counted_elsewhere(name: str) -> bool:
    """An enclosing range whose operators are not the uncompiled step's own: another operator, a compiled
    graph (profiler ranges "Torch-Compiled Region", "CompiledFunction"), the optimizer. Gradient clipping has
    no range of its own and is counted: on the CPU one operator per parameter, on CUDA a few (foreach)."""
    return name.startswith("aten::") or "compiled" in name.lower() or "Optimizer" in name


def uncompiled_operators(prof, steps: int) -> dict:
    """Per profiled step: the top-level aten operators run outside compiled graphs and the optimizer (each one
    or more launches, and its dispatch, on the host), and their host time."""
    count, host_us = 0, 0.0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not _counted_elsewhere(parent.name):
            parent = parent.cpu_parent
        if parent is None:
            count += 1
            host_us += event.cpu_time_total
    return {
        "uncompiled_operators_per_step": count / steps,
        "uncompiled_operators_host_ms_per_step": host_us / 1e3 / steps,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="enwik8")
    p.add_argument("--dataset", default=None)
    p.add_argument("--objectives", default="iem,full")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--legacy-gather", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of this script")
    p.add_argument("--chrome-trace", action="store_true", help="also write OBJECTIVE-VARIANT.trace.json")
    p.add_argument(
        "--cpu-inductor",
        action="store_true",
        help="with --device cpu: compile the stacks with inductor as on a GPU (training compiles only on CUDA)",
    )
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def timed_steps(step, a, sync) -> tuple[float, list[float]]:
    """The warm-up steps' seconds, then each timed step's milliseconds (synchronised on both sides)."""
    t_start = time.perf_counter()
    for i in range(a.warmup):
        step(i)
    sync()
    warmup_s = time.perf_counter() - t_start
    times = []
    for i in range(a.warmup, a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return warmup_s, times


def profiled_steps(step, a, sync, cuda: bool, name: str) -> dict:
    """`--profile-steps` more steps under torch.profiler: the tables (and trace) written, the host-side counts."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for i in range(a.warmup + a.steps, a.warmup + a.steps + a.profile_steps):
            step(i)
        sync()
    averages = prof.key_averages()
    table = averages.table(
        sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40, max_name_column_width=90
    )
    (a.out / f"{name}.txt").write_text(table)
    if cuda:  # where the host's time goes: a host-bound step is the sum of these, not of the kernels
        host_table = averages.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90)
        (a.out / f"{name}-host.txt").write_text(host_table)
    if a.chrome_trace:  # the timeline: the GPU's idle gaps and what the host ran during them
        prof.export_chrome_trace(str(a.out / f"{name}.trace.json"))
    return (host_side(averages, a.profile_steps) if cuda else {}) | uncompiled_operators(prof, a.profile_steps)


def main() -> None:
    a = parse_args()
    if a.legacy_gather:
        legacy = lambda table, index: table[index]  # noqa: E731
        haed.model.gather_rows = legacy
    a.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    recipe = load_recipe(a.recipe, a.overrides)
    source = WindowSource.for_recipe(recipe, a.dataset)
    compiled = not a.no_compile
    results = []
    for name in a.objectives.split(","):
        objective = get_objective(name)  # the record, looked up once
        torch._dynamo.reset()
        cfg = objective_train_config(recipe, objective, a.batch_size, compiled)
        model, optimizer, params = build_for_objective(recipe, objective, cfg, device, compiled)
        if compiled and a.cpu_inductor and not cuda:
            compile_stacks(model, cfg.compile_mode)  # as training compiles them on a GPU
        mode = f"-{cfg.compile_mode}" if compiled and cfg.compile_mode != "default" else ""
        tag = ("compiled" if compiled else "eager") + mode + ("-legacy-gather" if a.legacy_gather else "")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        losses = []  # each step's loss, read after the timed steps: modes and variants must agree on them

        def step(i):
            x = to_device(source.windows(i, a.batch_size, a.seq_len), device)
            metrics, _ = train_step(model, optimizer, params, objective, cfg, [(x, torch_generator(0, i, 0))], device)
            losses.append(metrics["loss"])

        warmup_s, times = timed_steps(step, a, sync)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        host = profiled_steps(step, a, sync, cuda, f"{objective.name}-{tag}")
        median = statistics.median(times)
        row = {
            "objective": objective.name,
            "variant": tag,
            "seq_len": a.seq_len,
            "batch_size": a.batch_size,
            "median_step_ms": median,
            "step_ms": times,
            "bytes_per_second": a.batch_size * a.seq_len / median * 1e3,
            "peak_allocated_gib": peak,
            "warmup_s": warmup_s,
            "losses": [float(v) for v in losses[: a.warmup + a.steps]],
            **host,
            "overrides": a.overrides,
            "data": source.description,
        }
        results.append(row)
        print(json.dumps(row), flush=True)
        if cuda:
            torch.cuda.empty_cache()
    with open(a.out / "trace-steps.jsonl", "a") as f:
        for row in results:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
