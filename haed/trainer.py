"""The one training loop of every objective, as named steps: set up (data, model and its start state,
optimizer, run directory, clock), the loop (a step; then logging, validation and checkpoints where due),
and the finish. `haed.train.train` settles which run to train (fresh or resumed) and runs a `Trainer`.

AdamW, linear warm-up then cosine decay, gradient clipping and accumulation, bf16 autocast on CUDA
(float32 on CPU), periodic validation, atomic checkpoints and exact resume. The batch of step s,
micro-batch m is drawn from a generator seeded by (seed, s, m), so a resumed run sees exactly the
batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from haed.atomic import write_text_atomic
from haed.checkpoint import BEST, load_weights, read_run_config, read_state, select_checkpoint
from haed.config import CUDA_GRAPHS
from haed.data import open_dataset
from haed.distributed import World, global_candidates
from haed.errors import HaedError
from haed.guards import NonFiniteWatch, StopRequests, preflight
from haed.model import build_model
from haed.parent_moments import carry_parent_moments, raise_second_moments
from haed.runs import TrainingRun, append_metrics, new_run_config, plot_metrics, read_best, truncate_metrics
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
    warm_up,
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


def emit(on_event: Callable[[dict], None] | None, event: str, **fields) -> None:
    if on_event is not None:
        on_event({"event": event, **fields})


class Trainer:
    """One run's training. Made, it is set up: the data, the model with the weights it starts from, the
    optimizer (sharded with several ranks), the run directory and the clock; `loop()` trains; `finish()`
    records what was done and returns it."""

    def __init__(self, run: TrainingRun, world: World, stop_after: int | None, on_event: Callable[[dict], None] | None):
        self.run, self.world, self.objective, self.cfg = run, world, run.objective, run.cfg
        self.dev = world.device  # with several ranks on CUDA, this rank's GPU
        self.on_event = on_event if world.is_main else None  # rank 0 reports and writes for every rank
        if world.size > 1:
            self.cfg = self._without_one_process_settings(world.size)
        torch.manual_seed(self.cfg.seed)
        self._set_up_data()
        self._set_up_model()
        self._set_up_run_dir()
        self._set_up_clock(stop_after)

    def _emit(self, event: str, **fields) -> None:
        emit(self.on_event, event, **fields)

    # -- set-up ------------------------------------------------------------------------------------

    def _without_one_process_settings(self, world_size: int):
        """The phase's settings with those that train in one process only turned off, each said in one line."""
        cfg, section = self.cfg, self.run.objective.section
        if cfg.compile_mode == CUDA_GRAPHS:
            # CUDA graphs are untried with FSDP2's hooks and collectives between the blocks. The code and music
            # recipes ask for graphs (one GPU's fastest step): under torchrun the same recipe trains, compiled in
            # the default mode, and the run's config records the mode that ran.
            cfg = dataclasses.replace(cfg, compile_mode="default")
            self._emit(
                "message",
                text=f"{section}.compile_mode = 'reduce-overhead' (CUDA graphs) trains in one process only: "
                f"these {world_size} processes take torch.compile's default mode",
            )
        if cfg.fixed_shapes:
            # Several ranks gather each other's distinct patches by their count (IEM, haed.distributed), and a
            # loss compiled whole is untried with FSDP2's hooks and collectives.
            cfg = dataclasses.replace(cfg, fixed_shapes=False)
            self._emit(
                "message",
                text=f"{section}.fixed_shapes = true trains in one process only: these {world_size} processes "
                "count their distinct patches on the host",
            )
        return cfg

    def _set_up_data(self) -> None:
        cfg = self.cfg
        self.dataset = open_dataset(self.run.recipe.data.dataset)
        self.train_data = self.dataset.split("train")
        self.validating = bool(cfg.eval_every or cfg.eval_every_seconds)
        self.valid_data = self.dataset.split("valid") if self.validating else None
        self.seq_len = self.run.recipe.data.seq_len

    def _set_up_model(self) -> None:
        """The model from the run's start (a checkpoint, a parent run or fresh weights), frozen, recomputed,
        parallelized and compiled as its objective asks, and its optimizer."""
        run, cfg, dev, world, objective = self.run, self.cfg, self.dev, self.world, self.objective
        self.model = model = build_model(run.recipe.model)
        self.config = new_run_config(run.recipe, objective, self.dataset, model, run.init_from, cfg, dev, world.size)
        splits = {"train": self.train_data, **({"valid": self.valid_data} if self.validating else {})}
        preflight(run.run_dir, model, cfg, splits, self.seq_len)
        optimizer_state = self._load_start()
        model.to(dev)
        set_train_mode(model, objective, cfg)
        params = set_trainable(model, objective, cfg)
        apply_recompute(model, cfg)
        if world.size > 1:  # IEM's candidates: the distinct patches of every rank's batch
            objective = objective.across_ranks(global_candidates)
        self.loss_fn, self.params = world.parallelize(model, objective, params, cfg.seed)  # FSDP2 with several ranks
        self.optimizer = make_optimizer(self.params, cfg, dev)
        self.before_first_update = None  # runs once, on the first step's clipped gradients
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        elif run.checkpoint is not None:
            world.load_training_state(run.checkpoint, model, self.optimizer)  # DCP shards, or a one-process checkpoint
        elif run.init_from is not None and cfg.carry_moments:
            self._carry_moments(Path(run.init_from))
        maybe_compile(model, cfg.compile, dev, cfg.compile_mode)
        if run.checkpoint is not None:
            world.restore_rng_state(run.checkpoint)

    def _load_start(self) -> dict | None:
        """The weights the run starts from, and where it starts (step, seconds); for a one-process resume also
        the optimizer state (returned; else None)."""
        self.start_step, self.train_seconds = 0, 0.0
        if self.run.checkpoint is not None:
            return self._resume(self.run.checkpoint)
        if self.run.init_from is not None:
            self._start_from_parent(Path(self.run.init_from))
        return None

    def _resume(self, checkpoint: Path) -> dict | None:
        cfg, world, config, previous = self.cfg, self.world, self.config, self.run.previous
        load_weights(self.model, checkpoint)
        optimizer_state = world.load_optimizer_state(checkpoint, self.dev)
        state = read_state(checkpoint)
        self.start_step, self.train_seconds = state["step"], float(state.get("train_seconds", 0.0))
        config["parent_run"] = previous.get("parent_run")
        config["parent_checkpoint"] = previous.get("parent_checkpoint")
        spent = f", {self.train_seconds:.1f} s of training done" + (
            f" of a {cfg.time_budget:g} s budget" if cfg.time_budget else ""
        )
        where = f"{self.run.run_dir} from step {self.start_step} ({checkpoint.name}{spent})"
        self._emit("message", text=f"resuming {where}")
        before = state.get("world_size", 1)  # recorded by multi-process checkpoints only
        if before != world.size:
            was, now = previous.get("global_batch", {}).get("windows"), config["global_batch"]["windows"]
            self._emit(
                "message",
                text=f"the checkpoint was written by {before} process{'es' * (before > 1)}, "
                f"this run has {world.size}: the global batch is {now} windows per step"
                + (f" (it was {was})" if was and was != now else ""),
            )
        return optimizer_state

    def _carry_moments(self, parent_run: Path) -> None:
        if self.world.size > 1:
            raise HaedError(
                f"{self.objective.section}.carry_moments runs in one process: train this phase without torchrun, "
                f"or without carry_moments"
            )
        checkpoint, carried, trained = carry_parent_moments(self.model, self.optimizer, parent_run)
        self._emit("message", text=f"AdamW starts from the moments in {checkpoint} ({carried} of {trained} parameters)")
        if self.cfg.match_moments:
            self.before_first_update = self._match_moments

    def _match_moments(self, optimizer) -> None:
        """Before the first update of a phase with carried moments: raise them to its first gradients."""
        factors = sorted(raise_second_moments(optimizer))
        if factors:
            median = factors[len(factors) // 2]
            self._emit(
                "message",
                text=f"raised the carried second moments of {len(factors)} parameters to their first gradients "
                f"(root mean square x{median:.2f} median, x{factors[-1]:.2f} most)",
            )

    def _start_from_parent(self, init_from: Path) -> None:
        parent_checkpoint = select_checkpoint(init_from, BEST)
        parent_config = read_run_config(init_from)
        if parent_config["recipe"]["model"] != self.run.recipe.to_dict()["model"]:
            raise HaedError(f"the model configuration differs from the run {init_from}")
        load_weights(self.model, parent_checkpoint)
        self.config["parent_checkpoint"] = str(parent_checkpoint.resolve())
        self._emit("message", text=f"starting from {parent_checkpoint}")

    def _set_up_run_dir(self) -> None:
        run_dir = self.run.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        if self.world.is_main:
            write_text_atomic(run_dir / "config.json", json.dumps(self.config, indent=2))
            truncate_metrics(self.metrics_path, self.start_step)
        self.best = read_best(run_dir, self.objective.selection_metric)

    def _set_up_clock(self, stop_after: int | None) -> None:
        """Compilation and a warm-up pass before the clock starts, then what the loop counts: steps,
        seconds, the best point."""
        cfg, dev, run_dir = self.cfg, self.dev, self.run.run_dir
        compiling = cfg.compile and dev.type == "cuda"
        if compiling or cfg.time_budget:
            # A time budget buys training steps, not compilation or a first pass's one-time costs.
            rng = batch_rng(cfg.seed, self.start_step, 0)
            x = to_device(self.world.windows(self.train_data, cfg.batch_size, self.seq_len, rng), dev)
            generator = torch_generator(cfg.seed, self.start_step, 0)
            seconds = warm_up(self.model, self.loss_fn, cfg, x, generator, dev)
            self.config["compile_seconds" if compiling else "warm_up_seconds"] = round(seconds, 2)
            done = "compiled" if compiling else "warmed up"
            self._emit("message", text=f"{done} in {seconds:.1f} s (not counted as training time)")
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        self.budget = cfg.time_budget
        # With a budget (or timed validation) each step is timed to the end of its GPU work; otherwise the
        # host runs ahead and the pending work is charged to training whenever the loop synchronises.
        self.timed_steps = dev.type == "cuda" and bool(self.budget or cfg.eval_every_seconds)
        self.bytes_per_step = self.config["global_batch"]["bytes"]
        self.max_steps = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
        best = self.best
        self.result = TrainResult(
            run_dir=run_dir,
            step=self.start_step,
            train_seconds=self.train_seconds,
            best={**best, "path": str(run_dir / BEST)} if best["value"] < math.inf else None,
        )
        self.nonfinite = NonFiniteWatch(dev, f"--set {self.objective.section}.lr=..., now {cfg.lr:g}")
        checkpoint = self.run.checkpoint
        self.last_checkpoint = (
            f"the last checkpoint is {checkpoint.name}" if checkpoint is not None else "no checkpoint was written"
        )
        self.next_eval_seconds = _next_multiple(self.train_seconds, cfg.eval_every_seconds)
        self.window_seconds, self.window_steps = 0.0, 0
        self.done = self.checkpointed = self.start_step

    # -- the loop ----------------------------------------------------------------------------------

    def loop(self) -> None:
        """Steps until the schedule ends, the budget is spent, `stop_after` is reached or a stop is requested
        (Ctrl-C, SIGTERM: the step finishes and is checkpointed)."""
        self._emit(
            "start",
            objective=self.objective.name,
            run_dir=str(self.run.run_dir),
            unit="seconds" if self.budget else "steps",
            total=self.budget if self.budget else self.cfg.steps,
            completed=self.train_seconds if self.budget else self.start_step,
            parameters=self.config["parameters"],
        )
        with StopRequests() as stop:
            self.world.defer_stop_requests(stop)
            while (
                self.done < self.max_steps
                and not (self.budget and self.train_seconds >= self.budget)
                and stop.signal is None
            ):
                self._step(stop)
            if stop.signal is not None and self.done > self.checkpointed:
                # One process notes a request the moment it arrives, so it can come after the step's check.
                self._checkpoint(final=True)
            self.result.interrupted = stop.signal

    def _step(self, stop: StopRequests) -> None:
        """One optimizer step, timed; then logging, validation and a checkpoint where they are due."""
        cfg, step = self.cfg, self.done
        t0 = time.perf_counter()
        lr = lr_at(step, cfg, self.train_seconds / self.budget if self.budget else None)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        first, self.before_first_update = self.before_first_update, None
        sums, grad_norm = train_step(
            self.model, self.optimizer, self.params, self.loss_fn, cfg, self._batches(step), self.dev, first
        )
        sums, grad_norm = self.world.reduce_step(sums, grad_norm)
        self.done = done = step + 1
        self.nonfinite.update(done, sums["loss"], grad_norm)
        if self.timed_steps:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        self.train_seconds += elapsed
        self.window_seconds += elapsed
        self.window_steps += 1
        self.train_seconds = self.world.agree(self.train_seconds, stop)  # rank 0's clock and any rank's stop request

        schedule_done = done >= cfg.steps or bool(self.budget and self.train_seconds >= self.budget)
        last = done >= self.max_steps or schedule_done
        log_now = done % cfg.log_every == 0 or last
        eval_now = self.validating and (
            (cfg.eval_every and done % cfg.eval_every == 0)
            or schedule_done
            or (cfg.eval_every_seconds and self.train_seconds >= self.next_eval_seconds)
        )
        ckpt_now = done % cfg.ckpt_every == 0 or last or stop.signal is not None
        if log_now or eval_now or ckpt_now:
            self._synchronise()
        if log_now:
            self._log(lr, sums, grad_norm)
        if eval_now:
            self._validate()
        if ckpt_now:
            self._checkpoint(final=last or stop.signal is not None)
        self.result.step, self.result.train_seconds = done, self.train_seconds
        self._emit("progress", completed=self.train_seconds if self.budget else done)

    def _batches(self, step: int) -> list:
        """The micro-batches of `step`: this rank's windows and the loss's generator, each from (seed, step, m)."""
        cfg = self.cfg
        return [
            (
                to_device(
                    self.world.windows(self.train_data, cfg.batch_size, self.seq_len, batch_rng(cfg.seed, step, micro)),
                    self.dev,
                ),
                torch_generator(cfg.seed, step, micro),
            )
            for micro in range(cfg.grad_accum)
        ]

    def _synchronise(self) -> None:
        """Wait for queued GPU work (its seconds charged to training), agree on the clock, and stop on a
        non-finite loss before anything is logged or written."""
        waited = 0.0
        if self.dev.type == "cuda":
            t = time.perf_counter()
            torch.cuda.synchronize()
            waited = time.perf_counter() - t
        self.train_seconds += waited
        self.window_seconds += waited
        self.train_seconds = self.world.agree(self.train_seconds)
        self.nonfinite.check(self.last_checkpoint)

    def _log(self, lr: float, sums: dict, grad_norm) -> None:
        rate = self.bytes_per_step * self.window_steps / max(self.window_seconds, 1e-9)
        self.window_seconds, self.window_steps = 0.0, 0
        record = {
            "step": self.done,
            "split": "train",
            "lr": lr,
            "grad_norm": float(grad_norm),
            "bytes_per_second": rate,
            "train_seconds": round(self.train_seconds, 4),
            **{k: float(v) for k, v in sums.items()},
        }
        if self.world.is_main:
            append_metrics(self.metrics_path, record)
        self.result.last_metrics = record
        self._emit("log", **record)

    def _validate(self) -> None:
        """Validation metrics; a new best point is kept as the run's best checkpoint."""
        cfg, done, objective, run_dir = self.cfg, self.done, self.objective, self.run.run_dir
        self.next_eval_seconds = _next_multiple(self.train_seconds, cfg.eval_every_seconds)
        record = {
            "step": done,
            "split": "valid",
            "train_seconds": round(self.train_seconds, 4),
            **evaluate_objective(
                self.model, objective, self.valid_data, cfg, self.seq_len, self.dev, self.world, self.loss_fn
            ),
        }
        if self.world.is_main:
            append_metrics(self.metrics_path, record)
        self.result.last_eval = record
        self._emit("valid", **record)
        value = record.get(objective.selection_metric, math.inf)
        if value < self.best["value"]:
            self.best = {
                "step": done,
                "metric": objective.selection_metric,
                "value": value,
                "train_seconds": round(self.train_seconds, 4),
            }
            self.world.save_checkpoint(
                run_dir, done, self.model, None, {**self.best, "objective": objective.name}, self.config, name=BEST
            )
            self.result.best = {**self.best, "path": str(run_dir / BEST)}
            self._emit("best", **self.result.best)

    def _checkpoint(self, final: bool) -> None:
        """A step checkpoint; `final` (the last, or a stop request's) also holds the whole weights with
        several ranks."""
        done = self.done
        state = {
            "step": done,
            "objective": self.objective.name,
            "bytes_seen": done * self.bytes_per_step,
            "train_seconds": self.train_seconds,
        }
        path = self.world.save_checkpoint(
            self.run.run_dir, done, self.model, self.optimizer, state, self.config, consolidated=final
        )
        self.checkpointed = done
        self.last_checkpoint = f"the last checkpoint is {path.name}"
        self._emit("checkpoint", step=done, path=str(path))

    # -- the finish ----------------------------------------------------------------------------------

    def finish(self) -> TrainResult:
        """The run's config.json with the seconds and steps done (and peak GPU memory), the end event, the plot."""
        done, config, run_dir = self.done, self.config, self.run.run_dir
        if self.result.interrupted:
            self._emit(
                "message",
                text=f"stopped by {self.result.interrupted} at step {done}: checkpoint written; continue with --resume",
            )
        config["train_seconds"] = round(self.train_seconds, 4)
        config["steps_done"] = done
        if self.dev.type == "cuda":
            config["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.dev) / 2**30
        if self.world.is_main:
            write_text_atomic(run_dir / "config.json", json.dumps(config, indent=2))
        self._emit("end", step=done, train_seconds=self.train_seconds)
        if self.world.is_main:
            plot_metrics(self.metrics_path, run_dir / "metrics.png")
        return self.result


def _next_multiple(seconds: float, every: float) -> float:
    return math.inf if not every else (math.floor(seconds / every) + 1) * every
