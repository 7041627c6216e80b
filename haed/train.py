"""One training loop for every objective: IEM, decoder phase, full, and the flat baseline.

AdamW, linear warm-up then cosine decay, gradient clipping and accumulation, bf16 autocast on CUDA
(float32 on CPU), periodic validation, atomic checkpoints and exact resume. The batch of step s,
micro-batch m is drawn from a generator seeded by (seed, s, m), so a resumed run sees exactly the
batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from haed.atomic import write_text_atomic
from haed.checkpoint import (
    BEST,
    latest_checkpoint,
    latest_intact_checkpoint,
    load_weights,
    read_run_config,
    read_state,
    select_checkpoint,
    step_dirs,
    wait_for_writer,
)
from haed.config import Recipe, TrainConfig
from haed.data import open_dataset
from haed.device import resolve_device
from haed.distributed import init_world
from haed.errors import HaedError, RunStopped, WriteError
from haed.guards import NonFiniteWatch, StopRequests, preflight
from haed.model import build_model
from haed.objectives import OBJECTIVES, get_objective
from haed.runs import (
    absolute_dataset,
    append_metrics,
    new_run_config,
    phase_finished,
    plot_metrics,
    read_best,
    recipe_for_run,
    resumed_recipe,
    truncate_metrics,
)
from haed.steps import (
    apply_recompute,
    batch_rng,
    evaluate_objective,
    lr_at,
    make_optimizer,
    maybe_compile,
    set_train_mode,
    set_trainable,
    to_device,
    torch_generator,
    train_step,
    warm_up_compiled,
)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_metrics: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    best: dict | None = None  # {"step", "metric", "value", "path"} of the best validation point
    train_seconds: float = 0.0  # seconds of training (validation and checkpoints not counted)
    interrupted: str | None = None  # the signal that stopped the run early ("SIGINT", "SIGTERM"), if any


def _emit(on_event, event: str, **fields) -> None:
    if on_event is not None:
        on_event({"event": event, **fields})


def train(
    recipe: Recipe | None,
    objective: str,
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
    """Train `recipe`'s model with `objective` ("iem", "decoder", "full", "flat") into `run_dir`.

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
    spec = get_objective(objective)
    run_dir = Path(run_dir)
    if spec.parent_objective and init_from is None and not resume:
        raise HaedError(f"the {objective} phase needs a {spec.parent_objective} run to start from")
    if recipe is None and not resume:
        raise HaedError("a recipe is needed to start a run")
    if allow_changes and not resume:
        raise HaedError("--allow-changes applies to --resume only: a new run takes the recipe as given")
    if resume and latest_intact_checkpoint(run_dir) is None:
        why = "that can be verified and loaded (each is named above)" if step_dirs(run_dir) else "to resume from"
        fix = "" if step_dirs(run_dir) else "; leave out --resume to start it"
        raise HaedError(f"--resume: {run_dir} has no checkpoint {why}{fix}")
    if init_from is not None and not resume:  # a parent still training would hand over a moment of its run
        wait_for_writer(Path(init_from), wait_for_parent, lambda text: _emit(on_event, "message", text=text))
    recipe = absolute_dataset(recipe) if recipe is not None else None
    created = run_dir.absolute()  # the outermost folder this call creates, if any
    while not created.parent.exists():
        created = created.parent
    created = None if created.exists() else created
    world = init_world(resolve_device(device))  # this process alone, or one rank of a torchrun launch
    try:
        with world.run_lock(run_dir):
            return _train_locked(
                recipe, spec, run_dir, resume, allow_changes, init_from, device, stop_after, compile, on_event
            )
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


