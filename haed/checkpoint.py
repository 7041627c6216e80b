"""Run directories and checkpoints.

    run_dir/
      config.json        the resolved recipe, the objective, the dataset and the parent run
      metrics.jsonl      one JSON object per logged or evaluated step
      metrics.png        the loss curves
      step-000500/       model.safetensors, optimizer.pt, state.json, config.json

Every checkpoint is written to a temporary sibling and renamed into place, so a crash never leaves a
half-written `step-N`. Weights load through safetensors and the optimizer through
`torch.load(weights_only=True)`: loading a run never executes code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from haed.config import Recipe, recipe_from_dict
from haed.errors import HaedError
from haed.model import build_model

STEP_PREFIX = "step-"


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def step_dirs(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    dirs = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = step_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, config: dict, keep_last: int = 2) -> Path:
    run_dir = Path(run_dir)
    final = run_dir / f"{STEP_PREFIX}{step:06d}"
    tmp = run_dir / f".tmp-{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    # Dropout draws from torch's global generators: save them so that resume is exact.
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        for old in step_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise HaedError(f"{run_dir} is not a haed run directory (no config.json)")
    return json.loads(path.read_text())


def load_weights(model, checkpoint_dir: Path, strict: bool = True) -> None:
    state = load_file(str(Path(checkpoint_dir) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=strict)
    if missing or unexpected:
        raise HaedError(f"checkpoint {checkpoint_dir} does not match the model (missing {missing}, unexpected {unexpected})")


def load_optimizer_state(checkpoint_dir: Path, device) -> dict | None:
    path = Path(checkpoint_dir) / "optimizer.pt"
    return torch.load(path, map_location=device, weights_only=True) if path.is_file() else None


def restore_rng_state(checkpoint_dir: Path) -> None:
    path = Path(checkpoint_dir) / "rng.pt"
    if not path.is_file():
        return
    rng = torch.load(path, weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def resolve_sampling_run(run_dir: Path) -> Path:
    """The run to evaluate or sample from: an IEM run hands over to its decoder phase (`run/decoder`)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if config.get("objective") == "iem":
        sub = run_dir / "decoder"
        if latest_checkpoint(sub) is not None:
            return sub
        raise HaedError(
            f"{run_dir} was trained with IEM only and its byte decoder is untrained: "
            f"run `haed train-decoder --run {run_dir}` first"
        )
    return run_dir


def load_run(run_dir: Path, device="cpu") -> tuple[torch.nn.Module, Recipe, dict]:
    """Build the model of a run and load its latest weights: (model in eval mode, recipe, run config)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise HaedError(f"{run_dir} has no checkpoint yet (no step-N directory)")
    recipe = recipe_from_dict(config["recipe"])
    model = build_model(recipe.model)
    load_weights(model, checkpoint)
    model.to(device).eval()
    config["checkpoint"] = str(checkpoint)
    return model, recipe, config
