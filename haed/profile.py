"""Memory and speed of the training objectives, measured: `haed profile-memory`.

For every objective x sequence length x batch size ("cell"), a fresh model is built from the recipe,
moved to the device, and trained for `warmup` + `steps` real optimizer steps through the trainer's
own `train_step` (same freezing, optimizer, autocast and compilation as `haed train-*`). Per cell:
peak allocated and reserved CUDA memory (`torch.cuda.max_memory_allocated` / `max_memory_reserved`,
reset per cell), the median time of the timed steps (host clock between `torch.cuda.synchronize()`
calls), bytes per second, the IEM candidates per step, and an estimate of the matrix FLOPs per step.
An out-of-memory cell is freed and reported as "OOM"; the sweep goes on.

On a CPU (`device="cpu"`) the same steps are timed, and memory is reported as not measured.

The per-cell measurement (`measure_cell`) takes plain callables, so other models (the MEGABYTE peer
in benchmarks/) are measured the same way and written in the same JSON schema.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from haed import __version__
from haed.checkpoint import write_text_atomic
from haed.config import Recipe, TrainConfig
from haed.data import open_dataset, random_windows
from haed.errors import HaedError
from haed.model import HAED, build_model, count_parameters
from haed.objectives import OBJECTIVES
from haed.train import apply_recompute, batch_rng, make_optimizer, maybe_compile, set_trainable, to_device, torch_generator, train_step

SCHEMA = "haed-profile-memory/1"
GIB = float(1 << 30)
NO_CUDA_MESSAGE = (
    "CUDA is not available: profile-memory measures GPU memory; "
    "pass --device cpu to time on the CPU (memory not measured)"
)
CPU_MEMORY_NOTE = "not measured (CPU)"
RANDOM_BYTES = "random bytes"
DEFAULT_PEAK_TFLOPS = 800.0  # bf16 dense matrix products measured on the H100/H200 of the device tool
FLOPS_CONVENTION = (
    "matrix FLOPs per optimizer step: 2 x linear weights x rows per forward pass, x3 for a trained part "
    "(forward + backward), x1 for a frozen part (decoder phase: encoder and main model); attention 4 x rows "
    "x context x dim per layer per forward, halved for causal stacks; IEM scores 2 x rows x candidates x dim "
    "(x3); embedding lookups, norms and elementwise work not counted; the encoder runs on the distinct patches"
)

# Ratios reported when both objectives have a measured cell at the same (seq_len, batch_size).
RATIO_PAIRS = (
    ("full", "iem"),
    ("decoder", "iem"),
    ("flat", "iem"),
    ("flat", "full"),
    ("full", "megabyte-peer"),
    ("iem", "megabyte-peer"),
    ("flat", "megabyte-peer"),
)


# --------------------------------------------------------------------------------------------
# environment and devices


def profile_device(device: str = "auto") -> torch.device:
    """The device to profile on. CUDA is required unless the CPU is asked for explicitly."""
    if device in ("auto", "cuda") or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise HaedError(NO_CUDA_MESSAGE)
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


def is_oom(error: BaseException) -> bool:
    """True for a CUDA out-of-memory error, also when wrapped (torch.compile) or raised as RuntimeError."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, torch.OutOfMemoryError):
            return True
        if isinstance(e, RuntimeError) and "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


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


# --------------------------------------------------------------------------------------------
# data


class WindowSource:
    """Byte windows for step i of a cell: random windows of a dataset's train split, or random bytes.

    Step i of every cell sees the same windows (seeded by (seed, i)), whatever the objective.
    """

    def __init__(self, data: np.ndarray | None, seed: int = 0, description: str = RANDOM_BYTES,
                 path: str | None = None):
        self.data = data
        self.seed = seed
        self.description = description
        self.path = path

    @classmethod
    def for_recipe(cls, recipe: Recipe, dataset: str | os.PathLike | None, seed: int = 0) -> "WindowSource":
        """An explicit `dataset` must exist; the recipe's own dataset is used when it exists; else random bytes."""
        if dataset is not None:
            path = Path(dataset)
        elif recipe.data.dataset and (Path(recipe.data.dataset) / "meta.json").is_file():
            path = Path(recipe.data.dataset)
        else:
            return cls(None, seed)
        data = open_dataset(path).split("train")
        return cls(data, seed, f"train split of {path}", str(path))

    @property
    def max_len(self) -> int | None:
        return None if self.data is None else int(self.data.shape[0])

    def windows(self, step: int, batch_size: int, seq_len: int) -> np.ndarray:
        if self.data is not None:
            return random_windows(self.data, batch_size, seq_len, batch_rng(self.seed, step, 0, stream=11))
        return np.random.default_rng([self.seed, 11, step]).integers(0, 256, (batch_size, seq_len), dtype=np.uint8)


