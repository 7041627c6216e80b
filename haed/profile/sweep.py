"""The sweep: every objective x sequence length x batch size, each cell a few real optimizer steps;
and the search for the longest window each objective trains without running out of memory.

For every cell a fresh model is built from the recipe, moved to the device, and trained for
`warmup` + `steps` real optimizer steps through the trainer's own `train_step` (same freezing,
optimizer, autocast and compilation as `haed train-*`). An out-of-memory cell is reported as "OOM"
and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from typing import Callable, Iterable

import torch
import torch.nn as nn

from haed.config import Recipe, TrainConfig
from haed.errors import HaedError
from haed.model import build_model, count_parameters
from haed.objectives import OBJECTIVES, get_objective
from haed.profile.flops import DEFAULT_PEAK_TFLOPS, FLOPS_CONVENTION, add_fraction_of_peak, step_flops
from haed.profile.harness import environment, measure_cell, profile_device
from haed.profile.report import SCHEMA, compute_ratios, describe_cell
from haed.profile.windows import WindowSource, distinct_patches
from haed.steps import (
    apply_recompute,
    make_optimizer,
    maybe_compile,
    set_train_mode,
    set_trainable,
    to_device,
    torch_generator,
    train_step,
)

# --------------------------------------------------------------------------------------------
# one haed cell


def objective_model_config(recipe: Recipe, objective: str):
    """The model an objective trains: the recipe's hierarchy, or its main stack over bytes (flat)."""
    return dataclasses.replace(recipe.model, arch=get_objective(objective).arch)


def objective_train_config(recipe: Recipe, objective: str, batch_size: int, compile: bool) -> TrainConfig:
    """The objective's phase settings for one cell: one micro-batch of `batch_size`, and `compile` for every
    compiled part (the stacks and the loss's own, as in training)."""
    cfg = getattr(recipe, get_objective(objective).section)
    return dataclasses.replace(cfg, batch_size=batch_size, grad_accum=1, compile=compile)


def _check_sweep(recipe: Recipe, objectives, seq_lens, batch_sizes, steps, warmup) -> None:
    if not objectives:
        raise HaedError("no objectives to profile")
    for o in objectives:
        objective_model_config(recipe, o)
    if not seq_lens or not batch_sizes:
        raise HaedError("give at least one sequence length (--seq-lens) and one batch size (--batch-sizes)")
    if any(n <= 0 for n in seq_lens) or any(b <= 0 for b in batch_sizes):
        raise HaedError("sequence lengths and batch sizes must be positive")
    K = recipe.model.patch_size
    if any(get_objective(o).arch == "haed" for o in objectives):
        bad = [n for n in seq_lens if n % K or n < 2 * K]
        if bad:
            raise HaedError(f"--seq-lens must be multiples of the patch size {K} (and at least two patches): {bad}")
    if steps < 1 or warmup < 0:
        raise HaedError("--steps must be >= 1 and --warmup >= 0")


def build_for_objective(recipe: Recipe, objective: str, cfg: TrainConfig, device: torch.device, compile: bool):
    """(model, optimizer, trained parameters) set up as `haed train-*` sets them up for `objective`."""
    torch.manual_seed(cfg.seed)
    model = build_model(objective_model_config(recipe, objective)).to(device)
    set_train_mode(model, objective, cfg)
    params = set_trainable(model, objective, cfg)
    apply_recompute(model, cfg)
    optimizer = make_optimizer(params, cfg, device)
    maybe_compile(model, objective, compile, device)
    return model, optimizer, params


