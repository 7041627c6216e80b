"""`haed train-*` as one library call. `train` reads as what it does: resolve the run (fresh, or resumed
from its newest intact checkpoint), set it up (`haed.trainer.Trainer`: data, model, optimizer, world),
run the loop, finish. `finish_phase` brings a phase to the end of its schedule (compare, quickstart);
`train_command` is the command line's way in.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from haed.checkpoint import BEST, latest_checkpoint, latest_intact_checkpoint, step_dirs, wait_for_writer
from haed.device import resolve_device
from haed.distributed import init_world
from haed.errors import HaedError, RunStopped, StopRequested, WriteError
from haed.objectives import Objective, get_objective
from haed.recipe import Recipe
from haed.runs import absolute_dataset, phase_finished, recipe_for_run, resolve_run
from haed.trainer import Trainer, TrainResult, emit


def train(
    recipe: Recipe | None,
    objective: Objective | str,
    run_dir: Path,
    *,
    resume: bool = False,
    allow_changes: bool = False,
    init_from: Path | None = None,
    device: str = "auto",
    stop_after: int | None = None,
    compile: bool | None = None,
    on_event: Callable[[dict], None] | None = None,
    wait_for_parent: bool = False,
) -> TrainResult:
    """Train `recipe`'s model with `objective` (a record of `haed.objectives`, or its name: "iem", "decoder",
    "full", "flat") into `run_dir`.

    `resume`: continue the run in `run_dir` from its newest intact checkpoint, with the run's own
    recipe (`recipe=None`), or with `recipe` if it equals the run's; a different recipe is refused
    unless `allow_changes` (for example to extend `steps` or `time_budget`).
    `init_from`: the IEM run whose encoder and main model the decoder phase starts from (frozen):
    its best checkpoint by validation loss, else its last.
    `stop_after`: stop (with a checkpoint) after this many steps although the schedule runs on;
    a later `resume=True` continues exactly where it stopped.
    `compile`: override the phase's `compile` setting, for the stacks and the loss's compiled parts alike
    (it changes speed, not results).
    `on_event`: called with a dict per event ("start", "log", "valid", "best", "checkpoint",
    "message", "progress", "end"); the library itself prints nothing.
    `wait_for_parent`: wait for an `init_from` run that is still training (else it is refused).
    A write that fails (a full disk, a read-only folder) stops training with `RunStopped`: the
    checkpoints already written stay, the newest intact one the resume point.
    """
    objective = get_objective(objective)  # the one lookup: from here on the record travels
    run_dir = Path(run_dir)
    _check_request(recipe, objective, run_dir, resume, allow_changes, init_from)
    if init_from is not None and not resume:  # a parent still training would hand over a moment of its run
        wait_for_writer(Path(init_from), wait_for_parent, lambda text: emit(on_event, "message", text=text))
    recipe = absolute_dataset(recipe) if recipe is not None else None
    created = _outermost_new_folder(run_dir)
    world = init_world(resolve_device(device))  # this process alone, or one rank of a torchrun launch
    try:
        with world.run_lock(run_dir):
            run = resolve_run(recipe, objective, run_dir, resume, allow_changes, init_from, compile)
            trainer = Trainer(run, world, stop_after, on_event)  # set up: data, model, optimizer, world
            trainer.loop()
            return trainer.finish()
    except HaedError as e:
        # A run refused before its first checkpoint leaves nothing behind.
        if world.is_main and created is not None and not step_dirs(run_dir) and not (run_dir / BEST).exists():
            shutil.rmtree(created, ignore_errors=True)
        last = latest_checkpoint(run_dir) if isinstance(e, WriteError) else None
        if last is not None:  # a full disk or a read-only folder mid-run: the saved checkpoints stand
            raise RunStopped(
                f"{e}; training stopped: the last intact checkpoint {last} is where --resume continues"
            ) from None
        raise


def _check_request(
    recipe: Recipe | None, objective: Objective, run_dir: Path, resume: bool, allow_changes: bool, init_from
) -> None:
    """What `train` refuses before it touches anything."""
    if objective.parent_objective and init_from is None and not resume:
        raise HaedError(f"the {objective.name} phase needs a {objective.parent_objective} run to start from")
    if recipe is None and not resume:
        raise HaedError("a recipe is needed to start a run")
    if allow_changes and not resume:
        raise HaedError("--allow-changes applies to --resume only: a new run takes the recipe as given")
    if resume and latest_intact_checkpoint(run_dir) is None:
        why = "that can be verified and loaded (each is named above)" if step_dirs(run_dir) else "to resume from"
        fix = "" if step_dirs(run_dir) else "; leave out --resume to start it"
        raise HaedError(f"--resume: {run_dir} has no checkpoint {why}{fix}")


def _outermost_new_folder(run_dir: Path) -> Path | None:
    """The outermost folder of `run_dir` that does not exist yet (what `train` creates), or None."""
    created = run_dir.absolute()
    while not created.parent.exists():
        created = created.parent
    return None if created.exists() else created


def finish_phase(
    recipe: Recipe,
    objective: Objective | str,
    run_dir: Path,
    *,
    init_from: Path | None = None,
    device: str = "auto",
    compile: bool | None = None,
    on_event: Callable[[dict], None] | None = None,
) -> TrainResult | None:
    """Bring the phase in `run_dir` to the end of its schedule: nothing if it is finished (None), a
    resume if it has a checkpoint, else a new run (from `init_from`, for the decoder phase). A stop request
    during the phase raises `StopRequested` once its checkpoint is written: the caller's next phase does
    not start (`timeout` or a cluster's time limit would otherwise only end the current one)."""
    objective = get_objective(objective)
    if phase_finished(run_dir, getattr(recipe, objective.section)):
        return None
    started = latest_intact_checkpoint(run_dir) is not None
    result = train(
        recipe,
        objective,
        run_dir,
        resume=started,
        init_from=None if started else init_from,
        device=device,
        compile=compile,
        on_event=on_event,
    )
    if result.interrupted:
        raise StopRequested(
            f"stopped by {result.interrupted} at step {result.step} of {run_dir}: checkpoint written; "
            "the same command continues from it",
            result.interrupted,
        )
    return result


def train_command(
    objective: Objective | str,
    out: Path | None = None,
    *,
    recipe_name: str | None = None,
    overrides: list[str] | None = None,
    values: dict | None = None,
    recipe: Recipe | None = None,
    resume: bool = False,
    **options,
) -> TrainResult:
    """`haed train-*`: the recipe named (default tiny) with `--set` overrides and typed values, or with
    `resume` and no recipe options the run's own, trained into `out` (default runs/RECIPE-OBJECTIVE).
    `options` go to `train`."""
    objective = get_objective(objective)
    run_dir = Path(out) if out is not None else Path("runs") / f"{recipe_name or 'tiny'}-{objective.name}"
    if recipe is None and (not resume or recipe_name or overrides or values):
        from_run = run_dir if resume and not recipe_name else None
        recipe = recipe_for_run(from_run, recipe_name or "tiny", overrides, values)
    return train(recipe, objective, run_dir, resume=resume, **options)