def distinct_patches(windows: np.ndarray, patch_size: int) -> int:
    """How many distinct patches of `patch_size` bytes the windows hold (the encoder's rows)."""
    p = np.ascontiguousarray(windows).reshape(-1, patch_size)
    if patch_size <= 8:
        padded = np.zeros((p.shape[0], 8), dtype=np.uint8)
        padded[:, :patch_size] = p
        return int(np.unique(padded.view(np.uint64)).shape[0])
    return int(np.unique(p, axis=0).shape[0])


# --------------------------------------------------------------------------------------------
# FLOPs


def linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def attention_flops(layers: int, dim: int, rows: int, context: int, causal: bool) -> float:
    """Forward FLOPs of the attention products (QK^T and AV) of a stack."""
    return 4.0 * rows * context * dim * layers * (0.5 if causal else 1.0)


def step_flops(model: nn.Module, objective: str, batch_size: int, seq_len: int,
               distinct: float | None = None, candidates: float | None = None) -> float:
    """Matrix FLOPs of one optimizer step of `objective` (see FLOPS_CONVENTION)."""
    B, N = batch_size, seq_len
    if not isinstance(model, HAED):
        s = model.cfg.main
        fwd = 2.0 * (linear_weights(model.stack) + model.head.weight.numel()) * B * N
        return 3.0 * (fwd + attention_flops(s.layers, s.dim, B * N, N, True))
    cfg = model.cfg
    K = cfg.patch_size
    T = N // K
    U = float(distinct if distinct is not None else B * T)
    encoder = (2.0 * linear_weights(model.encoder.stack) * U * K + 2.0 * model.encoder.proj.weight.numel() * U
               + attention_flops(cfg.encoder.layers, cfg.encoder.dim, int(U * K), K, False))
    main = 2.0 * linear_weights(model.main) * B * T + attention_flops(cfg.main.layers, cfg.main.dim, B * T, T, True)
    decoder = (2.0 * model.decoder.condition.weight.numel() * B * T
               + 2.0 * (linear_weights(model.decoder.stack) + model.decoder.head.weight.numel()) * B * N
               + attention_flops(cfg.decoder.layers, cfg.decoder.dim, B * N, K, True))
    if objective == "iem":
        C = float(candidates if candidates is not None else U)
        scores = 2.0 * model.score_proj.weight.numel() * B * T + 2.0 * B * T * C * cfg.main.dim
        return 3.0 * (encoder + main + scores)
    if objective == "decoder":
        return encoder + main + 3.0 * decoder
    return 3.0 * (encoder + main + decoder)


# --------------------------------------------------------------------------------------------
# the sweep


def objective_model_config(recipe: Recipe, objective: str):
    """The model an objective trains: the recipe's hierarchy, or its main stack over bytes for "flat"."""
    if objective not in OBJECTIVES:
        raise HaedError(f"unknown objective {objective!r}: one of {', '.join(OBJECTIVES)}")
    return dataclasses.replace(recipe.model, arch="flat" if objective == "flat" else "haed")


def objective_train_config(recipe: Recipe, objective: str, batch_size: int) -> TrainConfig:
    cfg = recipe.full if objective == "flat" else getattr(recipe, objective)
    return dataclasses.replace(cfg, batch_size=batch_size, grad_accum=1)


