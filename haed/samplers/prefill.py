"""One prefill for many streams: a prompt shared by every stream is run once, at batch 1, and its key/value
cache copied into every stream's row, so that each stream's prefill is the very computation of a
single-stream run. Both samplers (`haed.samplers.hierarchical`, `haed.samplers.flat`) prefill this way.
"""

from __future__ import annotations

import torch


def broadcast_cache(src, dst) -> None:
    """Copy a batch-1 cache's filled positions into every row of `dst` (same stack, same length)."""
    n = src.length
    for k_src, v_src, k_dst, v_dst in zip(src.k, src.v, dst.k, dst.v):
        k_dst[:, :, :n].copy_(k_src[:, :, :n])
        v_dst[:, :, :n].copy_(v_src[:, :, :n])
    dst.length = n


def prompt_rows(prompt: torch.Tensor, batch: int) -> torch.Tensor:
    """A prompt (L,) shared by every stream, as (1, L); or (B, L), one per stream."""
    if prompt.dim() == 1:
        return prompt.view(1, -1)
    if prompt.dim() != 2 or prompt.shape[0] != batch:
        raise ValueError(f"a prompt is (L,) or ({batch}, L), got {tuple(prompt.shape)}")
    return prompt
