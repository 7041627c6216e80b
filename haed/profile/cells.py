"""One cell of a profile: one objective at one sequence length and batch size, a few real optimizer steps
through the trainer's own pieces (same freezing, optimizer, autocast and compilation as `haed train-*`);
and the checks of a sweep's settings. The sweep (`haed.profile.sweep`), the longest-context search
(`haed.profile.context`) and `haed compare --memory-cap` (`haed.memory_cap`) measure with these cells.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch
import torch.nn as nn

from haed.config import TrainConfig
from haed.errors import HaedError
from haed.model import build_model, count_parameters
from haed.objectives import Objective
from haed.profile.flops import step_flops
from haed.profile.harness import measure_cell
from haed.profile.windows import WindowSource, distinct_patches
from haed.recipe import Recipe
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


def objective_model_config(recipe: Recipe, objective: Objective):
    """The model an objective trains: the recipe's hierarchy, or its main stack over bytes (flat)."""
    return dataclasses.replace(recipe.model, arch=objective.arch)


def objective_train_config(recipe: Recipe, objective: Objective, batch_size: int, compile: bool) -> TrainConfig:
    """The objective's phase settings for one cell: one micro-batch of `batch_size`, and `compile` for every
    compiled part (the stacks and the loss's own, as in training)."""
    cfg = getattr(recipe, objective.section)
    return dataclasses.replace(cfg, batch_size=batch_size, grad_accum=1, compile=compile)


def check_sweep(recipe: Recipe, objectives: list[Objective], seq_lens, batch_sizes, steps, warmup) -> None:
    if not objectives:
        raise HaedError("no objectives to profile")
    if not seq_lens or not batch_sizes:
        raise HaedError("give at least one sequence length (--seq-lens) and one batch size (--batch-sizes)")
    if any(n <= 0 for n in seq_lens) or any(b <= 0 for b in batch_sizes):
        raise HaedError("sequence lengths and batch sizes must be positive")
    K = recipe.model.patch_size
    if any(o.arch == "haed" for o in objectives):
        bad = [n for n in seq_lens if n % K or n < 2 * K]
        if bad:
            raise HaedError(f"--seq-lens must be multiples of the patch size {K} (and at least two patches): {bad}")
    if steps < 1 or warmup < 0:
        raise HaedError("--steps must be >= 1 and --warmup >= 0")


def build_for_objective(recipe: Recipe, objective: Objective, cfg: TrainConfig, device: torch.device, compile: bool):
    """(model, optimizer, trained parameters) set up as `haed train-*` sets them up for `objective`."""
    torch.manual_seed(cfg.seed)
    model = build_model(objective_model_config(recipe, objective)).to(device)
    set_train_mode(model, objective, cfg)
    params = set_trainable(model, objective, cfg)
    apply_recompute(model, cfg)
    optimizer = make_optimizer(params, cfg, device)
    maybe_compile(model, compile, device, cfg.compile_mode)
    return model, optimizer, params


def objective_cell(
    recipe: Recipe,
    objective: Objective,
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
    loss_fn = objective
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
        objective.name,
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
    cell["compile_mode"] = cfg.compile_mode if cell["compiled"] else None
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


def meta_model(model_cfg) -> nn.Module:
    with torch.device("meta"):
        return build_model(model_cfg)


def parameter_counts(recipe: Recipe, objectives: Iterable[Objective]) -> dict:
    """count_parameters of the model each objective trains (built on the meta device: no memory)."""
    out = {}
    for o in objectives:
        if o.arch not in out:
            out[o.arch] = count_parameters(meta_model(objective_model_config(recipe, o)))
    return out


def check_scope(scope: str) -> None:
    if scope not in ("cell", "objective"):
        raise HaedError(f"compile scope must be 'cell' or 'objective', not {scope!r}")