def _check_sweep(recipe: Recipe, objectives, seq_lens, batch_sizes, steps, warmup) -> None:
    if not objectives:
        raise HaedError("no objectives to profile")
    for o in objectives:
        objective_model_config(recipe, o)
    if not seq_lens or not batch_sizes:
        raise HaedError("give at least one sequence length and one batch size")
    if any(n <= 0 for n in seq_lens) or any(b <= 0 for b in batch_sizes):
        raise HaedError("sequence lengths and batch sizes must be positive")
    K = recipe.model.patch_size
    if any(o != "flat" for o in objectives):
        bad = [n for n in seq_lens if n % K or n < 2 * K]
        if bad:
            raise HaedError(f"sequence lengths must be multiples of the patch size {K} (and at least two patches): {bad}")
    if steps < 1 or warmup < 0:
        raise HaedError("--steps must be >= 1 and --warmup >= 0")


def build_for_objective(recipe: Recipe, objective: str, cfg: TrainConfig, device: torch.device, compile: bool):
    """(model, optimizer, trained parameters) set up as `haed train-*` sets them up for `objective`."""
    torch.manual_seed(cfg.seed)
    model = build_model(objective_model_config(recipe, objective)).to(device).train()
    params = set_trainable(model, objective)
    apply_recompute(model, cfg)
    optimizer = make_optimizer(params, cfg, device)
    maybe_compile(model, objective, compile, device)
    return model, optimizer, params


def objective_cell(recipe: Recipe, objective: str, seq_len: int, batch_size: int, *, device: torch.device,
                   source: WindowSource, steps: int, warmup: int, compile: bool,
                   step_fn: Callable = train_step, flops_model: nn.Module | None = None,
                   reset_compiler: bool = True, keep_going: bool = False) -> dict:
    """Measure one cell of one haed objective through the trainer's own pieces.

    `reset_compiler`: forget earlier compilations first (torch._dynamo.reset()), so that this cell
    compiles for its own static shapes; else recompilations for new shapes may reuse or generalise
    (dynamic shapes) what earlier cells compiled.
    """
    model_cfg = objective_model_config(recipe, objective)
    cfg = objective_train_config(recipe, objective, batch_size)
    loss_fn = OBJECTIVES[objective]
    K = model_cfg.patch_size
    hierarchical = objective != "flat"

    def setup():
        if compile and device.type == "cuda" and reset_compiler:
            torch._dynamo.reset()
        return build_for_objective(recipe, objective, cfg, device, compile)

    def make_batch(i):
        windows = source.windows(i, batch_size, seq_len)
        extra = {"distinct_patches": distinct_patches(windows, K)} if hierarchical else {}
        return [(to_device(windows, device), torch_generator(cfg.seed, i, 0))], extra

    def step(state, batches):
        model, optimizer, params = state
        metrics, _ = step_fn(model, optimizer, params, loss_fn, cfg, batches, device)
        extra = {"loss": metrics.get("loss")}
        if objective == "iem":
            extra["candidates"] = metrics.get("candidates")
        return extra

    cell = measure_cell(objective, seq_len, batch_size, setup=setup, step=step, make_batch=make_batch, device=device,
                        steps=steps, warmup=warmup, keep_going=keep_going)
    cell["compiled"] = bool(compile and device.type == "cuda")
    cell.setdefault("candidates_mean", None)
    cell.setdefault("distinct_patches_mean", None)
    if cell["status"] == "ok" and flops_model is not None:
        flops = step_flops(flops_model, objective, batch_size, seq_len, cell.get("distinct_patches_mean"),
                           cell.get("candidates_mean"))
        cell["flops_per_step"] = flops
        cell["achieved_tflops"] = flops / (cell["median_step_ms"] / 1e3) / 1e12 if cell["median_step_ms"] else None
    else:
        cell["flops_per_step"] = cell["achieved_tflops"] = None
    return cell


def _meta_model(model_cfg) -> nn.Module:
    with torch.device("meta"):
        return build_model(model_cfg)


def parameter_counts(recipe: Recipe, objectives: Iterable[str]) -> dict:
    """count_parameters of the model each objective trains (built on the meta device: no memory)."""
    out = {}
    for o in objectives:
        arch = "flat" if o == "flat" else "haed"
        if arch not in out:
            out[arch] = count_parameters(_meta_model(objective_model_config(recipe, o)))
    return out


def progress_bar(console=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)


