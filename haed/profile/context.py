"""`haed profile-memory --max-context`: the longest window each objective trains at without running out
of memory, found by doubling and then bisecting, each probe a real training step (`objective_cell`)."""

from __future__ import annotations

import os
from typing import Callable, Iterable

from haed.objectives import Objective, get_objective
from haed.profile.cells import check_scope, check_sweep, objective_cell
from haed.profile.harness import profile_device
from haed.profile.report import describe_max_context
from haed.profile.windows import WindowSource
from haed.recipe import Recipe
from haed.steps import train_step


def max_context(
    recipe: Recipe,
    objectives: Iterable[Objective | str],
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
    on_event: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Per objective and batch size: the longest window (bytes) that trains one step without OOM.

    Doubles from `start_seq_len` until a step runs out of memory (or `max_seq_len`, or the data's
    length, is reached), then halves the interval between the last fit and the first OOM
    `refine_steps` times; every probed length stays a multiple of the patch size x 2^k. With
    `keep_going`, a probe that fails other than by OOM counts as not fitting (its error is kept).
    """
    objectives, batch_sizes = [get_objective(o) for o in objectives], [int(b) for b in batch_sizes]
    check_sweep(recipe, objectives, [start_seq_len], batch_sizes, 1, 0)
    check_scope(compile_scope)
    dev = profile_device(device)
    use_compile = bool(compile and dev.type == "cuda")
    source = WindowSource.for_recipe(recipe, dataset, seed)
    cap = max_seq_len if source.max_len is None else min(max_seq_len, source.max_len)
    K = recipe.model.patch_size
    results = []
    emit = on_event or (lambda event: None)
    emit({"event": "start", "label": "max context", "total": len(objectives) * len(batch_sizes)})
    try:
        for objective in objectives:
            for batch_size in batch_sizes:

                def run_cell(n: int, probes: list, objective=objective, batch_size=batch_size) -> dict:
                    return objective_cell(
                        recipe,
                        objective,
                        n,
                        batch_size,
                        device=dev,
                        source=source,
                        steps=1,
                        warmup=0,
                        compile=use_compile,
                        step_fn=step_fn,
                        keep_going=keep_going,
                        reset_compiler=compile_scope == "cell" or not probes,
                    )

                label = f"max context {objective.name} batch {batch_size}"
                entry = _longest_window(run_cell, label, emit, start_seq_len, cap, refine_steps, K)
                results.append({"objective": objective.name, "batch_size": batch_size, **entry})
                emit({"event": "done", "text": describe_max_context(results[-1])})
    finally:
        emit({"event": "end"})
    return results


def _longest_window(run_cell, label: str, emit, start: int, cap: int, refine_steps: int, K: int) -> dict:
    """The search for one objective and batch size: every probe (`run_cell(n, probes so far)`, one training
    step at length n) recorded, the longest length that fit and the first that did not."""
    probes: list[dict] = []

    def fits(n: int) -> bool:
        emit({"event": "task", "label": f"{label}: seq {n}"})
        cell = run_cell(n, probes)
        probes.append(
            {
                "seq_len": n,
                "status": cell["status"],
                "peak_allocated_gib": cell["peak_allocated_gib"],
                "peak_reserved_gib": cell["peak_reserved_gib"],
                "step_ms": cell["median_step_ms"],
                "error": cell["error"],
            }
        )
        return cell["status"] == "ok"

    fit, failed = _search(fits, start, cap, refine_steps, minimum=2 * K, granularity=K)
    return {
        "max_seq_len": fit,
        "first_failure": failed,
        "failure": next((p["status"] for p in probes if p["seq_len"] == failed), None),
        "capped": failed is None and fit is not None,
        "cap": cap,
        "probes": probes,
    }


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
