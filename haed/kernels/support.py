"""What the Triton kernels need, on the host side: which models and devices they run (`*_unsupported_reason`),
a stack's weights stacked layer by layer as the kernels address them, and the sizes of their tiles and
launches. No Triton code: `haed.kernels.stages`, `.decoder` and `.main` hold it.
"""

from __future__ import annotations

import os

import torch

try:  # asked only whether it is there
    import triton
except ImportError:
    triton = None


def width_reason(name: str, stack_cfg) -> str | None:
    """Why a stack's widths do not suit the kernels' tiles (None: they do): power-of-two widths up to 4096."""
    dim, head_dim = stack_cfg.dim, stack_cfg.dim // stack_cfg.heads
    if dim & (dim - 1) or head_dim & (head_dim - 1) or head_dim < 2 or dim > 4096:
        return f"they need power-of-two widths up to 4096 ({name} dim {dim}, head width {head_dim})"
    return None


def config_unsupported_reason(model_cfg, device: torch.device) -> str | None:
    """Why the kernels cannot run a model of this configuration on `device` (None: they can), known
    before any weights are loaded: they need CUDA (or Triton's interpreter), Triton, a hierarchical
    model, and power-of-two decoder widths."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CUDA only"
    if triton is None:
        return "Triton is not installed"
    if model_cfg.arch != "haed":
        return "a flat model has no byte decoder"
    return width_reason("decoder", model_cfg.decoder)


def unsupported_reason(model) -> str | None:
    """`config_unsupported_reason` for a sampler's model, which must also have bf16 Linear weights (a
    sampler made under CUDA autocast: `haed.samplers.linear_weights_in`)."""
    weight = next(model.parameters())
    reason = config_unsupported_reason(model.cfg, weight.device)
    if reason is None and model.decoder.head.weight.dtype != torch.bfloat16:
        return "they need bf16 Linear weights (a sampler made under CUDA autocast)"
    return reason


def pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def stacked_weights(stack, bf16_norms: bool = False) -> tuple[torch.Tensor, ...]:
    """A stack's weights with every layer's in one tensor (the kernels address layers by offset):
    norm1, qkv, out, norm2, up, down, and the final norm. The norms' weights in float32, rounded to bf16
    first where the stack's residual stream is bf16 (`bf16_norms`: the model casts them to it)."""
    blocks = stack.blocks

    def norm(weight):
        return (weight.to(torch.bfloat16) if bf16_norms else weight).float()

    return (
        torch.stack([norm(b.norm1.weight) for b in blocks]).contiguous(),
        torch.stack([b.attn.qkv.weight for b in blocks]).contiguous(),
        torch.stack([b.attn.out.weight for b in blocks]).contiguous(),
        torch.stack([norm(b.norm2.weight) for b in blocks]).contiguous(),
        torch.stack([b.mlp.up.weight for b in blocks]).contiguous(),
        torch.stack([b.mlp.down.weight for b in blocks]).contiguous(),
        norm(stack.norm.weight).contiguous(),
    )


def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 64  # Triton's interpreter: any count runs
