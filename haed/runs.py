"""Run directories above the checkpoint files (`haed.checkpoint`): the recipe a run was trained with,
whether a phase has finished, its best validation point, and its metrics file and plot.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from haed.atomic import save_figure, write_text_atomic
from haed.checkpoint import BEST, latest_intact_checkpoint, read_run_config
from haed.config import Recipe, TrainConfig, apply_overrides, apply_values, load_recipe, recipe_from_dict
from haed.errors import HaedError
from haed.objectives import get_objective


def decoder_phase_recipe(parent_run: Path, overrides: list[str] | None = None, values: dict | None = None) -> Recipe:
    """The recipe of a decoder phase on top of an IEM run: the run's own recipe, plus overrides
    (`--set` strings) and typed values ({"key.path": value})."""
    parent = read_run_config(parent_run)
    wanted = get_objective("decoder").parent_objective
    if parent.get("objective") != wanted:
        raise HaedError(
            f"{parent_run} is a {parent.get('objective')} run: the decoder phase starts from an {wanted} run"
        )
    table = parent["recipe"]
    apply_overrides(table, list(overrides or []))
    apply_values(table, values or {})
    return recipe_from_dict(table)


def recipe_for_run(
    run_dir: Path | None, recipe: str = "tiny", overrides: list[str] | None = None, values: dict | None = None
) -> Recipe:
    """`run_dir`'s own recipe (when given) or the named recipe, with `--set` overrides and typed values."""
    if run_dir is None:
        return load_recipe(recipe, overrides, values)
    table = read_run_config(run_dir)["recipe"]
    apply_overrides(table, list(overrides or []))
    apply_values(table, values or {})
    return recipe_from_dict(table)


def phase_finished(run_dir: Path, cfg: TrainConfig) -> bool:
    """Whether the run in `run_dir` has run its schedule to the end (its steps, or its time budget)."""
    checkpoint = latest_intact_checkpoint(run_dir)
    if checkpoint is None:
        return False
    state = json.loads((checkpoint / "state.json").read_text())
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
    if path.is_file():
        state = json.loads(path.read_text())
        if state.get("metric") == metric:
            return {k: state[k] for k in ("step", "metric", "value", "train_seconds") if k in state}
    return {"step": None, "metric": metric, "value": math.inf}


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


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
