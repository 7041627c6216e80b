"""The sweep: every objective x sequence length x batch size, each cell a few real optimizer steps
(`haed.profile.cells`), and optionally the longest window each objective trains without running out of
memory (`haed.profile.context`). An out-of-memory cell is reported as "OOM" and the sweep goes on.
"""

from __future__ import annotations

import datetime as _dt
import os
from typing import Callable, Iterable

import torch

from haed.errors import HaedError
from haed.objectives import IEM, Objective, get_objective
from haed.profile.cells import (
    check_scope,
    check_sweep,
    meta_model,
    objective_cell,
    objective_model_config,
    parameter_counts,
)
from haed.profile.context import max_context
from haed.profile.flops import DEFAULT_PEAK_TFLOPS, FLOPS_CONVENTION, add_fraction_of_peak
from haed.profile.harness import environment, profile_device
from haed.profile.report import SCHEMA, compute_ratios, describe_cell
from haed.profile.windows import WindowSource
from haed.recipe import Recipe
from haed.steps import train_step


def profile_memory(
    recipe: Recipe,
    objectives: Iterable[Objective | str] = (IEM,),
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
    on_event: Callable[[dict], None] | None = None,
    defaults: dict | None = None,
) -> dict:
    """Profile every objective x seq_len x batch_size cell; optionally the largest context per objective.

    `objectives`: records of `haed.objectives`, or their names. Returns a JSON-ready dict (see
    `write_profile_json`). `step_fn` (default: the trainer's `train_step`) is the one optimizer step;
    tests pass one that raises to simulate an OOM.
    `compile_scope` (CUDA with `compile`): "objective" (default) starts each objective's compilation
    afresh and lets torch.compile recompile for the later cells (it turns the changed sizes dynamic
    after the second shape, so it compiles about twice per objective); "cell" compiles every cell
    afresh for its own static shapes (about 30-80 s per cell at the enwik8 size). On an H100 the
    two gave the same peak memory and step times within 1.5% (12x768 main model, seq 4096-8192).
    `keep_going`: record a cell that fails other than by OOM as "error" and go on.
    `defaults`: which of the device's defaults the run took (`plan_sweep`), kept in the JSON.
    `on_event`: progress, as dicts: "start" (label, total), "task" (label), "done" (text), "end".
    """
    objectives = list(dict.fromkeys(get_objective(o) for o in objectives))
    seq_lens = sorted(dict.fromkeys(int(n) for n in seq_lens))
    batch_sizes = sorted(dict.fromkeys(int(b) for b in batch_sizes))
    check_sweep(recipe, objectives, seq_lens, batch_sizes, steps, warmup)
    check_scope(compile_scope)
    dev = profile_device(device)
    use_compile = bool(compile and dev.type == "cuda")
    source = WindowSource.for_recipe(recipe, dataset, seed)
    if source.max_len is not None and source.max_len < max(seq_lens):
        raise HaedError(
            f"the train split of {source.path} has {source.max_len:,} bytes, fewer than seq_len {max(seq_lens):,}: "
            "give shorter --seq-lens or a larger --dataset"
        )
    settings = {
        "objectives": [o.name for o in objectives],
        "seq_lens": seq_lens,
        "batch_sizes": batch_sizes,
        "steps": steps,
        "warmup": warmup,
        "seed": seed,
        "grad_accum": 1,
        "peak_tflops": peak_tflops,
        "compile_scope": compile_scope if use_compile else None,
        "keep_going": keep_going,
        "timing": "median over the timed steps of the host clock between torch.cuda.synchronize() "
        "calls; drawing the windows and copying them to the device is not timed",
        "flops": FLOPS_CONVENTION,
    }
    result = _new_profile(recipe, objectives, dev, use_compile, source, defaults, settings)
    measure = dict(device=dev, source=source, steps=steps, warmup=warmup, compile=use_compile, step_fn=step_fn)
    peak = peak_tflops if dev.type == "cuda" else None
    result["cells"] = _sweep(
        recipe, objectives, seq_lens, batch_sizes, measure, compile_scope, keep_going, peak, on_event
    )
    result["ratios"] = compute_ratios(result["cells"])
    if max_context_search:
        result["max_context"] = max_context(
            recipe, objectives, batch_sizes, start_seq_len=seq_lens[0], device=device, dataset=dataset,
            compile=compile, max_seq_len=max_seq_len, refine_steps=refine_steps, compile_scope=compile_scope,
            keep_going=keep_going, seed=seed, step_fn=step_fn, on_event=on_event,
        )  # fmt: skip
    return result


def _new_profile(
    recipe: Recipe, objectives: list[Objective], dev: torch.device, use_compile: bool, source: WindowSource,
    defaults: dict | None, settings: dict,
) -> dict:  # fmt: skip
    """The profile's JSON before any cell is measured: when, where, what, with which settings."""
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": None,
        "environment": environment(dev, use_compile),
        "recipe": recipe.to_dict(),
        "data": source.description,
        "dataset": source.path,
        "data_note": source.note,
        "defaults": defaults,
        "settings": settings,
        "parameters": parameter_counts(recipe, objectives),
        "cells": [],
        "ratios": [],
        "max_context": None,
    }


def _sweep(
    recipe: Recipe, objectives: list[Objective], seq_lens: list[int], batch_sizes: list[int], measure: dict,
    compile_scope: str, keep_going: bool, peak_tflops: float | None, on_event: Callable[[dict], None] | None,
) -> list[dict]:  # fmt: skip
    """Every cell in order (objective, then batch size, then length); `measure`: objective_cell's settings."""
    flops_models = {o: meta_model(objective_model_config(recipe, o)) for o in objectives}
    grid = [(o, n, b) for o in objectives for b in batch_sizes for n in seq_lens]
    emit = on_event or (lambda event: None)
    emit({"event": "start", "label": "profile", "total": len(grid)})
    cells = []
    try:
        previous = None
        for objective, seq_len, batch_size in grid:
            emit({"event": "task", "label": f"{objective.name} seq {seq_len} batch {batch_size}"})
            cell = objective_cell(
                recipe,
                objective,
                seq_len,
                batch_size,
                **measure,
                flops_model=flops_models[objective],
                reset_compiler=compile_scope == "cell" or objective is not previous,
                keep_going=keep_going,
            )
            previous = objective
            add_fraction_of_peak(cell, peak_tflops)
            cells.append(cell)
            emit({"event": "done", "text": describe_cell(cell)})
    finally:
        emit({"event": "end"})
    return cells
