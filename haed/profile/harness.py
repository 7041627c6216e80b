"""Measuring one cell: the device, the measurement of a few optimizer steps, out-of-memory detection.

Per cell: peak allocated and reserved CUDA memory (`torch.cuda.max_memory_allocated` /
`max_memory_reserved`, reset per cell), the median time of the timed steps (host clock between
`torch.cuda.synchronize()` calls) and bytes per second. An out-of-memory cell is freed and
reported as "OOM". On a CPU (`device="cpu"`) the same steps are timed, and memory is reported as
not measured.

`measure_cell` takes plain callables, so other models (the MEGABYTE peer in benchmarks/) are
measured the same way.
"""

from __future__ import annotations

import gc
import platform
import statistics
import time
from typing import Callable

import torch

from haed import __version__
from haed.device import configure_cuda, is_oom
from haed.errors import HaedError

GIB = float(1 << 30)
NO_CUDA_MESSAGE = (
    "CUDA is not available: profile-memory measures GPU memory; "
    "pass --device cpu to time on the CPU (memory not measured)"
)
CPU_MEMORY_NOTE = "not measured (CPU)"


def profile_device(device: str = "auto") -> torch.device:
    """The device to profile on. CUDA is required unless the CPU is asked for explicitly."""
    if device in ("auto", "cuda") or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise HaedError(NO_CUDA_MESSAGE)
        configure_cuda()
        return torch.device("cuda" if device == "auto" else device)
    if device != "cpu":
        raise HaedError(f"--device must be auto, cuda, cuda:N or cpu, not {device!r}")
    return torch.device("cpu")


def environment(device: torch.device, compile: bool) -> dict:
    """What the numbers were measured on."""
    cuda = device.type == "cuda"
    env = {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / GIB if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "haed": __version__,
        "dtype": "bfloat16 autocast" if cuda else "float32",
        "compile": bool(compile and cuda),
        "memory_measured": cuda,
        "memory_note": None if cuda else CPU_MEMORY_NOTE,
    }
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device, force: bool = False) -> None:
    """Collect garbage and return cached blocks, so the next cell starts from an empty GPU.

    (On a CPU nothing is measured; reference counting frees a finished cell, and a full collection
    is only worth its time after an out-of-memory error, whose traceback held the cell.)"""
    if device.type != "cuda" and not force:
        return
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# one cell


def measure_cell(
    objective: str,
    seq_len: int,
    batch_size: int,
    *,
    setup: Callable[[], object],
    step: Callable[[object, object], dict | None],
    device: torch.device,
    make_batch: Callable[[int], tuple[object, dict]] = lambda i: (i, {}),
    steps: int,
    warmup: int,
    keep_going: bool = False,
) -> dict:
    """Measure one cell: `setup()` builds the state (model, optimizer, ...) on the device;
    `make_batch(i)` (not timed) gives step i's input and host-side extras; `step(state, batch)` runs
    one optimizer step (timed) and may return more extras (read after the timer stopped: tensors are
    turned into floats here; every extra is averaged over all steps as `<name>_mean`). Steps
    0..warmup-1 are not timed.

    An out-of-memory error anywhere (setup or step) frees everything and gives status "OOM". With
    `keep_going`, any other exception gives status "error" (its message kept) instead of propagating,
    so that one failing kernel does not lose a long sweep.
    """
    cuda = device.type == "cuda"
    _free(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    cell: dict = {
        "objective": objective,
        "seq_len": int(seq_len),
        "batch_size": int(batch_size),
        "status": "ok",
        "memory": "measured" if cuda else CPU_MEMORY_NOTE,
        "allocated_before_gib": torch.cuda.memory_allocated(device) / GIB if cuda else None,
        "allocated_after_setup_gib": None,
        "peak_allocated_gib": None,
        "peak_reserved_gib": None,
        "warmup_s": None,
        "step_ms": [],
        "median_step_ms": None,
        "bytes_per_second": None,
        "error": None,
    }
    extras: list[dict] = []
    failure = None
    try:
        _run_steps(cell, extras, setup, step, make_batch, device, steps, warmup)
    except Exception as e:  # noqa: BLE001 - out-of-memory errors (and with keep_going, all) are recorded
        oom = is_oom(e)
        if not (oom or keep_going):
            raise
        failure = ("OOM" if oom else "error", f"{type(e).__name__}: {' '.join(str(e).split())[:400]}")
    # The traceback (and with it the model and optimizer of the failed cell) is gone here.
    if failure is not None:
        _free(device, force=True)
        cell["status"], cell["error"] = failure
        if cuda:  # how far it got before running out
            cell["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
            cell["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        cell["median_step_ms"] = cell["bytes_per_second"] = None
        return cell
    if cuda:
        cell["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        cell["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    if cell["step_ms"]:
        median = statistics.median(cell["step_ms"])
        cell["median_step_ms"] = median
        cell["bytes_per_second"] = batch_size * seq_len / (median / 1e3) if median > 0 else None
    for key in sorted({k for e in extras for k in e}):
        values = [float(e[key]) for e in extras if e.get(key) is not None]
        cell[f"{key}_mean"] = statistics.fmean(values) if values else None
        cell[f"{key}_last"] = values[-1] if values else None
    return cell


def _run_steps(cell, extras, setup, step, make_batch, device, steps, warmup) -> None:
    cuda = device.type == "cuda"
    t_setup = time.perf_counter()
    state = setup()
    if cuda:
        cell["allocated_after_setup_gib"] = torch.cuda.memory_allocated(device) / GIB
    for i in range(warmup + steps):
        batch, extra = make_batch(i)
        _sync(device)
        t0 = time.perf_counter()
        more = step(state, batch)
        _sync(device)
        t1 = time.perf_counter()
        if i == max(warmup, 1) - 1:
            cell["warmup_s"] = t1 - t_setup  # setup + warm-up steps (compilation happens here)
        if i >= warmup:
            cell["step_ms"].append((t1 - t0) * 1e3)
        extra = {**(extra or {}), **(more or {})}
        extras.append({k: (v.item() if torch.is_tensor(v) else v) for k, v in extra.items()})
        del batch, more
    del state
