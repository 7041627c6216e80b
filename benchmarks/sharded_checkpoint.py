"""Seconds per step checkpoint of a multi-process run, with and without the whole weights gathered to rank 0
(`model.safetensors`, which a run now writes into its last step checkpoint and best/ only).

Run under torchrun; on CPUs the ranks use gloo:

    torchrun --standalone --nproc-per-node 2 benchmarks/sharded_checkpoint.py --recipe tiny --repeats 9 --out ckpt.json

Each rank builds the recipe's model, shards it (FSDP2, as `haed train-iem` does), takes one optimizer step
on random bytes (so the optimizer state exists), then writes step checkpoints into a temporary run
directory, alternating with and without the gathered weights, and reports the median wall time of each
on rank 0 (every rank waits at the checkpoint's barriers, so rank 0's time is the step's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from haed.device import resolve_device  # noqa: E402
from haed.distributed import global_candidates, init_world  # noqa: E402
from haed.model import build_model, count_parameters  # noqa: E402
from haed.objectives import get_objective  # noqa: E402
from haed.recipe import load_recipe  # noqa: E402
from haed.sharded import save_sharded  # noqa: E402
from haed.steps import make_optimizer, set_trainable, train_step  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="tiny")
    p.add_argument("--objective", default="iem")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    recipe = load_recipe(a.recipe, a.overrides)
    objective = get_objective(a.objective)
    cfg = getattr(recipe, objective.section)
    world = init_world(resolve_device(a.device))
    torch.manual_seed(cfg.seed)
    model = build_model(recipe.model).to(world.device)
    parameters = count_parameters(model)["total"]
    params = set_trainable(model, objective, cfg)
    if world.size > 1:  # as the trainer hands it over: IEM's candidates from every rank
        objective = objective.across_ranks(global_candidates)
    loss_fn, params = world.parallelize(model, objective, params, cfg.seed)
    optimizer = make_optimizer(params, cfg, world.device)
    x = torch.from_numpy(np.random.default_rng(world.rank).integers(0, 256, (cfg.batch_size, recipe.data.seq_len)))
    train_step(model, optimizer, params, loss_fn, cfg, [(x.to(torch.uint8).to(world.device), None)], world.device)

    root = Path(world.broadcast_object(tempfile.mkdtemp(prefix="ckpt-") if world.is_main else None))
    seconds: dict[str, list[float]] = {"shards and whole weights": [], "shards only": []}
    for i in range(2 * a.repeats):
        consolidated = i % 2 == 0
        world.barrier()
        t0 = time.perf_counter()
        save_sharded(world, root, i + 1, model, optimizer, {"step": i + 1}, {}, consolidated=consolidated)
        seconds["shards and whole weights" if consolidated else "shards only"].append(time.perf_counter() - t0)
    if world.is_main:
        medians = {k: statistics.median(v) for k, v in seconds.items()}
        result = {
            "recipe": recipe.name,
            "parameters": parameters,
            "world_size": world.size,
            "device": str(world.device),
            "threads_per_rank": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "repeats": a.repeats,
            "median_seconds": medians,
            "saved_per_checkpoint_seconds": medians["shards and whole weights"] - medians["shards only"],
            "all_seconds": seconds,
        }
        print(json.dumps({k: v for k, v in result.items() if k != "all_seconds"}, indent=2))
        if a.out:
            a.out.write_text(json.dumps(result, indent=2))
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
