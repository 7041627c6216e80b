"""One training loop for every objective: IEM, decoder phase, full, and the flat baseline.

AdamW, linear warm-up then cosine decay, gradient clipping and accumulation, bf16 autocast on CUDA
(float32 on CPU), periodic validation, atomic checkpoints and exact resume. The batch of step s,
micro-batch m is drawn from a generator seeded by (seed, s, m), so a resumed run sees exactly the
batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from haed import __version__
from haed.checkpoint import (
    latest_checkpoint,
    load_optimizer_state,
    load_run,
    load_weights,
    read_run_config,
    restore_rng_state,
    save_checkpoint,
    write_text_atomic,
)
from haed.config import Recipe, TrainConfig, recipe_from_dict, recompute_stacks
from haed.data import open_dataset, random_windows
from haed.errors import HaedError
from haed.model import HAED, build_model, count_parameters
from haed.objectives import OBJECTIVES, trainable_parameters


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HaedError("--device cuda was asked for but CUDA is not available here")
    return torch.device(device)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 elsewhere (CPU bf16 is slow and changes results)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def make_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


def batch_rng(seed: int, step: int, micro: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, step, micro])


def torch_generator(seed: int, step: int, micro: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, 1, step, micro]).generate_state(1, dtype=np.uint64)[0] >> 1))
    return g


def to_device(windows: np.ndarray, device: torch.device) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(windows))
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x


def apply_recompute(model, cfg: TrainConfig) -> None:
    """Recompute the activations of the stacks the phase names (plus those whose config asks for it)."""
    names = set(recompute_stacks(cfg.recompute))
    if isinstance(model, HAED):
        stacks = {"encoder": model.encoder.stack, "main": model.main, "decoder": model.decoder.stack}
    else:
        stacks = {"main": model.stack}
    for name, stack in stacks.items():
        stack.recompute = stack.cfg.checkpoint or name in names


def set_trainable(model, objective: str) -> list:
    """Freeze what the objective does not train; return the trained parameters."""
    params = trainable_parameters(model, objective)
    trainable = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return params


def train_step(model, optimizer, params, loss_fn, cfg: TrainConfig, batches, device) -> tuple[dict, torch.Tensor]:
    """One optimizer step over the micro-batches [(x, generator), ...]: (mean metrics, grad norm).

    Metrics stay on the device (no host synchronisation inside the step).
    """
    sums: dict[str, torch.Tensor] = {}
    for x, generator in batches:
        with autocast(device):
            loss, metrics = loss_fn(model, x, cfg, generator)
        (loss / len(batches)).backward()
        for k, v in metrics.items():
            v = v.detach() if torch.is_tensor(v) else torch.tensor(float(v))
            sums[k] = sums.get(k, 0.0) + v / len(batches)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, grad_norm


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_metrics: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)


def maybe_compile(model, objective: str, enabled: bool, device: torch.device):
    """Compile the transformer stacks (not the data-dependent IEM bookkeeping around them)."""
    if not enabled or device.type != "cuda":
        return
    if isinstance(model, HAED):
        model.main.compile()
        model.decoder.stack.compile()
        model.encoder.stack.compile(dynamic=True)  # the number of distinct patches changes every step
    else:
        model.stack.compile()


@torch.no_grad()
def evaluate_objective(model, objective: str, data: np.ndarray, cfg: TrainConfig, seq_len: int, device) -> dict:
    """Mean metrics of the objective over `cfg.eval_batches` fixed validation batches."""
    was_training = model.training
    model.eval()
    loss_fn = OBJECTIVES[objective]
    totals: dict[str, float] = {}
    for i in range(cfg.eval_batches):
        x = to_device(random_windows(data, cfg.batch_size, seq_len, batch_rng(cfg.seed, i, 0, stream=7)), device)
        with autocast(device):
            _, metrics = loss_fn(model, x, cfg, torch_generator(cfg.seed, i, 0))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    model.train(was_training)
    return {k: v / cfg.eval_batches for k, v in totals.items()}


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )


def _format_rate(bytes_per_second: float) -> str:
    if bytes_per_second >= 1e6:
        return f"{bytes_per_second / 1e6:.2f} MB/s"
    return f"{bytes_per_second / 1e3:.1f} kB/s"


def train(
    recipe: Recipe,
    objective: str,
    run_dir: Path,
    *,
    resume: bool = False,
    init_from: Path | None = None,
    device: str = "auto",
    stop_after: int | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train `recipe`'s model with `objective` ("iem", "decoder", "full", "flat") into `run_dir`.

    `init_from`: the IEM run whose encoder and main model the decoder phase starts from (frozen).
    `stop_after`: stop (with a checkpoint) after this many steps although the schedule runs to
    `steps`; a later `resume=True` continues exactly where it stopped.
    """
    if objective not in OBJECTIVES:
        raise HaedError(f"unknown objective {objective!r}: one of {', '.join(OBJECTIVES)}")
    if objective == "flat" and recipe.model.arch != "flat":
        raise HaedError("the flat objective needs model.arch = 'flat'")
    if objective != "flat" and recipe.model.arch == "flat":
        raise HaedError(f"model.arch = 'flat' trains only with the flat objective, not {objective!r}")
    if objective == "decoder" and init_from is None and not resume:
        raise HaedError("the decoder phase needs an IEM run to start from")
    cfg: TrainConfig = recipe.full if objective == "flat" else getattr(recipe, objective)
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    torch.manual_seed(cfg.seed)

    dataset = open_dataset(recipe.data.dataset)
    train_data, valid_data = dataset.split("train"), dataset.split("valid")
    seq_len = recipe.data.seq_len

    model = build_model(recipe.model)
    config = {
        "haed_version": __version__,
        "objective": objective,
        "recipe": recipe.to_dict(),
        "dataset": {"path": str(Path(recipe.data.dataset).resolve()), "kind": dataset.kind,
                    "sample_rate": dataset.sample_rate},
        "parameters": count_parameters(model),
        "parent_run": str(Path(init_from).resolve()) if init_from else None,
    }

    start_step = 0
    optimizer_state = None
    if resume:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise HaedError(f"--resume: {run_dir} has no checkpoint to resume from")
        previous = read_run_config(run_dir)
        if previous.get("objective") != objective:
            raise HaedError(f"--resume: {run_dir} was trained with {previous.get('objective')}, not {objective}")
        load_weights(model, checkpoint)
        optimizer_state = load_optimizer_state(checkpoint, dev)
        start_step = json.loads((checkpoint / "state.json").read_text())["step"]
        config["parent_run"] = previous.get("parent_run")
    else:
        if latest_checkpoint(run_dir) is not None:
            raise HaedError(f"{run_dir} already holds a run: pass --resume to continue it or choose another --out")
        if init_from is not None:
            parent, _, parent_config = load_run(Path(init_from))
            if parent_config["recipe"]["model"] != recipe.to_dict()["model"]:
                raise HaedError(f"the model configuration differs from the run {init_from}")
            model.load_state_dict(parent.state_dict())

    model.to(dev).train()
    params = set_trainable(model, objective)
    apply_recompute(model, cfg)
    optimizer = make_optimizer(params, cfg, dev)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    maybe_compile(model, objective, cfg.compile, dev)
    if resume:
        restore_rng_state(checkpoint)

    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.json", json.dumps(config, indent=2))
    metrics_path = run_dir / "metrics.jsonl"
    _truncate_metrics(metrics_path, start_step)

    loss_fn = OBJECTIVES[objective]
    bytes_per_step = cfg.batch_size * cfg.grad_accum * seq_len
    end_step = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    result = TrainResult(run_dir=run_dir, step=start_step)
    progress = _progress() if show_progress else None
    task = None
    if progress is not None:
        progress.start()
        task = progress.add_task(f"{objective}", total=cfg.steps, completed=start_step, loss="-", rate="")
    window_start, window_steps = time.perf_counter(), 0
    try:
        for step in range(start_step, end_step):
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [
                (to_device(random_windows(train_data, cfg.batch_size, seq_len, batch_rng(cfg.seed, step, micro)), dev),
                 torch_generator(cfg.seed, step, micro))
                for micro in range(cfg.grad_accum)
            ]
            sums, grad_norm = train_step(model, optimizer, params, loss_fn, cfg, batches, dev)
            window_steps += 1
            done = step + 1

            if done % cfg.log_every == 0 or done == end_step:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_start
                rate = bytes_per_step * window_steps / max(elapsed, 1e-9)
                window_start, window_steps = time.perf_counter(), 0
                record = {"step": done, "split": "train", "lr": lr, "grad_norm": float(grad_norm),
                          "bytes_per_second": rate, **{k: float(v) for k, v in sums.items()}}
                _append_metrics(metrics_path, record)
                result.last_metrics = record
                if progress is not None:
                    progress.update(task, loss=f"{record['loss']:.4f}", rate=_format_rate(rate))
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                record = {"step": done, "split": "valid", **evaluate_objective(model, objective, valid_data, cfg, seq_len, dev)}
                _append_metrics(metrics_path, record)
                result.last_eval = record
                if progress is not None:
                    progress.console.log(_format_eval(record))
                window_start = time.perf_counter()
            if done % cfg.ckpt_every == 0 or done == end_step:
                state = {"step": done, "objective": objective, "bytes_seen": done * bytes_per_step}
                save_checkpoint(run_dir, done, model, optimizer, state, config)
                window_start = time.perf_counter()
            if progress is not None:
                progress.update(task, completed=done)
            result.step = done
    finally:
        if progress is not None:
            progress.stop()
    plot_metrics(metrics_path, run_dir / "metrics.png")
    return result


def _format_eval(record: dict) -> str:
    parts = [f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "split", "candidates")]
    return f"step {record['step']} valid: " + ", ".join(parts)


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records from beyond the checkpoint (steps that will be run again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: Path, png_path: Path) -> Path | None:
    """Training and validation loss against step, as a PNG beside the metrics."""
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("valid", "o-")):
        points = [(r["step"], r["loss"]) for r in records if r["split"] == split and "loss" in r]
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, style, label=split, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"{Path(metrics_path).parent.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path