def describe_cell(cell: dict) -> str:
    if cell["status"] != "ok":
        return f"{cell['objective']} seq {cell['seq_len']} batch {cell['batch_size']}: {cell['status']}"
    mem = f", peak {cell['peak_allocated_gib']:.2f} GiB" if cell.get("peak_allocated_gib") is not None else ""
    rate = cell["bytes_per_second"]
    return (f"{cell['objective']} seq {cell['seq_len']} batch {cell['batch_size']}: "
            f"{cell['median_step_ms']:.1f} ms/step, {rate / 1e6:.3f} MB/s{mem}")


def profile_memory(
    recipe: Recipe,
    objectives: Iterable[str] = ("iem",),
    seq_lens: Iterable[int] = (2048, 4096, 8192, 16384),
    batch_sizes: Iterable[int] = (8,),
    steps: int = 5,
    warmup: int = 2,
    device: str = "auto",
    dataset: str | os.PathLike | None = None,
    compile: bool = True,
    *,
    max_context_search: bool = False,
    max_seq_len: int = 1 << 22,
    refine_steps: int = 4,
    peak_tflops: float | None = DEFAULT_PEAK_TFLOPS,
    compile_scope: str = "objective",
    keep_going: bool = False,
    seed: int = 0,
    step_fn: Callable = train_step,
    show_progress: bool = True,
    console=None,
) -> dict:
    """Profile every objective x seq_len x batch_size cell; optionally the largest context per objective.

    Returns a JSON-ready dict (see `write_profile_json`). `step_fn` (default: the trainer's
    `train_step`) is the one optimizer step; tests pass one that raises to simulate an OOM.
    `compile_scope` (CUDA with `compile`): "objective" (default) starts each objective's compilation
    afresh and lets torch.compile recompile for the later cells (it turns the changed sizes dynamic
    after the second shape, so it compiles about twice per objective); "cell" compiles every cell
    afresh for its own static shapes (about 30-80 s per cell at the enwik8 size). On an H100 the
    two gave the same peak memory and step times within 1.5% (12x768 main model, seq 4096-8192).
    `keep_going`: record a cell that fails other than by OOM as "error" and go on.
    """
    objectives = list(dict.fromkeys(objectives))
    seq_lens = sorted(dict.fromkeys(int(n) for n in seq_lens))
    batch_sizes = sorted(dict.fromkeys(int(b) for b in batch_sizes))
    _check_sweep(recipe, objectives, seq_lens, batch_sizes, steps, warmup)
    _check_scope(compile_scope)
    dev = profile_device(device)
    use_compile = bool(compile and dev.type == "cuda")
    if use_compile and compile_scope == "objective":
        _allow_recompiles()
    source = WindowSource.for_recipe(recipe, dataset, seed)
    if source.max_len is not None and source.max_len < max(seq_lens):
        raise HaedError(f"the train split of {source.path} has {source.max_len:,} bytes, fewer than seq_len {max(seq_lens):,}")
    flops_models = {o: _meta_model(objective_model_config(recipe, o)) for o in objectives}

    result = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": None,
        "environment": environment(dev, use_compile),
        "recipe": recipe.to_dict(),
        "data": source.description,
        "dataset": source.path,
        "settings": {"objectives": objectives, "seq_lens": seq_lens, "batch_sizes": batch_sizes, "steps": steps,
                     "warmup": warmup, "seed": seed, "grad_accum": 1, "peak_tflops": peak_tflops,
                     "compile_scope": compile_scope if use_compile else None, "keep_going": keep_going,
                     "timing": "median over the timed steps of the host clock between torch.cuda.synchronize() "
                               "calls; drawing the windows and copying them to the device is not timed",
                     "flops": FLOPS_CONVENTION},
        "parameters": parameter_counts(recipe, objectives),
        "cells": [],
        "ratios": [],
        "max_context": None,
    }
    grid = [(o, n, b) for o in objectives for b in batch_sizes for n in seq_lens]
    progress = progress_bar(console) if show_progress else None
    if progress is not None:
        progress.start()
    try:
        task = progress.add_task("profile", total=len(grid)) if progress is not None else None
        previous = None
        for objective, seq_len, batch_size in grid:
            if progress is not None:
                progress.update(task, description=f"{objective} seq {seq_len} batch {batch_size}")
            cell = objective_cell(recipe, objective, seq_len, batch_size, device=dev, source=source, steps=steps,
                                  warmup=warmup, compile=use_compile, step_fn=step_fn, flops_model=flops_models[objective],
                                  reset_compiler=compile_scope == "cell" or objective != previous, keep_going=keep_going)
            previous = objective
            add_fraction_of_peak(cell, peak_tflops if dev.type == "cuda" else None)
            result["cells"].append(cell)
            if progress is not None:
                progress.console.print(describe_cell(cell), highlight=False)
                progress.advance(task)
        if progress is not None:
            progress.update(task, description="profile")
    finally:
        if progress is not None:
            progress.stop()
    result["ratios"] = compute_ratios(result["cells"])
    if max_context_search:
        result["max_context"] = max_context(
            recipe, objectives, batch_sizes, start_seq_len=seq_lens[0], device=device, dataset=dataset,
            compile=compile, max_seq_len=max_seq_len, refine_steps=refine_steps, compile_scope=compile_scope,
            keep_going=keep_going, seed=seed, step_fn=step_fn, show_progress=show_progress, console=console)
    return result


