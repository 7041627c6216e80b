"""The decoder phase from the IEM phase's Adam moments (`decoder.carry_moments`).

A decoder phase normally starts a fresh AdamW: zero moments, and a warm-up to `decoder.lr` after the IEM
phase's cosine ended at a tenth of its rate. On the GPU every such phase first lost ground (code: the
validation bits per byte rose from 1.437 to 1.471 before falling to 1.360; docs/2026-12-06-big-corpora.md).
The parameters it trains were trained in the IEM phase too: the decoder by the byte loss, the main
model's top `main_layers` blocks by the softmax. Their moments from the IEM run's newest step
checkpoint let the phase start at its rate with no warm-up (on the CPU, 0.2% lower than the fresh
optimizer with its warm-up: docs/iem-research.md).

A one-process optimizer state numbers the parameters in its optimizer's order; that order is rebuilt
here from the IEM run's recipe (the parameters its objective trains, grouped as `parameter_groups`), so
each moment is matched to its parameter by name. A parameter the IEM phase did not train (the decoder
without a byte loss) starts at zero moments.
"""

from __future__ import annotations

from pathlib import Path

import torch

from haed.checkpoint import latest_intact_checkpoint, load_optimizer_state, read_run_config
from haed.errors import HaedError
from haed.objectives import get_objective
from haed.recipe import recipe_from_dict
from haed.shard_reader import is_sharded
from haed.steps import parameter_groups


def parent_moments_checkpoint(parent_run: Path) -> Path:
    """The IEM run's newest intact step checkpoint with a one-process optimizer state."""
    checkpoint = latest_intact_checkpoint(Path(parent_run))
    if checkpoint is None:
        raise HaedError(
            f"{parent_run} keeps no step checkpoint with an optimizer state, so decoder.carry_moments has "
            f"no moments to carry: train the decoder phase without it"
        )
    if is_sharded(checkpoint):
        raise HaedError(
            f"{checkpoint} holds the optimizer in shards (a run of several processes): decoder.carry_moments "
            f"reads one-process checkpoints only; train the decoder phase without it"
        )
    return checkpoint


def _parent_order(model, parent_run: Path) -> list[str]:
    """The names of the IEM run's trained parameters in its optimizer's order."""
    config = read_run_config(Path(parent_run))
    recipe = recipe_from_dict(config["recipe"])
    objective = get_objective(config["objective"])
    cfg = getattr(recipe, objective.section)
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(objective.trained_parameters(model, cfg), cfg)
    return [name_of[id(p)] for group in groups for p in group["params"]]


def carry_parent_moments(model, optimizer: torch.optim.Optimizer, parent_run: Path) -> tuple[Path, int, int]:
    """Fill the fresh `optimizer` (one process) with the IEM run's moments of the parameters it trains.
    Returns (the checkpoint read, parameters that got moments, parameters this optimizer trains)."""
    checkpoint = parent_moments_checkpoint(parent_run)
    saved = load_optimizer_state(checkpoint, "cpu")
    parent_names = _parent_order(model, parent_run)
    counted = sum(len(g["params"]) for g in saved["param_groups"])
    if counted != len(parent_names):
        raise HaedError(
            f"{checkpoint}'s optimizer state has {counted} parameters where its run's recipe trains "
            f"{len(parent_names)}: the checkpoint does not belong to this run"
        )
    by_name = {parent_names[i]: state for i, state in saved["state"].items()}
    name_of = {id(p): n for n, p in model.named_parameters()}
    ours = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    wanted = optimizer.state_dict()
    wanted["state"] = {i: by_name[name] for i, name in enumerate(ours) if name in by_name}
    optimizer.load_state_dict(wanted)  # moves each moment to its parameter's device and dtype
    return checkpoint, len(wanted["state"]), len(ours)


def raise_second_moments(optimizer: torch.optim.Optimizer) -> list[float]:
    """Raise each carried second moment (`exp_avg_sq`), tensor by tensor, so that its bias-corrected mean
    is at least the mean square of the parameter's gradient now (clipped, before the update): the first
    updates of a carried optimizer then stay within about `lr` per element. Returns each raised tensor's
    factor on its root mean square (a tensor already at or above its gradient is left as it was)."""
    factors = []
    for group in optimizer.param_groups:
        beta2 = group["betas"][1]
        for p in group["params"]:
            state = optimizer.state.get(p)
            if p.grad is None or not state or "exp_avg_sq" not in state:
                continue
            v = state["exp_avg_sq"]
            carried = v.float().mean() / (1 - beta2 ** float(state["step"]))
            needed = p.grad.float().pow(2).mean()
            if needed > carried > 0:
                ratio = needed / carried
                v.mul_(ratio)
                factors.append(float(ratio.sqrt()))
    return factors