def objective_cell(
    recipe: Recipe,
    objective: str,
    seq_len: int,
    batch_size: int,
    *,
    device: torch.device,
    source: WindowSource,
    steps: int,
    warmup: int,
    compile: bool,
    step_fn: Callable = train_step,
    flops_model: nn.Module | None = None,
    reset_compiler: bool = True,
    keep_going: bool = False,
) -> dict:
    """Measure one cell of one haed objective through the trainer's own pieces.

    `reset_compiler`: forget earlier compilations first (torch._dynamo.reset()), so that this cell
    compiles for its own static shapes; else recompilations for new shapes may reuse or generalise
    (dynamic shapes) what earlier cells compiled.
    """
    model_cfg = objective_model_config(recipe, objective)
    cfg = objective_train_config(recipe, objective, batch_size, compile)
    loss_fn = OBJECTIVES[objective]
    K = model_cfg.patch_size
    hierarchical = model_cfg.arch == "haed"

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
        if "candidates" in metrics:  # the sampled softmax's candidate count (IEM)
            extra["candidates"] = metrics["candidates"]
        return extra

    cell = measure_cell(
        objective,
        seq_len,
        batch_size,
        setup=setup,
        step=step,
        make_batch=make_batch,
        device=device,
        steps=steps,
        warmup=warmup,
        keep_going=keep_going,
    )
    cell["compiled"] = bool(compile and device.type == "cuda")
    cell.setdefault("candidates_mean", None)
    cell.setdefault("distinct_patches_mean", None)
    if cell["status"] == "ok" and flops_model is not None:
        flops = step_flops(
            flops_model,
            objective,
            batch_size,
            seq_len,
            cell.get("distinct_patches_mean"),
            cell.get("candidates_mean"),
            cfg,
        )
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
        arch = get_objective(o).arch
        if arch not in out:
            out[arch] = count_parameters(_meta_model(objective_model_config(recipe, o)))
    return out


# --------------------------------------------------------------------------------------------
# the sweep


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
    on_event: Callable[[dict], None] | None = None,
    defaults: dict | None = None,
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
    `defaults`: which of the device's defaults the run took (`plan_sweep`), kept in the JSON.
    `on_event`: progress, as dicts: "start" (label, total), "task" (label), "done" (text), "end".
    """
    objectives = list(dict.fromkeys(objectives))
    seq_lens = sorted(dict.fromkeys(int(n) for n in seq_lens))
    batch_sizes = sorted(dict.fromkeys(int(b) for b in batch_sizes))
    _check_sweep(recipe, objectives, seq_lens, batch_sizes, steps, warmup)
    _check_scope(compile_scope)
    dev = profile_device(device)
    use_compile = bool(compile and dev.type == "cuda")
    source = WindowSource.for_recipe(recipe, dataset, seed)
    if source.max_len is not None and source.max_len < max(seq_lens):
        raise HaedError(
            f"the train split of {source.path} has {source.max_len:,} bytes, fewer than seq_len {max(seq_lens):,}: "
            "give shorter --seq-lens or a larger --dataset"
        )
    flops_models = {o: _meta_model(objective_model_config(recipe, o)) for o in objectives}

    result = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": None,
        "environment": environment(dev, use_compile),
        "recipe": recipe.to_dict(),
        "data": source.description,
        "dataset": source.path,
        "data_note": source.note,
        "defaults": defaults,
        "settings": {
            "objectives": objectives,
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
        },
        "parameters": parameter_counts(recipe, objectives),
        "cells": [],
        "ratios": [],
        "max_context": None,
    }
    grid = [(o, n, b) for o in objectives for b in batch_sizes for n in seq_lens]
    emit = on_event or (lambda event: None)
    emit({"event": "start", "label": "profile", "total": len(grid)})
    try:
        previous = None
        for objective, seq_len, batch_size in grid:
            emit({"event": "task", "label": f"{objective} seq {seq_len} batch {batch_size}"})
            cell = objective_cell(
                recipe,
                objective,
                seq_len,
                batch_size,
                device=dev,
                source=source,
                steps=steps,
                warmup=warmup,
                compile=use_compile,
                step_fn=step_fn,
                flops_model=flops_models[objective],
                reset_compiler=compile_scope == "cell" or objective != previous,
                keep_going=keep_going,
            )
            previous = objective
            add_fraction_of_peak(cell, peak_tflops if dev.type == "cuda" else None)
            result["cells"].append(cell)
            emit({"event": "done", "text": describe_cell(cell)})
    finally:
        emit({"event": "end"})
    result["ratios"] = compute_ratios(result["cells"])
    if max_context_search:
        from haed.profile.context import max_context  # it measures with this module's cells

        result["max_context"] = max_context(
            recipe,
            objectives,
            batch_sizes,
            start_seq_len=seq_lens[0],
            device=device,
            dataset=dataset,
            compile=compile,
            max_seq_len=max_seq_len,
            refine_steps=refine_steps,
            compile_scope=compile_scope,
            keep_going=keep_going,
            seed=seed,
            step_fn=step_fn,
            on_event=on_event,
        )
    return result


def _check_scope(scope: str) -> None:
    if scope not in ("cell", "objective"):
        raise HaedError(f"compile scope must be 'cell' or 'objective', not {scope!r}")