def _train_locked(
    recipe, spec, run_dir, resume, allow_changes, init_from, device, stop_after, compile, on_event
) -> TrainResult:
    objective = spec.name
    previous = checkpoint = None
    if resume:
        checkpoint = latest_intact_checkpoint(run_dir)
        recipe, previous = resumed_recipe(run_dir, objective, recipe, allow_changes)
    elif step_dirs(run_dir):
        raise HaedError(f"{run_dir} already holds a run: pass --resume to continue it or choose another --out")
    if recipe.model.arch != spec.arch:
        raise HaedError(f"the {objective} objective trains model.arch = {spec.arch!r}, not {recipe.model.arch!r}")
    cfg: TrainConfig = getattr(recipe, spec.section)
    if compile is not None:  # for every compiled part: the stacks and IEM's chunked softmax
        cfg = replace(cfg, compile=compile)
    world = init_world(resolve_device(device))
    dev = world.device  # with several ranks on CUDA, this rank's GPU
    if not world.is_main:
        on_event = None  # rank 0 reports and writes for every rank
    torch.manual_seed(cfg.seed)

    dataset = open_dataset(recipe.data.dataset)
    train_data = dataset.split("train")
    validating = bool(cfg.eval_every or cfg.eval_every_seconds)
    valid_data = dataset.split("valid") if validating else None
    seq_len = recipe.data.seq_len

    model = build_model(recipe.model)
    config = new_run_config(recipe, objective, dataset, model, init_from, cfg, dev, world.size)
    preflight(run_dir, model, cfg, {"train": train_data, **({"valid": valid_data} if validating else {})}, seq_len)

    start_step, train_seconds, optimizer_state = 0, 0.0, None
    if checkpoint is not None:
        load_weights(model, checkpoint)
        optimizer_state = world.load_optimizer_state(checkpoint, dev)
        state = read_state(checkpoint)
        start_step, train_seconds = state["step"], float(state.get("train_seconds", 0.0))
        config["parent_run"] = previous.get("parent_run")
        config["parent_checkpoint"] = previous.get("parent_checkpoint")
        spent = f", {train_seconds:.1f} s of training done" + (
            f" of a {cfg.time_budget:g} s budget" if cfg.time_budget else ""
        )
        _emit(on_event, "message", text=f"resuming {run_dir} from step {start_step} ({checkpoint.name}{spent})")
        before = state.get("world_size", 1)  # recorded by multi-process checkpoints only
        if before != world.size:
            was, now = previous.get("global_batch", {}).get("windows"), config["global_batch"]["windows"]
            _emit(
                on_event,
                "message",
                text=f"the checkpoint was written by {before} process{'es' * (before > 1)}, "
                f"this run has {world.size}: the global batch is {now} windows per step"
                + (f" (it was {was})" if was and was != now else ""),
            )
    elif init_from is not None:
        parent_checkpoint = select_checkpoint(Path(init_from), BEST)
        parent_config = read_run_config(Path(init_from))
        if parent_config["recipe"]["model"] != recipe.to_dict()["model"]:
            raise HaedError(f"the model configuration differs from the run {init_from}")
        load_weights(model, parent_checkpoint)
        config["parent_checkpoint"] = str(parent_checkpoint.resolve())
        _emit(on_event, "message", text=f"starting from {parent_checkpoint}")

    model.to(dev)
    set_train_mode(model, objective, cfg)
    params = set_trainable(model, objective, cfg)
    apply_recompute(model, cfg)
    loss_fn, params = world.parallelize(model, OBJECTIVES[objective], params, cfg.seed)  # FSDP2 with several ranks
    optimizer = make_optimizer(params, cfg, dev)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    elif checkpoint is not None:
        world.load_training_state(checkpoint, model, optimizer)  # DCP shards, or a one-process checkpoint
    maybe_compile(model, objective, cfg.compile, dev)
    if checkpoint is not None:
        world.restore_rng_state(checkpoint)

    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    if world.is_main:
        write_text_atomic(run_dir / "config.json", json.dumps(config, indent=2))
        truncate_metrics(metrics_path, start_step)

    best = read_best(run_dir, spec.selection_metric)
    if cfg.compile and dev.type == "cuda":
        # Compile before the clock starts: a time budget buys training steps, not compilation.
        x = to_device(world.windows(train_data, cfg.batch_size, seq_len, batch_rng(cfg.seed, start_step, 0)), dev)
        seconds = warm_up_compiled(model, loss_fn, cfg, x, torch_generator(cfg.seed, start_step, 0), dev)
        config["compile_seconds"] = round(seconds, 2)
        _emit(on_event, "message", text=f"compiled in {seconds:.1f} s (not counted as training time)")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    budget = cfg.time_budget
    # With a budget (or timed validation) each step is timed to the end of its GPU work; otherwise the
    # host runs ahead and the pending work is charged to training whenever the loop synchronises.
    timed_steps = dev.type == "cuda" and bool(budget or cfg.eval_every_seconds)
    bytes_per_step = config["global_batch"]["bytes"]
    max_steps = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    result = TrainResult(
        run_dir=run_dir,
        step=start_step,
        train_seconds=train_seconds,
        best={**best, "path": str(run_dir / BEST)} if best["value"] < math.inf else None,
    )
    nonfinite = NonFiniteWatch(dev, f"--set {spec.section}.lr=..., now {cfg.lr:g}")
    last_checkpoint = (
        f"the last checkpoint is {checkpoint.name}" if checkpoint is not None else "no checkpoint was written"
    )
    next_eval_seconds = _next_multiple(train_seconds, cfg.eval_every_seconds)
    window_seconds, window_steps = 0.0, 0
    _emit(
        on_event,
        "start",
        objective=objective,
        run_dir=str(run_dir),
        unit="seconds" if budget else "steps",
        total=budget if budget else cfg.steps,
        completed=train_seconds if budget else start_step,
        parameters=config["parameters"],
    )

    def synchronise() -> float:
        """Wait for queued GPU work; return the seconds waited (charged to training)."""
        if dev.type != "cuda":
            return 0.0
        t = time.perf_counter()
        torch.cuda.synchronize()
        return time.perf_counter() - t

    done = start_step
    with StopRequests() as stop:
        world.defer_stop_requests(stop)
        while done < max_steps and not (budget and train_seconds >= budget) and stop.signal is None:
            step = done
            t0 = time.perf_counter()
            progress = train_seconds / budget if budget else None
            lr = lr_at(step, cfg, progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [
                (
                    to_device(
                        world.windows(train_data, cfg.batch_size, seq_len, batch_rng(cfg.seed, step, micro)), dev
                    ),
                    torch_generator(cfg.seed, step, micro),
                )
                for micro in range(cfg.grad_accum)
            ]
            sums, grad_norm = train_step(model, optimizer, params, loss_fn, cfg, batches, dev)
            sums, grad_norm = world.reduce_step(sums, grad_norm)
            done = step + 1
            nonfinite.update(done, sums["loss"], grad_norm)
            if timed_steps:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            train_seconds += elapsed
            window_seconds += elapsed
            window_steps += 1
            train_seconds = world.agree(train_seconds, stop)  # rank 0's clock and any rank's stop request

            schedule_done = done >= cfg.steps or bool(budget and train_seconds >= budget)
            last = done >= max_steps or schedule_done
            log_now = done % cfg.log_every == 0 or last
            eval_now = validating and (
                (cfg.eval_every and done % cfg.eval_every == 0)
                or schedule_done
                or (cfg.eval_every_seconds and train_seconds >= next_eval_seconds)
            )
            ckpt_now = done % cfg.ckpt_every == 0 or last or stop.signal is not None
            if log_now or eval_now or ckpt_now:
                waited = synchronise()
                train_seconds += waited
                window_seconds += waited
                train_seconds = world.agree(train_seconds)
                nonfinite.check(last_checkpoint)
            if log_now:
                rate = bytes_per_step * window_steps / max(window_seconds, 1e-9)
                window_seconds, window_steps = 0.0, 0
                record = {
                    "step": done,
                    "split": "train",
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "bytes_per_second": rate,
                    "train_seconds": round(train_seconds, 4),
                    **{k: float(v) for k, v in sums.items()},
                }
                if world.is_main:
                    append_metrics(metrics_path, record)
                result.last_metrics = record
                _emit(on_event, "log", **record)
            if eval_now:
                next_eval_seconds = _next_multiple(train_seconds, cfg.eval_every_seconds)
                record = {
                    "step": done,
                    "split": "valid",
                    "train_seconds": round(train_seconds, 4),
                    **evaluate_objective(model, objective, valid_data, cfg, seq_len, dev, world, loss_fn),
                }
                if world.is_main:
                    append_metrics(metrics_path, record)
                result.last_eval = record
                _emit(on_event, "valid", **record)
                value = record.get(spec.selection_metric, math.inf)
                if value < best["value"]:
                    best = {
                        "step": done,
                        "metric": spec.selection_metric,
                        "value": value,
                        "train_seconds": round(train_seconds, 4),
                    }
                    world.save_checkpoint(
                        run_dir, done, model, None, {**best, "objective": objective}, config, name=BEST
                    )
                    result.best = {**best, "path": str(run_dir / BEST)}
                    _emit(on_event, "best", **result.best)
            if ckpt_now:
                state = {
                    "step": done,
                    "objective": objective,
                    "bytes_seen": done * bytes_per_step,
                    "train_seconds": train_seconds,
                }
                final = last or stop.signal is not None  # several ranks gather the whole weights then only
                path = world.save_checkpoint(run_dir, done, model, optimizer, state, config, consolidated=final)
                last_checkpoint = f"the last checkpoint is {path.name}"
                _emit(on_event, "checkpoint", step=done, path=str(path))
            result.step, result.train_seconds = done, train_seconds
            _emit(on_event, "progress", completed=train_seconds if budget else done)
        result.interrupted = stop.signal
    if result.interrupted:
        _emit(
            on_event,
            "message",
            text=f"stopped by {result.interrupted} at step {done}: checkpoint written; continue with --resume",
        )
    config["train_seconds"] = round(train_seconds, 4)
    config["steps_done"] = done
    if dev.type == "cuda":
        config["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    if world.is_main:
        write_text_atomic(run_dir / "config.json", json.dumps(config, indent=2))
    _emit(on_event, "end", step=done, train_seconds=train_seconds)
    if world.is_main:
        plot_metrics(metrics_path, run_dir / "metrics.png")
    return result


def _next_multiple(seconds: float, every: float) -> float:
    return math.inf if not every else (math.floor(seconds / every) + 1) * every


def finish_phase(
    recipe: Recipe,
    objective: str,
    run_dir: Path,
    *,
    init_from: Path | None = None,
    device: str = "auto",
    compile: bool | None = None,
    on_event: Callable[[dict], None] | None = None,
) -> TrainResult | None:
    """Bring the phase in `run_dir` to the end of its schedule: nothing if it is finished (None), a
    resume if it has a checkpoint, else a new run (from `init_from`, for the decoder phase)."""
    if phase_finished(run_dir, getattr(recipe, get_objective(objective).section)):
        return None
    started = latest_intact_checkpoint(run_dir) is not None
    return train(
        recipe,
        objective,
        run_dir,
        resume=started,
        init_from=None if started else init_from,
        device=device,
        compile=compile,
        on_event=on_event,
    )


def train_command(
    objective: str,
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
    run_dir = Path(out) if out is not None else Path("runs") / f"{recipe_name or 'tiny'}-{objective}"
    if recipe is None and (not resume or recipe_name or overrides or values):
        from_run = run_dir if resume and not recipe_name else None
        recipe = recipe_for_run(from_run, recipe_name or "tiny", overrides, values)
    return train(recipe, objective, run_dir, resume=resume, **options)
