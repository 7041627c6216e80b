"""Checkpoints of a multi-process run: DCP shards, loadable at any world size, without executing code.

`step-N/` holds DCP shards of the model and the optimizer (`dcp/`, tensors only) and each rank's
generator states (`rng/`). The last step checkpoint of a run (and of a run stopped by a signal) also
holds `model.safetensors`, the whole weights gathered to rank 0, as `best/` does; gathering them at
every checkpoint cost rank 0 a copy of the whole model each time. Evaluate and generate read a step
checkpoint without them from its shards, in one process (`haed.shard_reader`, which also checks what
the shards hold before anything loads). Rank 0 writes the rest and the manifest, and installs the
directory after a barrier, as a one-process save does (`haed.checkpoint`).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from haed.atomic import temporary_sibling
from haed.checkpoint import (
    STEP_PREFIX,
    install_directory,
    keep_newest,
    load_optimizer_state,
    save_checkpoint,
    write_manifest,
)
from haed.errors import HaedError
from haed.integrity import load_tensors, save_weights
from haed.shard_reader import SHARDS, shard_reader, tensors_only_planner

RNG_DIR = "rng"


def save_gathered(world, run_dir: Path, step: int, model, state: dict, config: dict, name: str | None) -> Path:
    """The whole weights gathered to rank 0 and written in the one-process format (the best checkpoint)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.is_main:
        save_checkpoint(run_dir, step, _Weights(full), None, state, config, name=name)
    world.barrier()
    return run_dir / (name or f"{STEP_PREFIX}{step:06d}")


def save_sharded(
    world,
    run_dir: Path,
    step: int,
    model,
    optimizer,
    state: dict,
    config: dict,
    keep_last: int = 2,
    consolidated: bool = True,
) -> Path:
    """DCP shards of the model and optimizer, each rank's generators, and with `consolidated` the whole
    weights as model.safetensors (gathered to rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    final = run_dir / f"{STEP_PREFIX}{step:06d}"
    tmp = Path(world.broadcast_object(str(temporary_sibling(final)) if world.is_main else None))
    try:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        # Tensors only (the optimizer's hyperparameters come from the recipe), so that loading
        # never unpickles anything but DCP's own metadata.
        dcp.save({"model": model_state, "optimizer": optimizer_state["state"]}, checkpoint_id=tmp / SHARDS)
        (tmp / RNG_DIR).mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), tmp / RNG_DIR / f"rank-{world.rank:05d}.pt")
        if consolidated:
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        world.barrier()
        if world.is_main:
            if consolidated:
                save_weights(full, tmp / "model.safetensors")
            (tmp / "state.json").write_text(json.dumps({**state, "world_size": world.size}, indent=2))
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            write_manifest(tmp)
            install_directory(tmp, final)
            keep_newest(run_dir, keep_last)
        world.barrier()
    finally:
        if world.is_main and tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_sharded(world, checkpoint: Path, model, optimizer) -> None:
    """Model and optimizer state from DCP shards saved at any world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    shard_reader(checkpoint / SHARDS).read_metadata()  # refused here, with its reason, if it names anything else
    model_state, optimizer_state = get_state_dict(model, optimizer)  # the layout to load into
    wanted = {"model": model_state, "optimizer": optimizer_state["state"]}
    try:
        with warnings.catch_warnings():  # alone, DCP warns that it assumes a single process: it is one
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                wanted,
                storage_reader=shard_reader(checkpoint / SHARDS),
                planner=tensors_only_planner(),
                no_dist=world.size == 1,
            )
    except CheckpointException as e:  # DCP gathers each rank's failure: report the first
        cause = next(iter(e.failures.values()))[0] if e.failures else e
        if isinstance(cause, HaedError):
            raise HaedError(str(cause)) from None
        text = str(cause).strip().splitlines()
        raise HaedError(
            f"cannot load the shards of {checkpoint}: {text[0] if text else type(cause).__name__}"
        ) from None
    set_state_dict(
        model,
        optimizer,
        model_state_dict=wanted["model"],
        optim_state_dict={"state": wanted["optimizer"], "param_groups": optimizer_state["param_groups"]},
    )


def load_one_process_optimizer(checkpoint: Path, model, optimizer) -> None:
    """A one-process checkpoint's optimizer state onto several ranks' sharded parameters."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    saved = load_optimizer_state(checkpoint, "cpu")
    # A one-process optimizer state numbers the parameters in the optimizer's order; name them.
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    named = {
        "state": {names[i]: s for i, s in saved["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def restore_rank_rng(world, checkpoint: Path) -> None:
    """This rank's generator states at a sharded checkpoint; a rank it did not have keeps its own."""
    path = checkpoint / RNG_DIR / f"rank-{world.rank:05d}.pt"
    if path.is_file():
        rng = load_tensors(path)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and world.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], world.device)


class _Weights:
    """A whole state dict where `save_checkpoint` expects a model."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def _rng_state() -> dict:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng
