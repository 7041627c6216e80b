"""Matrix FLOPs of one training step (the model's forward FLOPs, `haed.model.forward_flops`, times
what each objective's step does with each part), and the fraction of the GPU's peak they reach."""

from __future__ import annotations

import torch.nn as nn

from haed.config import TrainConfig
from haed.model import forward_flops
from haed.objectives import Objective, get_objective

DEFAULT_PEAK_TFLOPS = 800.0  # bf16 dense matrix products measured on an H100/H200
FLOPS_CONVENTION = (
    "matrix FLOPs per optimizer step: 2 x linear weights x rows per forward pass, x3 for a trained part "
    "(forward + backward), x1 for a frozen part (decoder phase: encoder and main model); attention 4 x rows "
    "x context x dim per layer per forward, halved for causal stacks; IEM scores 2 x rows x candidates x dim "
    "(x3); IEM's byte loss counts the decoder x3 times the share of rows and bytes it covers; the decoder phase "
    "counts main's trained top blocks (decoder.main_layers) x3; embedding lookups, norms and elementwise work not "
    "counted; recomputation not counted; the encoder runs on the distinct patches"
)


def step_flops(
    model: nn.Module,
    objective: Objective | str,
    batch_size: int,
    seq_len: int,
    distinct: float | None = None,
    candidates: float | None = None,
    cfg: TrainConfig | None = None,
) -> float:
    """Matrix FLOPs of one optimizer step of `objective` with its phase config `cfg` (see FLOPS_CONVENTION)."""
    parts = forward_flops(model, batch_size, seq_len, distinct, candidates)
    return sum(multiple * parts[part] for part, multiple in get_objective(objective).step_parts(model, cfg))


def add_fraction_of_peak(cell: dict, peak_tflops: float | None) -> None:
    achieved = cell.get("achieved_tflops")
    cell["fraction_of_peak"] = achieved / peak_tflops if achieved is not None and peak_tflops else None
