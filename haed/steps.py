"""The pieces of a training step, shared by the trainer (`haed.train`) and the profiler (`haed.profile`).

The optimizer and its schedule, the batches of step s drawn reproducibly from (seed, s, micro-batch),
which parameters an objective trains, activation recomputation, compilation, one optimizer step and
validation.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from haed.config import CUDA_GRAPHS, TrainConfig, recompute_stacks
from haed.data import random_windows
from haed.device import autocast, host_to_device
from haed.model import HAED
from haed.objectives import Objective, trained_main_parts


def lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to lr * min_lr_ratio.

    The decay runs over the steps, or with a time budget over `progress` (the fraction of the
    budget's seconds spent).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if progress is None:
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def parameter_groups(params, cfg: TrainConfig) -> list[dict]:
    """AdamW's groups: matrices with weight decay, then vectors and scalars without. An optimizer state
    numbers the parameters in this order."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(parameter_groups(params, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def batch_rng(seed: int, step: int, micro: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, step, micro])


def torch_generator(seed: int, step: int, micro: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, 1, step, micro]).generate_state(1, dtype=np.uint64)[0] >> 1))
    return g


def to_device(windows: np.ndarray, device: torch.device) -> torch.Tensor:
    return host_to_device(torch.from_numpy(np.ascontiguousarray(windows)), device)


def apply_recompute(model, cfg: TrainConfig) -> None:
    """Recompute the activations of the stacks the phase names (plus those whose config asks for it)."""
    names = set(recompute_stacks(cfg.recompute))
    if isinstance(model, HAED):
        stacks = {"encoder": model.encoder, "main": model.main, "decoder": model.decoder.stack}
    elif hasattr(model, "stack"):
        stacks = {"main": model.stack}
    else:  # the MEGABYTE peer: its package has no recomputation
        stacks = {}
    for name, stack in stacks.items():
        stack.recompute = stack.cfg.recompute or name in names
    if isinstance(model, HAED):
        model.encoder.recompute_chunks = cfg.encoder_chunks


def set_train_mode(model, objective: Objective, cfg: TrainConfig | None = None) -> None:
    """Train mode, except for the parts the objective keeps frozen: they run as at inference (no dropout).
    The main model's blocks that the decoder phase trains (`cfg.main_layers`) are not frozen."""
    model.train()
    for name in objective.frozen_parts:
        getattr(model, name).eval()
    for module in trained_main_parts(model, cfg):
        module.train()


def set_trainable(model, objective: Objective, cfg: TrainConfig | None = None) -> list:
    """Freeze what the objective does not train; return the trained parameters."""
    params = objective.trained_parameters(model, cfg)
    trainable = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return params


def new_pass(cfg: TrainConfig, device: torch.device) -> None:
    """Before an optimizer step or a validation batch: with the stacks as CUDA graphs (`compile_mode =
    "reduce-overhead"`), tell torch's CUDA graph trees that a new iteration begins, so that they may reuse
    the memory of the last one's graph outputs. Nothing keeps those past it: the losses and metrics are
    computed outside the graphs, and the gradients are dropped after each optimizer step. Within a step,
    later micro-batches replay their own recordings, so the gradients accumulated so far stay intact."""
    if cfg.compile and cfg.compile_mode == CUDA_GRAPHS and device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


