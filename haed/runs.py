"""Run directories above the checkpoint files (`haed.checkpoint`): the recipe a run was trained with,
whether a phase has finished, its best validation point, and its metrics file and plot.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from haed.atomic import save_figure, write_text_atomic
from haed.checkpoint import BEST, latest_intact_checkpoint, read_run_config, read_state
from haed.config import Recipe, TrainConfig, apply_overrides, apply_values, load_recipe, recipe_from_dict
from haed.errors import HaedError, write_error
from haed.objectives import get_objective


def decoder_phase_recipe(parent_run: Path, overrides: list[str] | None = None, values: dict | None = None) -> Recipe:
    """The recipe of a decoder phase on top of an IEM run: the run's own recipe, plus overrides
    (`--set` strings) and typed values ({"key.path": value})."""
    parent = read_run_config(parent_run)
    wanted = get_objective("decoder").parent_objective
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


def absolute_dataset(recipe: Recipe, recorded: str | None = None) -> Recipe:
    """`recipe` with its dataset path made absolute, so that a run resumes from any folder: a relative
    path is resolved here, or taken from `recorded` (the absolute path a run recorded beside its recipe,
    for runs written before recipes stored it absolute)."""
    dataset = recipe.data.dataset
    if not dataset or Path(dataset).is_absolute():
        return recipe
    path = Path(recorded) if recorded and not Path(dataset).exists() else Path(dataset).resolve()
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, dataset=str(path)))


def new_run_config(recipe: Recipe, objective: str, dataset, model, init_from, cfg: TrainConfig, dev, world_size: int):
    """The `config.json` of a run as it starts: recipe, objective, dataset, parameters, parent, batch."""
    from haed import __version__
    from haed.model import count_parameters

    windows = cfg.batch_size * cfg.grad_accum * world_size
    return {
        "haed_version": __version__,
        "objective": objective,
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
        "compiled": bool(cfg.compile and dev.type == "cuda"),
        # Windows (and bytes) per optimizer step over all processes: batch_size x grad_accum x world_size.
        "global_batch": {
            "windows": windows,
            "bytes": windows * recipe.data.seq_len,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "world_size": world_size,
        },
    }


def resumed_recipe(run_dir: Path, objective: str, recipe: Recipe | None, allow_changes: bool) -> tuple[Recipe, dict]:
    """(the recipe a resumed run continues with, the run's config): the run's own recipe (`recipe` None),
    or `recipe` when it equals the run's own or `allow_changes`; a run of another objective is refused."""
    previous = read_run_config(run_dir)
    if previous.get("objective") != objective:
        raise HaedError(f"--resume: {run_dir} was trained with {previous.get('objective')}, not {objective}")
    if recipe is None:
        return absolute_dataset(recipe_from_dict(previous["recipe"]), previous.get("dataset", {}).get("path")), previous
    changes = recipe_changes(previous["recipe"], recipe)
    if changes and not allow_changes:
        raise HaedError(
            f"--resume: the recipe differs from the run's own ({'; '.join(changes)}); "
            f"resume without recipe options, or pass --allow-changes to accept the change"
        )
    return recipe, previous


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
