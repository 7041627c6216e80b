"""Where the time of one training step goes: median step time and a torch.profiler table per objective.

Builds the model of a recipe exactly as `haed profile-memory` does (same trainer step, optimizer,
autocast, compilation), runs warm-up steps, times `--steps` steps with CUDA synchronisation, then
profiles `--profile-steps` more with torch.profiler and writes the kernels sorted by CUDA time, with the
GPU's busy time per step, kernel launches and host waits (a step far above its busy time is host-bound);
on CUDA also the operators by host time (`OBJECTIVE-VARIANT-host.txt`), and with `--chrome-trace` the
timeline for chrome://tracing or Perfetto.

    python benchmarks/trace_step.py --recipe enwik8 --dataset data/enwik8-head \
        --objectives iem,full --seq-len 8192 --batch-size 16 --out trace [--no-compile] [--legacy-gather] \
        [--chrome-trace] [--memory-peak] [--set iem.compile_mode=reduce-overhead]

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
import haed.objectives  # noqa: E402
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


def place(frames: list[dict]) -> str:
    """Where an allocation was made, for grouping: the innermost frame in haed's own code (a compiled stack
    shows as the haed line that called it), else the innermost frame's file and function (the autograd
    engine's thread has none of haed's)."""
    for frame in frames:
        path = frame["filename"].replace("\\", "/")
        if "/haed/" in path:
            return f"haed/{path.rsplit('/haed/', 1)[1]}:{frame['line']} {frame['name']}"
    if not frames:
        return "(no Python frame: the backward pass's C++ or a compiled graph's)"
    return f"{Path(frames[0]['filename']).name} {frames[0]['name']}"


def peak_composition(events: list[dict]) -> tuple[int, list[tuple[int, int, str]]]:
    """Replays the caching allocator's trace of one step: the highest total of the step's own allocations
    alive at once (bytes above what was allocated before it), and what was alive then, per place: (bytes,
    count, place), largest first. A block counts from its allocation until its free is requested."""
    live: dict[int, int] = {}
    total = peak = peak_at = 0
    for i, event in enumerate(events):
        if event["action"] == "alloc":
            live[event["addr"]] = event["size"]
            total += event["size"]
            if total > peak:
                peak, peak_at = total, i + 1
        elif event["action"] in ("free_requested", "free_completed") and event["addr"] in live:
            total -= live.pop(event["addr"])
    alive: dict[int, dict] = {}
    for event in events[:peak_at]:  # again up to the peak, keeping each live block's event
        if event["action"] == "alloc":
            alive[event["addr"]] = event
        elif event["action"] in ("free_requested", "free_completed"):
            alive.pop(event["addr"], None)
    groups: dict[str, list[int]] = {}
    for event in alive.values():
        group = groups.setdefault(place(event.get("frames", [])), [0, 0])
        group[0] += event["size"]
        group[1] += 1
    return peak, sorted(((b, n, where) for where, (b, n) in groups.items()), reverse=True)


def memory_peak_step(step, i: int, name: str, out: Path) -> dict:
    """One more step with the allocator's history recorded (CUDA): what is alive at its peak, per place,
    written to NAME-peak.txt; the snapshot itself to NAME-memory.pickle (https://pytorch.org/memory_viz)."""
    import pickle

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)  # Python frames: haed's lines
    step(i)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    (out / f"{name}-memory.pickle").write_bytes(pickle.dumps(snapshot))
    events = snapshot["device_traces"][torch.cuda.current_device()]
    peak, groups = peak_composition(events)
    lines = [f"allocated before the step: {before / 2**30:.3f} GiB; the step's own at its peak: {peak / 2**30:.3f} GiB"]
    lines += [f"{b / 2**30:8.3f} GiB {n:6d} blocks  {where}" for b, n, where in groups]
    (out / f"{name}-peak.txt").write_text("\n".join(lines) + "\n")
    return {
        "allocated_before_step_gib": before / 2**30,
        "step_peak_above_gib": peak / 2**30,
        "at_peak": [[round(b / 2**30, 4), n, where] for b, n, where in groups[:12]],
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
        "--memory-peak",
        action="store_true",
        help="CUDA: one more step with the allocator's history: what is alive at its peak (OBJECTIVE-VARIANT-peak.txt)",
    )
    p.add_argument(
        "--cpu-inductor",
        action="store_true",
        help="with --device cpu: compile the stacks (and a loss with fixed shapes) with inductor as on a GPU "
        "(training compiles only on CUDA)",
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
    if a.cpu_inductor and a.device == "cpu":  # a loss with fixed shapes compiled whole, as on a GPU
        on_gpu = haed.objectives.fixed_shape_loss
        haed.objectives.fixed_shape_loss = lambda loss_fn, compiled, mode="default": on_gpu(loss_fn, True, mode)
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
        if a.memory_peak and cuda:
            host |= memory_peak_step(step, a.warmup + a.steps + a.profile_steps, f"{objective.name}-{tag}", a.out)
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
