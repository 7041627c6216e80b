"""What `haed profile-memory` measures when the command line does not say: the device's defaults.

On CUDA: the enwik8 recipe at the README's headline lengths and batch size. On a CPU (asked for
with `--device cpu`): the tiny recipe, CPU-timed, memory not measured.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch

from haed.profile.harness import profile_device
from haed.recipe import Recipe, load_recipe


@dataclasses.dataclass(frozen=True)
class SweepDefaults:
    """The recipe, window lengths, batch sizes and steps per cell `haed profile-memory` measures unless told
    otherwise."""

    device: str
    recipe: str
    seq_lens: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    warmup: int
    steps: int
    why: str


# On a GPU the CPU-sized tiny recipe is launch-bound: every objective runs at about the same speed
# and the memory ratios shrink, which says nothing about IEM at scale. So on CUDA the default is the
# configuration the README reports (its 12 cells took 4 min 24 s on an H100, compilation included,
# on real enwik8 bytes, 2026-11-23). Steps: IEM's short steps wait on the host's launches and settle slowly;
# with 2 warm-up and 5 timed steps an H100 measured IEM at 1.13x full training's speed at seq 4,096 (two of
# five steps 10-15 ms above the rest), with 20 and 20 at 1.44x (2026-12-07, docs/2026-12-06-big-corpora.md).
CUDA_DEFAULTS = SweepDefaults(
    "cuda",
    "enwik8",
    (2048, 4096, 8192, 16384),
    (16,),
    20,
    20,
    "the configuration of the README's headline table: the enwik8 recipe (main 12 x 768 over 8-byte "
    "patches, decoder 4 x 256), batch 16, seq 2,048 to 16,384; 20 warm-up and 20 timed steps per cell, "
    "which short host-bound steps need to settle",
)
CPU_DEFAULTS = SweepDefaults(
    "cpu",
    "tiny",
    (2048, 4096, 8192, 16384),
    (4, 8, 16),
    2,
    5,
    "the CPU-sized tiny recipe, CPU-timed: memory is not measured, and CPU timings say nothing about a GPU's",
)


def default_sweep(device: torch.device | str) -> SweepDefaults:
    """The defaults for a resolved device (a torch.device, "cuda", "cuda:N" or "cpu"); touches no GPU."""
    return CUDA_DEFAULTS if torch.device(device).type == "cuda" else CPU_DEFAULTS


@dataclasses.dataclass
class SweepPlan:
    """One run's device, recipe, lengths and batch sizes, and (for the JSON) which defaults it took."""

    device: torch.device
    recipe: Recipe
    seq_lens: list[int]
    batch_sizes: list[int]
    warmup: int
    steps: int
    defaults: dict


def plan_sweep(
    device: str = "auto",
    recipe: str | None = None,
    overrides: Iterable[str] = (),
    seq_lens: Iterable[int] | None = None,
    batch_sizes: Iterable[int] | None = None,
    warmup: int | None = None,
    steps: int | None = None,
) -> SweepPlan:
    """Resolve the device first (no CUDA: one HaedError before any work, unless the CPU is asked for),
    then take what was not given (None) from that device's defaults, recording which ones."""
    dev = profile_device(device)
    d = default_sweep(dev)
    # which of the sweep's shape came from the defaults (the steps per cell are in the profile's settings)
    given = (("recipe", recipe), ("seq_lens", seq_lens), ("batch_sizes", batch_sizes))
    used = [name for name, value in given if value is None]
    return SweepPlan(
        device=dev,
        recipe=load_recipe(d.recipe if recipe is None else recipe, list(overrides)),
        seq_lens=list(d.seq_lens if seq_lens is None else seq_lens),
        batch_sizes=list(d.batch_sizes if batch_sizes is None else batch_sizes),
        warmup=d.warmup if warmup is None else warmup,
        steps=d.steps if steps is None else steps,
        defaults={
            "device": d.device,
            "recipe": d.recipe,
            "seq_lens": list(d.seq_lens),
            "batch_sizes": list(d.batch_sizes),
            "warmup": d.warmup,
            "steps": d.steps,
            "why": d.why,
            "used": used,
        },
    )
