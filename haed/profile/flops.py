"""Matrix FLOPs of one training step, and the fraction of the GPU's peak they reach.

This counting belongs beside the model (as nanoGPT's `estimate_mfu`); it lives here, in
`step_flops`, until the model module offers it.
"""

from __future__ import annotations

import torch.nn as nn

from haed.model import HAED

DEFAULT_PEAK_TFLOPS = 800.0  # bf16 dense matrix products measured on the H100/H200 of the device tool
FLOPS_CONVENTION = (
    "matrix FLOPs per optimizer step: 2 x linear weights x rows per forward pass, x3 for a trained part "
    "(forward + backward), x1 for a frozen part (decoder phase: encoder and main model); attention 4 x rows "
    "x context x dim per layer per forward, halved for causal stacks; IEM scores 2 x rows x candidates x dim "
    "(x3); embedding lookups, norms and elementwise work not counted; the encoder runs on the distinct patches"
)


def linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def attention_flops(layers: int, dim: int, rows: int, context: int, causal: bool) -> float:
    """Forward FLOPs of the attention products (QK^T and AV) of a stack."""
    return 4.0 * rows * context * dim * layers * (0.5 if causal else 1.0)


def step_flops(model: nn.Module, objective: str, batch_size: int, seq_len: int,
               distinct: float | None = None, candidates: float | None = None) -> float:
    """Matrix FLOPs of one optimizer step of `objective` (see FLOPS_CONVENTION)."""
    B, N = batch_size, seq_len
    if not isinstance(model, HAED):
        s = model.cfg.main
        fwd = 2.0 * (linear_weights(model.stack) + model.head.weight.numel()) * B * N
        return 3.0 * (fwd + attention_flops(s.layers, s.dim, B * N, N, True))
    cfg = model.cfg
    K = cfg.patch_size
    T = N // K
    U = float(distinct if distinct is not None else B * T)
    encoder = (2.0 * linear_weights(model.encoder.stack) * U * K + 2.0 * model.encoder.proj.weight.numel() * U
               + attention_flops(cfg.encoder.layers, cfg.encoder.dim, int(U * K), K, False))
    main = 2.0 * linear_weights(model.main) * B * T + attention_flops(cfg.main.layers, cfg.main.dim, B * T, T, True)
    decoder = (2.0 * model.decoder.condition.weight.numel() * B * T
               + 2.0 * (linear_weights(model.decoder.stack) + model.decoder.head.weight.numel()) * B * N
               + attention_flops(cfg.decoder.layers, cfg.decoder.dim, B * N, K, True))
    if objective == "iem":
        C = float(candidates if candidates is not None else U)
        scores = 2.0 * model.score_proj.weight.numel() * B * T + 2.0 * B * T * C * cfg.main.dim
        return 3.0 * (encoder + main + scores)
    if objective == "decoder":
        return encoder + main + 3.0 * decoder
    return 3.0 * (encoder + main + decoder)


def add_fraction_of_peak(cell: dict, peak_tflops: float | None) -> None:
    achieved = cell.get("achieved_tflops")
    cell["fraction_of_peak"] = achieved / peak_tflops if achieved is not None and peak_tflops else None
