"""Run directories above the checkpoint files (`haed.checkpoint`): the recipe a run was trained with,
whether a phase has finished, its best validation point, its metrics file and plot, and its model loaded
back (the run an evaluation or a sample reads: an IEM run's decoder phase).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from haed.atomic import save_figure, write_text_atomic
from haed.checkpoint import (
    BEST,
    latest_checkpoint,
    latest_intact_checkpoint,
    load_weights,
    read_run_config,
    read_state,
    select_checkpoint,
    step_dirs,
)
from haed.config import TrainConfig
from haed.errors import HaedError, write_error
from haed.model import build_model
from haed.objectives import DECODER, Objective, get_objective
from haed.recipe import Recipe, apply_overrides, apply_values, load_recipe, recipe_from_dict


def decoder_phase_recipe(parent_run: Path, overrides: list[str] | None = None, values: dict | None = None) -> Recipe:
    """The recipe of a decoder phase on top of an IEM run: the run's own recipe, plus overrides
    (`--set` strings) and typed values ({"key.path": value})."""
    parent = read_run_config(parent_run)
    wanted = DECODER.parent_objective
    if parent.get("objective") != wanted:
        raise HaedError(
            f"{parent_run} is a {parent.get('objective')} run: the decoder phase starts from an {wanted} run "
            f"(give its directory as --run)"
        )
    table = parent["recipe"]
    apply_overrides(table, list(overrides or []))
    apply_values(table, values or {})
    return absolute_dataset(recipe_from_dict(table), parent.get("dataset", {}).get("path"))


def recipe_for_run(
    run_dir: Path | None, recipe: str = "tiny", overrides: list[str] | None = None, values: dict | None = None
) -> Recipe:
    """`run_dir`'s own recipe (when given) or the named recipe, with `--set` overrides and typed values."""
    if run_dir is None:
        return load_recipe(recipe, overrides, values)
    config = read_run_config(run_dir)
    table = config["recipe"]
    apply_overrides(table, list(overrides or []))
    apply_values(table, values or {})
    return absolute_dataset(recipe_from_dict(table), config.get("dataset", {}).get("path"))


def resolve_sampling_run(run_dir: Path) -> Path:
    """The run to evaluate or sample from: an IEM run hands over to its decoder phase (`run/decoder`)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if not get_objective(config.get("objective", "?")).trains_decoder:
        sub = run_dir / DECODER.subfolder
        if latest_checkpoint(sub) is not None:
            return sub
        raise HaedError(
            f"{run_dir} was trained with IEM only and its byte decoder is untrained: "
            f"run `haed train-decoder --run {run_dir}` first"
        )
    return run_dir


def load_run(
    run_dir: Path, device="cpu", checkpoint: str | Path = "best", allow_unverified: bool = False
) -> tuple[torch.nn.Module, Recipe, dict]:
    """Build the model of a run and load a checkpoint's weights (the best validation point by default, or
    a checkpoint directory already chosen by `select_checkpoint`): (model in eval mode, recipe, run config
    with "checkpoint" set to the directory loaded)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    chosen = checkpoint if isinstance(checkpoint, Path) else select_checkpoint(run_dir, checkpoint, allow_unverified)
    recipe = recipe_from_dict(config["recipe"])
    model = build_model(recipe.model)
    load_weights(model, chosen)
    model.to(device).eval()
    config["checkpoint"] = str(chosen)
    return model, recipe, config


def absolute_dataset(recipe: Recipe, recorded: str | None = None) -> Recipe:
    """`recipe` with its dataset path made absolute, so that a run resumes from any folder: a relative
    path is resolved here, or taken from `recorded` (the absolute path a run recorded beside its recipe,
    for runs written before recipes stored it absolute)."""
    dataset = recipe.data.dataset
    if not dataset or Path(dataset).is_absolute():
        return recipe
    path = Path(recorded) if recorded and not Path(dataset).exists() else Path(dataset).resolve()
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, dataset=str(path)))


def new_run_config(
    recipe: Recipe, objective: Objective, dataset, model, init_from, cfg: TrainConfig, dev, world_size: int
):
    """The `config.json` of a run as it starts: recipe, objective, dataset, parameters, parent, batch."""
    from haed import __version__
    from haed.model import count_parameters

    windows = cfg.batch_size * cfg.grad_accum * world_size
    compiled = bool(cfg.compile and dev.type == "cuda")
    return {
        "haed_version": __version__,
        "objective": objective.name,
        "recipe": recipe.to_dict(),
        "dataset": {
            "path": str(Path(recipe.data.dataset).resolve()),
            "kind": dataset.kind,
            "sample_rate": dataset.sample_rate,
        },
        "parameters": count_parameters(model),
        "parent_run": str(Path(init_from).resolve()) if init_from else None,
        "parent_checkpoint": None,
        "time_budget": cfg.time_budget,
        "train_seconds": 0.0,
        # What ran, which the recipe's `compile` alone does not say: `--no-compile` and CPUs run eager.
        "compiled": compiled,
        # torch.compile's mode where compiled: the recipe's, but the default mode under torchrun (haed.trainer)
        "compile_mode": cfg.compile_mode if compiled else None,
        # Windows (and bytes) per optimizer step over all processes: batch_size x grad_accum x world_size.
        "global_batch": {
            "windows": windows,
            "bytes": windows * recipe.data.seq_len,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "world_size": world_size,
        },
    }


