"""The transformer block that every part of haed is made of, and its pieces.

Pre-norm blocks (RMSNorm, rotary positions, `scaled_dot_product_attention` so that flash attention is
used on CUDA, a gated MLP) stacked into a `Stack`, causal or bidirectional, with an optional key/value
cache for generation and optional activation recomputation. `haed.model` configures stacks as the
encoder, the main model, the decoder and the flat baseline.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from haed.config import StackConfig

# PyTorch's fused attention kernels refuse a batch of 65,536 or more; the encoder and decoder use
# patches as the batch, so larger batches are attended in pieces.
MAX_ATTENTION_BATCH = 32768

# Sequences this short (the encoder's and decoder's K positions) are attended with plain matrix
# products: the fused kernels work in tiles of 64-128 positions and waste most of them. Measured on an
# H100, 16,384 patches x 4 heads x 8 positions, fwd + bwd: flash 7.8 ms, memory-efficient 2.7 ms,
# plain 1.8 ms (benchmarks/attention_small.py, docs/performance.md).
SHORT_SEQUENCE = 16

START = 256  # the decoder's (and flat model's) start-of-sequence token, beyond the 256 byte values


def rotary(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables for `apply_rotary`: (L, head_dim) cos and signed sin, float32. Dimension i < head_dim / 2 and
    its partner i + head_dim / 2 turn by the same angle: cos is (cos, cos) and sin is (-sin, sin)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves (x1, x2) of the last dimension by the position angles, in float32:
    (x1 cos - x2 sin, x2 cos + x1 sin).

    x (B, L, ..., head_dim) with the tables of `rotary`, (L, 1, ..., head_dim), broadcasting over the
    middle. Written as x * cos + (x2, x1) * sin with the sign in the table: six operations where the
    two halves computed apart take nine, which counts when each is a kernel launch (a generation step
    runs this in every layer), and bit for bit the same numbers (a + (-b) is a - b in floating point)."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((x2, x1), dim=-1) * sin).type_as(x)


class RMSNorm(nn.Module):
    """RMSNorm whose weight follows the input's dtype, so bf16 autocast keeps the fused kernel.

    (nn.RMSNorm with a float32 weight and a bf16 input falls back to several separate kernels.)
    """

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype))


class KVCache:
    """Keys and values of every layer of one stack, for incremental (cached) decoding."""

    def __init__(self, layers: int, batch: int, heads: int, head_dim: int, max_len: int, device, dtype):
        shape = (layers, batch, heads, max_len, head_dim)
        # Every layer's keys in one tensor, `k[i]` a view of layer i: the decoder's Triton kernels
        # (`haed.kernels`) address all layers from one pointer.
        self.k_layers = torch.zeros(shape, device=device, dtype=dtype)
        self.v_layers = torch.zeros(shape, device=device, dtype=dtype)
        with torch.enable_grad():  # a view made under no_grad could not be written to with grad mode on
            self.k = [self.k_layers[i] for i in range(layers)]
            self.v = [self.v_layers[i] for i in range(layers)]
        self.length = 0
        self.max_len = max_len
        self.slots = torch.arange(max_len, device=device)
        # A step at a device-side position (`Stack.forward(..., pos=)`) attends to the slots up to it:
        # this (1, max_len) mask, made once per step by the stack and read by each of its layers.
        self.visible: torch.Tensor | None = None

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.dim // cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(
        self, x, cos, sin, causal: bool, cache: KVCache | None = None, layer: int = 0, pos: torch.Tensor | None = None
    ):
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, self.head_dim)
        # Rotate q and k together in the layout the projection wrote (reads and writes stay
        # contiguous), then view them as (B, heads, L, head_dim) for attention.
        qk = apply_rotary(qkv[:, :, :2], cos.view(L, 1, 1, -1), sin.view(L, 1, 1, -1))
        q, k = qk.permute(2, 0, 3, 1, 4)
        v = qkv[:, :, 2].transpose(1, 2)
        if pos is not None:
            # One new position given as a device tensor: every shape is fixed whatever the position
            # (the whole cache is attended to, masked), so the step can be captured in a CUDA graph.
            cache.k[layer].index_copy_(2, pos.view(1), k.to(cache.k[layer].dtype))
            cache.v[layer].index_copy_(2, pos.view(1), v.to(cache.v[layer].dtype))
            if torch.compiler.is_compiling() and cache.max_len <= SHORT_SEQUENCE:
                # Compiled (the whole-patch generation step), a cache of a few positions (a main model
                # with a context of under 16 patches) is attended with plain products, which fuse with
                # their neighbours. Eager, the one fused kernel is the cheaper way. (The decoder's
                # steps take the `cache.length` branch below: they always use the fused kernel.)
                y = short_attention(q, cache.k[layer], cache.v[layer], causal=False, visible=cache.visible)
            else:
                y = F.scaled_dot_product_attention(q, cache.k[layer], cache.v[layer], attn_mask=cache.visible)
        elif cache is None and L <= SHORT_SEQUENCE:
            y = short_attention(q, k, v, causal)
        elif cache is None:
            y = (
                torch.cat(
                    [
                        F.scaled_dot_product_attention(
                            q[i : i + MAX_ATTENTION_BATCH],
                            k[i : i + MAX_ATTENTION_BATCH],
                            v[i : i + MAX_ATTENTION_BATCH],
                            is_causal=causal,
                        )
                        for i in range(0, B, MAX_ATTENTION_BATCH)
                    ]
                )
                if B > MAX_ATTENTION_BATCH
                else F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            )
        else:
            start = cache.length
            cache.k[layer][:, :, start : start + L] = k
            cache.v[layer][:, :, start : start + L] = v
            k_all = cache.k[layer][:, :, : start + L]
            v_all = cache.v[layer][:, :, : start + L]
            if L == 1 or not causal:
                mask = None
            else:  # query i (at position start + i) sees keys up to start + i
                mask = torch.ones(L, start + L, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, L, D))


def short_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, visible: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention as two matrix products (softmax in float32), for a handful of positions.
    `visible`: a boolean mask of the keys each query may see, broadcast over the scores."""
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    if causal:
        L = q.shape[-2]
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