def _check_scope(scope: str) -> None:
    if scope not in ("cell", "objective"):
        raise HaedError(f"compile scope must be 'cell' or 'objective', not {scope!r}")


def _allow_recompiles(limit: int = 64) -> None:
    """Room for one compiled graph per shape when many cells share a compilation."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(int(getattr(config, name)), limit))
            break


def add_fraction_of_peak(cell: dict, peak_tflops: float | None) -> None:
    achieved = cell.get("achieved_tflops")
    cell["fraction_of_peak"] = achieved / peak_tflops if achieved is not None and peak_tflops else None


# --------------------------------------------------------------------------------------------
# ratios


def compute_ratios(cells: list[dict], pairs=RATIO_PAIRS) -> list[dict]:
    """numerator / denominator per (seq_len, batch_size) where both cells ran: memory, bytes/s, step time."""
    ok = {(c["objective"], c["seq_len"], c["batch_size"]): c for c in cells if c["status"] == "ok"}
    keys = sorted({(c["seq_len"], c["batch_size"]) for c in cells}, key=lambda k: (k[1], k[0]))
    out = []
    for num, den in pairs:
        for seq_len, batch_size in keys:
            a, b = ok.get((num, seq_len, batch_size)), ok.get((den, seq_len, batch_size))
            if a is None or b is None:
                continue
            out.append({
                "numerator": num, "denominator": den, "seq_len": seq_len, "batch_size": batch_size,
                "peak_allocated": _ratio(a.get("peak_allocated_gib"), b.get("peak_allocated_gib")),
                "peak_reserved": _ratio(a.get("peak_reserved_gib"), b.get("peak_reserved_gib")),
                "bytes_per_second": _ratio(a.get("bytes_per_second"), b.get("bytes_per_second")),
                "median_step_ms": _ratio(a.get("median_step_ms"), b.get("median_step_ms")),
            })
    return out


def _ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def _cell_key(cell: dict) -> tuple:
    return cell["objective"], cell["seq_len"], cell["batch_size"]


def merge_profiles(main: dict, *others: dict) -> dict:
    """Add the cells of other profile JSONs (the MEGABYTE peer's, say) to `main` and recompute the ratios.

    A later cell of the same objective, seq_len and batch_size replaces an earlier one.
    """
    merged = dict(main)
    cells = {_cell_key(c): c for c in main["cells"]}
    merged["merged"] = list(main.get("merged") or [])
    for other in others:
        for c in other["cells"]:
            cells.pop(_cell_key(c), None)
            cells[_cell_key(c)] = c
        merged["merged"].append({"created": other.get("created"), "command": other.get("command"),
                                 "objectives": sorted({c["objective"] for c in other["cells"]}),
                                 "environment": other.get("environment"), "parameters": other.get("parameters"),
                                 "model": other.get("model"), "data": other.get("data")})
    merged["cells"] = list(cells.values())
    merged["settings"] = dict(main.get("settings") or {})
    merged["settings"]["objectives"] = list(dict.fromkeys(c["objective"] for c in merged["cells"]))
    merged["ratios"] = compute_ratios(merged["cells"])
    return merged


# --------------------------------------------------------------------------------------------
# largest context


def max_context(
    recipe: Recipe,
    objectives: Iterable[str],
    batch_sizes: Iterable[int],
    start_seq_len: int,
    device: str = "auto",
    dataset: str | os.PathLike | None = None,
    compile: bool = True,
    *,
    max_seq_len: int = 1 << 22,
    refine_steps: int = 4,
    compile_scope: str = "objective",
    keep_going: bool = False,
    seed: int = 0,
    step_fn: Callable = train_step,
    show_progress: bool = True,
    console=None,
) -> list[dict]:
    """Per objective and batch size: the longest window (bytes) that trains one step without OOM.

    Doubles from `start_seq_len` until a step runs out of memory (or `max_seq_len`, or the data's
    length, is reached), then halves the interval between the last fit and the first OOM
    `refine_steps` times; every probed length stays a multiple of the patch size x 2^k. With
    `keep_going`, a probe that fails other than by OOM counts as not fitting (its error is kept).
    """
    objectives, batch_sizes = list(objectives), [int(b) for b in batch_sizes]
    _check_sweep(recipe, objectives, [start_seq_len], batch_sizes, 1, 0)
    _check_scope(compile_scope)
    dev = profile_device(device)
    use_compile = bool(compile and dev.type == "cuda")
    if use_compile and compile_scope == "objective":
        _allow_recompiles()
    source = WindowSource.for_recipe(recipe, dataset, seed)
    cap = max_seq_len if source.max_len is None else min(max_seq_len, source.max_len)
    K = recipe.model.patch_size
    results = []
    progress = progress_bar(console) if show_progress else None
    if progress is not None:
        progress.start()
    try:
        task = progress.add_task("max context", total=len(objectives) * len(batch_sizes)) if progress else None

        for objective in objectives:
            for batch_size in batch_sizes:
                probes: list[dict] = []

                def fits(n: int) -> bool:
                    if progress is not None:
                        progress.update(task, description=f"max context {objective} batch {batch_size}: seq {n}")
                    cell = objective_cell(recipe, objective, n, batch_size, device=dev, source=source, steps=1,
                                          warmup=0, compile=use_compile, step_fn=step_fn, keep_going=keep_going,
                                          reset_compiler=compile_scope == "cell" or not probes)
                    probes.append({"seq_len": n, "status": cell["status"], "peak_allocated_gib": cell["peak_allocated_gib"],
                                   "peak_reserved_gib": cell["peak_reserved_gib"], "step_ms": cell["median_step_ms"],
                                   "error": cell["error"]})
                    return cell["status"] == "ok"

                fit, failed = _search(fits, start_seq_len, cap, refine_steps, minimum=2 * K, granularity=K)
                failure = next((p["status"] for p in probes if p["seq_len"] == failed), None)
                entry = {"objective": objective, "batch_size": batch_size, "max_seq_len": fit, "first_failure": failed,
                         "failure": failure, "capped": failed is None and fit is not None, "cap": cap, "probes": probes}
                results.append(entry)
                if progress is not None:
                    progress.console.print(describe_max_context(entry), highlight=False)
                    progress.advance(task)
    finally:
        if progress is not None:
            progress.stop()
    return results


def _search(fits: Callable[[int], bool], start: int, cap: int, refine_steps: int, minimum: int, granularity: int):
    """(largest length that fits, smallest that did not) by doubling then bisection."""
    fit, oom = None, None
    n = min(start, cap)
    if fits(n):
        fit = n
        while fit * 2 <= cap:
            if fits(fit * 2):
                fit *= 2
            else:
                oom = fit * 2
                break
    else:
        oom = n
        while n // 2 >= minimum and n % 2 == 0:
            n //= 2
            if fits(n):
                fit = n
                break
            oom = n
    if fit is None or oom is None:
        return fit, oom
    for _ in range(refine_steps):
        mid = (fit + oom) // 2 // granularity * granularity
        if mid <= fit or mid >= oom:
            break
        if fits(mid):
            fit = mid
        else:
            oom = mid
    return fit, oom


def describe_max_context(entry: dict) -> str:
    head = f"max context {entry['objective']} batch {entry['batch_size']}: "
    why = "ran out of memory" if entry.get("failure") == "OOM" else "failed (error, not OOM: see probes)"
    if entry["max_seq_len"] is None:
        return head + f"none (even seq {entry['first_failure']:,} {why})"
    tail = f" (capped at {entry['cap']:,})" if entry["capped"] else f" (seq {entry['first_failure']:,} {why})"
    return head + f"{entry['max_seq_len']:,} bytes" + tail


# --------------------------------------------------------------------------------------------
# output


def _clean(value):
    """JSON-safe: non-finite floats become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def profile_to_json(result: dict) -> str:
    return json.dumps(_clean(result), indent=2, allow_nan=False) + "\n"


def write_profile_json(result: dict, path: str | os.PathLike) -> Path:
    """Write the profile as JSON, atomically (a temporary file renamed into place)."""
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, profile_to_json(result))
    return path