def resumed_recipe(
    run_dir: Path, objective: Objective, recipe: Recipe | None, allow_changes: bool
) -> tuple[Recipe, dict]:
    """(the recipe a resumed run continues with, the run's config): the run's own recipe (`recipe` None),
    or `recipe` when it equals the run's own or `allow_changes`; a run of another objective is refused."""
    previous = read_run_config(run_dir)
    if previous.get("objective") != objective.name:
        raise HaedError(f"--resume: {run_dir} was trained with {previous.get('objective')}, not {objective.name}")
    if recipe is None:
        return absolute_dataset(recipe_from_dict(previous["recipe"]), previous.get("dataset", {}).get("path")), previous
    changes = recipe_changes(previous["recipe"], recipe)
    if changes and not allow_changes:
        raise HaedError(
            f"--resume: the recipe differs from the run's own ({'; '.join(changes)}); "
            f"resume without recipe options, or pass --allow-changes to accept the change"
        )
    return recipe, previous


@dataclass
class TrainingRun:
    """What one `haed.train.train` call trains, settled before anything is built: a fresh run or a resumed one."""

    recipe: Recipe
    objective: Objective
    cfg: TrainConfig  # the objective's phase section, with any `compile` override
    run_dir: Path
    checkpoint: Path | None = None  # where a resumed run continues (None: a fresh run)
    previous: dict | None = None  # a resumed run's config.json
    init_from: Path | None = None  # the parent run a fresh phase starts from (the decoder phase's IEM run)


def resolve_run(
    recipe: Recipe | None,
    objective: Objective,
    run_dir: Path,
    resume: bool,
    allow_changes: bool,
    init_from: Path | None,
    compile: bool | None,
) -> TrainingRun:
    """A fresh run into `run_dir` (which must hold none yet), or with `resume` the run there, continued from its
    newest intact checkpoint with its own recipe (`recipe` None) or `recipe` (the same, or `allow_changes`)."""
    previous = checkpoint = None
    if resume:
        checkpoint = latest_intact_checkpoint(run_dir)
        recipe, previous = resumed_recipe(run_dir, objective, recipe, allow_changes)
    elif step_dirs(run_dir):
        raise HaedError(f"{run_dir} already holds a run: pass --resume to continue it or choose another --out")
    if recipe.model.arch != objective.arch:
        raise HaedError(
            f"the {objective.name} objective trains model.arch = {objective.arch!r}, not {recipe.model.arch!r}"
        )
    cfg: TrainConfig = getattr(recipe, objective.section)
    if compile is not None:  # for every compiled part: the stacks and IEM's chunked softmax
        cfg = dataclasses.replace(cfg, compile=compile)
    return TrainingRun(recipe, objective, cfg, run_dir, checkpoint, previous, init_from)


def phase_finished(run_dir: Path, cfg: TrainConfig) -> bool:
    """Whether the run in `run_dir` has run its schedule to the end (its steps, or its time budget)."""
    checkpoint = latest_intact_checkpoint(run_dir)
    if checkpoint is None:
        return False
    state = read_state(checkpoint)
    return state["step"] >= cfg.steps or bool(cfg.time_budget and state.get("train_seconds", 0.0) >= cfg.time_budget)


def _recipe_differences(a: dict, b: dict, where: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _recipe_differences(va, vb, f"{where}{key}.")
        elif va != vb:
            out.append(f"{where}{key}: {va!r} -> {vb!r}")
    return out


def recipe_changes(previous: dict, recipe: Recipe) -> list[str]:
    """What `recipe` changes from a run's recorded recipe (`previous`), as "field: old -> new" lines."""
    return _recipe_differences(_comparable(previous), _comparable(recipe.to_dict()))


def _comparable(recipe: dict) -> dict:
    recipe = json.loads(json.dumps(recipe))
    recipe["data"]["dataset"] = str(Path(recipe["data"]["dataset"]).resolve())
    return recipe


def read_best(run_dir: Path, metric: str) -> dict:
    """The best validation point kept so far in `run_dir` (value inf when there is none)."""
    path = Path(run_dir) / BEST / "state.json"
    try:
        state = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, ValueError):  # damaged: the next validation point replaces it
        state = {}
    if isinstance(state, dict) and state.get("metric") == metric and isinstance(state.get("value"), (int, float)):
        return {k: state[k] for k in ("step", "metric", "value", "train_seconds") if k in state}
    return {"step": None, "metric": metric, "value": math.inf}


def append_metrics(path: Path, record: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise write_error(path, e) from None


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records from beyond the checkpoint (steps that will be run again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if line.strip() and json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):  # a line cut short by a crash mid-write
            continue
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
    return save_figure(fig, png_path)