def train_step(
    model, optimizer, params, loss_fn, cfg: TrainConfig, batches, device, before_update=None
) -> tuple[dict, torch.Tensor]:
    """One optimizer step over the micro-batches [(x, generator), ...]: (mean metrics, grad norm).

    Metrics stay on the device (no host synchronisation inside the step). `before_update(optimizer)`,
    if given, runs on the clipped gradients just before the optimizer's update.
    """
    sums: dict[str, torch.Tensor] = {}
    new_pass(cfg, device)  # once per step: the micro-batches' gradients accumulate across their passes
    n = len(batches)
    for x, generator in batches:
        with autocast(device):
            loss, metrics = loss_fn(model, x, cfg, generator)
        # One micro-batch (the usual step) divides nothing: x / 1 is x, and each division or sum of a scalar
        # would be one more launch on a step whose time at short windows is the host's (docs/2026-12-06-big-corpora.md).
        (loss / n if n > 1 else loss).backward()
        for k, v in metrics.items():
            v = v.detach() if torch.is_tensor(v) else torch.tensor(float(v))
            v = v / n if n > 1 else v
            sums[k] = sums[k] + v if k in sums else v
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    if before_update is not None:
        before_update(optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm


def warm_up(model, loss_fn, cfg: TrainConfig, x: torch.Tensor, generator, device: torch.device) -> float:
    """One forward and backward pass of the objective on `x`, without an optimizer step, outside the time a
    budget counts: torch.compile compiles its graphs now, and the one-time costs of a process's first pass
    over new shapes fall here too (kernels loaded on first use, library handles, oneDNN primitives, the
    allocator's growth). Without it the first system of `haed compare` paid them inside its seconds: on
    the 2-core CPU, 8 steps of the first of four identical decoder phases in one process took 7.7 and
    7.5 s (two processes), the later ones 6.1-7.4 s. Returns the seconds it took.

    Nothing of the run changes: the gradients are dropped and every random number generator is put
    back as it was (dropout draws from them), so the run trains exactly as without the warm-up.
    """
    t = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        new_pass(cfg, device)
        with autocast(device):
            loss, _ = loss_fn(model, x, cfg, generator)
        loss.backward()
    for p in model.parameters():
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def allow_recompiles(limit: int = 64) -> None:
    """Room for one compiled graph per shape and mode. torch.compile keeps at most 8 graphs per function
    by default, and then runs it eagerly, with only a warning. Every stack (encoder, main model,
    decoder, flat) is the one `Stack.forward`, and each of them makes a graph for training and one for
    validation, per shape: counted on the CPU (backend aot_eager), one process that trains IEM and
    validates it, trains a decoder phase, then trains and validates a flat model (as `haed compare`
    does) reached the limit at the flat model's validation."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(int(getattr(config, name)), limit))
            break


def maybe_compile(model, enabled: bool, device: torch.device, mode: str = "default"):
    """Compile the transformer stacks (not the data-dependent IEM bookkeeping around them), on CUDA, in
    torch.compile's `mode`."""
    if enabled and device.type == "cuda":
        compile_stacks(model, mode)


def compile_stacks(model, mode: str = "default") -> None:
    """torch.compile each transformer stack of `model` in `mode`, and IEM's patch score (on any device:
    benchmarks/trace_step.py compiles them on the CPU to count what stays uncompiled around them)."""
    allow_recompiles()
    mode = None if mode == "default" else mode
    if isinstance(model, HAED):
        model.main.compile(mode=mode)
        model.decoder.stack.compile(mode=mode)
        # The whole encoder, embedding and projection too: recomputed in chunks (`PatchEncoder`), the chunks'
        # recomputation is then part of one compiled backward pass, not a dozen calls on the host. Its row
        # count (distinct patches, padded to `row_bucket`) changes from step to step: marked dynamic
        # (`HAED.encode_patches`), one graph for every count, and as CUDA graphs one recording for every
        # count (at most 32 at the recipes' 16,384 patches a step). In the phase's mode like the stacks: as
        # CUDA graphs IEM's step at seq 2,048 took 17.4-19.3 ms (medians of four runs) against 18.5 in the
        # default mode (one run), and full training's 23.2-24.0 against 24.5 (one H100,
        # docs/2026-12-06-big-corpora.md, tenth session). The score and IEM's softmax stay in the default
        # mode: as CUDA graphs they gained nothing measurable there. (Not `dynamic=True`: it makes the blocks'
        # float settings symbolic too, and torch.compile 2.13 then fails to trace them inside a checkpointed
        # chunk.)
        model.encoder.compile(mode=mode)
        compile_score(model)
    elif hasattr(model, "stack"):
        model.stack.compile(mode=mode)
    else:  # the MEGABYTE peer: the whole package model
        model.net.compile(mode=mode)


def compile_score(model: HAED) -> None:
    """torch.compile IEM's patch score, `model.score_vectors` (its projection and the cosine's three
    normalisations): forward and backward about 60 small operators a step, each a launch on the host of
    a host-bound IEM step (trace at seq 2,048 on an H100: GPU busy 15.5 of 28 ms); compiled, a few fused
    kernels. An instance attribute: the weights and the checkpoint stay the model's. The candidate count
    varies: dynamic shapes. Under FSDP2 (several processes) its weights are shards gathered by hooks
    outside it: left eager there."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        model.score_vectors = torch.compile(model.score_vectors, dynamic=True)


@torch.no_grad()
def evaluate_objective(
    model, objective: Objective, data: np.ndarray, cfg: TrainConfig, seq_len: int, device, world=None, loss_fn=None
) -> dict:
    """Mean metrics of the objective over `cfg.eval_batches` fixed validation batches.

    With a `world` of several ranks each rank takes its block of every batch (`loss_fn`: the
    parallelized objective) and the metrics are averaged over the ranks.
    """
    was_training = model.training
    model.eval()
    loss_fn = loss_fn or objective
    draw = world.windows if world is not None else random_windows
    totals: dict[str, float] = {}
    for i in range(cfg.eval_batches):
        x = to_device(draw(data, cfg.batch_size, seq_len, batch_rng(cfg.seed, i, 0, stream=7)), device)
        new_pass(cfg, device)
        with autocast(device):
            _, metrics = loss_fn(model, x, cfg, torch_generator(cfg.seed, i, 0))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    if was_training:
        set_train_mode(model, objective, cfg)
    means = {k: v / cfg.eval_batches for k, v in totals.items()}
    return world.mean(means) if world is not None else means