def read_profile_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HaedError(f"profile JSON {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise HaedError(f"{path} cannot be read as a profile JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise HaedError(f"{path} is not a profile-memory JSON (no cells)")
    return data


_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v")


def plot_profile(result: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """Two panels against sequence length: peak allocated memory and bytes/s. One colour per
    objective, one line style per batch size; out-of-memory cells are marked with an x at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    cells = result["cells"]
    objectives = list(dict.fromkeys(c["objective"] for c in cells))
    batch_sizes = sorted({c["batch_size"] for c in cells})
    colors = {o: f"C{i % 10}" for i, o in enumerate(objectives)}
    styles = {b: _LINESTYLES[i % len(_LINESTYLES)] for i, b in enumerate(batch_sizes)}
    markers = {b: _MARKERS[i % len(_MARKERS)] for i, b in enumerate(batch_sizes)}
    measured = any(c.get("peak_allocated_gib") is not None for c in cells if c["status"] == "ok")

    fig, (ax_mem, ax_rate) = plt.subplots(1, 2, figsize=(13, 5))
    panels = ((ax_mem, "peak_allocated_gib", 1.0, "peak allocated memory (GiB)"),
              (ax_rate, "bytes_per_second", 1e-6, "training throughput (million bytes/s)"))
    any_oom = False
    for ax, key, scale, label in panels:
        for o in objectives:
            for b in batch_sizes:
                row = sorted((c for c in cells if c["objective"] == o and c["batch_size"] == b), key=lambda c: c["seq_len"])
                pts = [(c["seq_len"], c[key] * scale) for c in row if c["status"] == "ok" and c.get(key) is not None]
                name = o if len(batch_sizes) == 1 else f"{o}, batch {b}"
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, linestyle=styles[b], marker=markers[b], color=colors[o], label=name, markersize=4)
                ooms = [c["seq_len"] for c in row if c["status"] == "OOM"]
                if ooms:
                    any_oom = True
                    ax.plot(ooms, [0.96] * len(ooms), linestyle="none", marker="x", markersize=9, markeredgewidth=2,
                            color=colors[o], transform=ax.get_xaxis_transform(), clip_on=False)
        ax.set_xscale("log", base=2)
        seqs = sorted({c["seq_len"] for c in cells})
        if seqs:
            ax.set_xlim(seqs[0] / 1.2, seqs[-1] * 1.2)
            ax.set_xticks(seqs)
            ax.set_xticklabels([f"{s:,}" for s in seqs], rotation=30 if len(seqs) > 5 else 0)
            ax.minorticks_off()
        ax.set_xlabel("sequence length (bytes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        tops = [c[key] * scale for c in cells if c["status"] == "ok" and c.get(key) is not None]
        ax.set_ylim(0, max(tops) * 1.15 if tops and max(tops) > 0 else 1.0)  # headroom for the OOM marks
    if not measured:
        ax_mem.text(0.5, 0.5, f"memory {CPU_MEMORY_NOTE}", transform=ax_mem.transAxes, ha="center", va="center")
    handles, labels = ax_rate.get_legend_handles_labels()
    if any_oom:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], linestyle="none", marker="x", color="black", markeredgewidth=2))
        labels.append("out of memory")
    if handles:
        ax_rate.legend(handles, labels, fontsize=8, loc="best")
    env = result.get("environment", {})
    where = env.get("gpu") or "CPU"
    data = result.get("data", "")
    fig.suptitle(title or f"{result.get('recipe', {}).get('name', '')}: {where}, {env.get('dtype', '')}, {data}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