class MLP(nn.Module):
    """Gated (SwiGLU) MLP; the hidden width is 2/3 of mlp_ratio * dim so parameters match a plain MLP."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.dim * 2 / 3)
        hidden = max(8, (hidden + 7) // 8 * 8)
        self.up = nn.Linear(cfg.dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x):
        gate, value = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * value)


class Block(nn.Module):
    """Pre-norm transformer block: RMSNorm, rotary self-attention (SDPA), RMSNorm, gated MLP."""

    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.dim)
        self.mlp = MLP(cfg)
        self.dropout = cfg.dropout

    def forward(
        self, x, cos, sin, causal: bool, cache: KVCache | None = None, layer: int = 0, pos: torch.Tensor | None = None
    ):
        y = self.attn(self.norm1(x), cos, sin, causal, cache, layer, pos)
        if self.training and self.dropout > 0:
            y = F.dropout(y, self.dropout)
        x = x + y
        y = self.mlp(self.norm2(x))
        if self.training and self.dropout > 0:
            y = F.dropout(y, self.dropout)
        return x + y


class Stack(nn.Module):
    """A stack of blocks with a final norm. `causal` picks causal (main, decoder, flat) or bidirectional (encoder)."""

    def __init__(self, cfg: StackConfig, causal: bool, rope_base: float, max_positions: int = 64):
        super().__init__()
        self.cfg = cfg
        self.causal = causal
        self.rope_base = rope_base
        self.recompute = cfg.recompute  # a training phase may turn recomputation on for itself
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        # Rotary angles are computed once for the positions in use (not stored in checkpoints).
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self._grow_rope(max_positions)

    def _grow_rope(self, length: int) -> None:
        length = max(length, 2 * self.rope_cos.shape[0])
        cos, sin = rotary(
            torch.arange(length, device=self.rope_cos.device), self.cfg.dim // self.cfg.heads, self.rope_base
        )
        self.rope_cos, self.rope_sin = cos, sin

    def rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + length > self.rope_cos.shape[0]:
            self._grow_rope(start + length)
        return self.rope_cos[start : start + length], self.rope_sin[start : start + length]

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        pos: torch.Tensor | None = None,
        blocks: tuple[int, int] | None = None,
        norm: bool = True,
    ) -> torch.Tensor:
        """x (B, L, dim). With a cache, x continues the cached sequence at `cache.length`; or, with
        `pos` (a 0-d device tensor) and L = 1, x is written at position `pos` and `cache.length` is
        left to the caller (fixed shapes for CUDA graphs).

        `blocks=(first, last)` runs blocks first .. last - 1 only (from position 0, without a cache),
        and `norm=False` leaves out the final norm: the decoder phase runs the frozen lower blocks
        without autograd and trains the top ones, through the same (compiled) forward."""
        if blocks is not None and cache is not None:
            raise ValueError("a range of blocks runs without a cache")
        first, last = blocks if blocks is not None else (0, len(self.blocks))
        if pos is not None:
            if cache is None or x.shape[1] != 1:
                raise ValueError("a step at a tensor position needs a cache and one position")
            if cache.max_len > self.rope_cos.shape[0]:
                self._grow_rope(cache.max_len)
            cos, sin = self.rope_cos.index_select(0, pos.view(1)), self.rope_sin.index_select(0, pos.view(1))
            cache.visible = (cache.slots <= pos).view(1, cache.max_len)
        else:
            cos, sin = self.rope(cache.length if cache is not None else 0, x.shape[1])
        recompute = self.recompute and self.training and cache is None and torch.is_grad_enabled()
        for i in range(first, last):
            block = self.blocks[i]
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, self.causal, use_reentrant=False)
            else:
                x = block(x, cos, sin, self.causal, cache, i, pos)
        if cache is not None and pos is None:
            cache.length += x.shape[1]
        return self.norm(x) if norm else x

    def new_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        heads = self.cfg.heads
        return KVCache(self.cfg.layers, batch, heads, self.cfg.dim // heads, max_len, device, dtype)


def linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def attention_flops(layers: int, dim: int, rows: int, context: int, causal: bool) -> float:
    """Forward FLOPs of the attention products (QK^T and AV) of a stack."""
    return 4.0 * rows * context * dim * layers * (0.5 if causal else 1.0)
