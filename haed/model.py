"""The HAED model: one transformer block, configured three ways (encoder, main model, decoder).

A window of N bytes is cut into T = N / K patches of K bytes.
- The encoder maps each patch, alone, to one vector: E(P) depends on the bytes of P only, so it is
  an implicit embedding matrix with one row per possible patch.
- The main model is causal over patch vectors: its input at step t is E(P_{t-1}) (a learned start
  vector at t = 1) and its output h_t summarises everything before patch t.
- The decoder is a small causal transformer over the K bytes of one patch, conditioned on h_t.
A flat byte-level causal transformer (`arch = "flat"`) is built from the same block as a baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from haed.config import ModelConfig, StackConfig

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
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dimension by the position angles, in float32.

    x (B, L, ..., head_dim) with cos and sin (L, 1, ..., head_dim / 2) broadcasting over the middle."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


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
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.length = 0
        self.max_len = max_len

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    def __init__(self, cfg: StackConfig):
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.dim // cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, causal: bool, cache: KVCache | None = None, layer: int = 0,
                pos: torch.Tensor | None = None):
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
            visible = (torch.arange(cache.max_len, device=x.device) <= pos).view(1, cache.max_len)
            y = F.scaled_dot_product_attention(q, cache.k[layer], cache.v[layer], attn_mask=visible)
        elif cache is None and L <= SHORT_SEQUENCE:
            y = short_attention(q, k, v, causal)
        elif cache is None:
            y = torch.cat([
                F.scaled_dot_product_attention(q[i : i + MAX_ATTENTION_BATCH], k[i : i + MAX_ATTENTION_BATCH],
                                               v[i : i + MAX_ATTENTION_BATCH], is_causal=causal)
                for i in range(0, B, MAX_ATTENTION_BATCH)
            ]) if B > MAX_ATTENTION_BATCH else F.scaled_dot_product_attention(q, k, v, is_causal=causal)
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


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Softmax attention as two matrix products (softmax in float32), for a handful of positions."""
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
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

    def forward(self, x, cos, sin, causal: bool, cache: KVCache | None = None, layer: int = 0,
                pos: torch.Tensor | None = None):
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
        self.recompute = cfg.checkpoint  # a training phase may turn recomputation on for itself
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        # Rotary angles are computed once for the positions in use (not stored in checkpoints).
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self._grow_rope(max_positions)

    def _grow_rope(self, length: int) -> None:
        length = max(length, 2 * self.rope_cos.shape[0])
        cos, sin = rotary(torch.arange(length, device=self.rope_cos.device), self.cfg.dim // self.cfg.heads, self.rope_base)
        self.rope_cos, self.rope_sin = cos, sin

    def rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start + length > self.rope_cos.shape[0]:
            self._grow_rope(start + length)
        return self.rope_cos[start : start + length], self.rope_sin[start : start + length]

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, dim). With a cache, x continues the cached sequence at `cache.length`; or, with
        `pos` (a 0-d device tensor) and L = 1, x is written at position `pos` and `cache.length` is
        left to the caller (fixed shapes for CUDA graphs)."""
        if pos is not None:
            if cache is None or x.shape[1] != 1:
                raise ValueError("a step at a tensor position needs a cache and one position")
            if cache.max_len > self.rope_cos.shape[0]:
                self._grow_rope(cache.max_len)
            cos, sin = self.rope_cos.index_select(0, pos.view(1)), self.rope_sin.index_select(0, pos.view(1))
        else:
            cos, sin = self.rope(cache.length if cache is not None else 0, x.shape[1])
        recompute = self.recompute and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, self.causal, use_reentrant=False)
            else:
                x = block(x, cos, sin, self.causal, cache, i, pos)
        if cache is not None and pos is None:
            cache.length += x.shape[1]
        return self.norm(x)

    def new_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        heads = self.cfg.heads
        return KVCache(self.cfg.layers, batch, heads, self.cfg.dim // heads, max_len, device, dtype)


class PatchEncoder(nn.Module):
    """Maps each patch of K bytes, with no context outside it, to one vector of the main width."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        k, d = cfg.patch_size, cfg.encoder.dim
        self.pooling = cfg.pooling
        self.byte_embedding = nn.Embedding(256, d)
        self.stack = Stack(cfg.encoder, causal=False, rope_base=cfg.rope_base, max_positions=k)
        self.proj = nn.Linear(k * d if cfg.pooling == "concat" else d, cfg.main.dim, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: (..., K) bytes -> (..., main_dim)."""
        lead, k = patches.shape[:-1], patches.shape[-1]
        x = self.byte_embedding(patches.reshape(-1, k).long())
        x = self.stack(x)
        x = x.flatten(1) if self.pooling == "concat" else x.mean(dim=1)
        return self.proj(x).view(*lead, -1)


class ByteDecoder(nn.Module):
    """Generates the K bytes of patch t from h_t: causal over the K positions of that patch only.

    Token sequence of a patch: [START, x_1, ..., x_{K-1}]; position k predicts x_{k+1}. h_t enters
    either as K per-position vectors added to the token embeddings ("add"), or in place of the
    START embedding at position 0 ("prefix").
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        k, d = cfg.patch_size, cfg.decoder.dim
        self.patch_size = k
        self.conditioning = cfg.conditioning
        self.token_embedding = nn.Embedding(257, d)
        out = k * d if cfg.conditioning == "add" else d
        self.condition = nn.Linear(cfg.main.dim, out, bias=False)
        self.stack = Stack(cfg.decoder, causal=True, rope_base=cfg.rope_base, max_positions=k)
        self.head = nn.Linear(d, 256, bias=False)

    def conditioning_vectors(self, h: torch.Tensor) -> torch.Tensor:
        """h: (N, main_dim) -> (N, K, dim) for "add", (N, 1, dim) for "prefix"."""
        return self.condition(h).view(h.shape[0], -1, self.token_embedding.embedding_dim)

    def embed(self, cond: torch.Tensor, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.token_embedding(tokens.long())
        length = tokens.shape[1]
        if self.conditioning == "add":
            return x + cond[:, offset : offset + length]
        if offset == 0:
            x = torch.cat((cond, x[:, 1:]), dim=1)
        return x

    @staticmethod
    def input_tokens(patches: torch.Tensor) -> torch.Tensor:
        start = torch.full_like(patches[:, :1], START, dtype=torch.long)
        return torch.cat((start, patches[:, :-1].long()), dim=1)

    def forward(self, h: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits: h (N, main_dim), patches (N, K) -> (N, K, 256)."""
        x = self.embed(self.conditioning_vectors(h), self.input_tokens(patches))
        return self.head(self.stack(x))

    def step(self, cond: torch.Tensor, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Cached decoding: feed `tokens` (N, L) at the cache's position; logits (N, L, 256)."""
        x = self.embed(cond, tokens, offset=cache.length)
        return self.head(self.stack(x, cache))


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a (U, D) table, with a backward pass that stays fast when rows repeat.

    The backward of advanced indexing (index_put_ with accumulate) serialises repeated indices on
    CUDA (pytorch/pytorch#41162), and real text repeats a few patches thousands of times per batch
    (runs of spaces, markup). The embedding backward sums repeated rows in parallel segments.
    """
    return F.embedding(index, table)


def row_bucket(device: torch.device) -> int:
    """Row counts that vary every step (distinct patches) are padded up to a multiple of this.

    On CUDA every new matrix shape costs a cuBLAS heuristics query on the host (about a millisecond),
    and the distinct-patch count is new every step; padded to a multiple of 512, a few shapes recur.
    Measured on an H100 at seq 2048 x batch 16, the IEM step was host-bound: 12 ms of GPU work in
    about 50 ms (docs/performance.md). Nothing to gain on a CPU.
    """
    return 512 if device.type == "cuda" else 1


def pad_rows(rows: torch.Tensor, multiple: int) -> torch.Tensor:
    """rows (U, ...) followed by zero rows up to a multiple of `multiple`."""
    extra = -rows.shape[0] % multiple
    if not extra:
        return rows
    return torch.cat((rows, rows.new_zeros((extra, *rows.shape[1:]))))


def patch_keys(patches: torch.Tensor) -> torch.Tensor:
    """One int64 per patch of up to 8 bytes: the bytes reinterpreted (zero-padded), so equal keys mean
    equal patches and deduplication or lookup is one sort on the device."""
    n, k = patches.shape
    if k > 8:
        raise ValueError(f"patch keys need patch_size <= 8, not {k}")
    packed = patches.to(torch.uint8)
    if k < 8:
        packed = F.pad(packed, (0, 8 - k))
    return packed.contiguous().view(torch.int64).view(n)


def unique_patches(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct patches of a (N, K) uint8 tensor: (unique (U, K), inverse (N,), counts (U,))."""
    k = patches.shape[1]
    if k <= 8:
        uniq_keys, inverse, counts = torch.unique(patch_keys(patches), return_inverse=True, return_counts=True)
        return uniq_keys.view(torch.uint8).view(-1, 8)[:, :k], inverse, counts
    return torch.unique(patches, dim=0, return_inverse=True, return_counts=True)


@dataclass
class EncodedPatches:
    """The encoder's vectors of a set of patches, each distinct patch encoded once.

    `vectors` has one row per distinct patch, then zero-patch padding rows up to `row_bucket`'s
    multiple (recurring shapes on CUDA); `per_patch()` gives every patch's own vector.
    """

    distinct: torch.Tensor  # (U, K) bytes
    inverse: torch.Tensor  # (N,) row of each patch in `distinct`
    counts: torch.Tensor  # (U,) occurrences of each distinct patch
    vectors: torch.Tensor  # (U + padding, D)

    def per_patch(self) -> torch.Tensor:
        return gather_rows(self.vectors, self.inverse)


class HAED(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.encoder = PatchEncoder(cfg)
        self.start = nn.Parameter(torch.zeros(cfg.main.dim))
        # Rotary tables for generous lengths up front: growing one inside a compiled step would recompile.
        self.main = Stack(cfg.main, causal=True, rope_base=cfg.rope_base,
                          max_positions=max(cfg.max_seq_len // cfg.patch_size + 1, 1 << 15))
        self.score_proj = nn.Linear(cfg.main.dim, cfg.main.dim, bias=False)  # W in s_t(P) = <W h_t, E(P)> / tau
        if cfg.score == "cosine":
            self.score_log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.decoder = ByteDecoder(cfg)
        init_weights(self)
        nn.init.normal_(self.start, std=0.02)

    def score_vectors(self, h: torch.Tensor, patch_vectors: torch.Tensor, candidates: torch.Tensor, tau: float):
        """IEM's score as a dot product: (queries from h_t, positives, candidates) such that q . v is the score."""
        q = self.score_proj(h)
        if self.cfg.score == "cosine":
            scale = self.score_log_scale.clamp(max=math.log(100.0)).exp()
            return (F.normalize(q, dim=-1) * scale.to(q.dtype), F.normalize(patch_vectors, dim=-1),
                    F.normalize(candidates, dim=-1))
        return q / tau, patch_vectors, candidates

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        B, N = x.shape
        return x.view(B, N // self.patch_size, self.patch_size)

    def main_inputs(self, patch_vectors: torch.Tensor) -> torch.Tensor:
        """(B, T-1, D) vectors of patches 1..T-1 -> (B, T, D) main-model inputs with the start vector first."""
        B = patch_vectors.shape[0]
        start = self.start.to(patch_vectors.dtype).expand(B, 1, -1)
        return torch.cat((start, patch_vectors), dim=1)

    def encode_patches(self, patches: torch.Tensor) -> EncodedPatches:
        """Encode (N, K) patches, each distinct one once (real text repeats many patches)."""
        distinct, inverse, counts = unique_patches(patches)
        vectors = self.encoder(pad_rows(distinct, row_bucket(patches.device)))
        return EncodedPatches(distinct, inverse, counts, vectors)

    def hidden_from_vectors(self, patch_vectors: torch.Tensor) -> torch.Tensor:
        """h_t for every patch from the (B, T, D) vectors of the patches themselves (shifted: h_t sees < t)."""
        return self.main(self.main_inputs(patch_vectors[:, :-1]))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """h_t for every patch of the byte windows x (B, N): (B, T, main_dim)."""
        p = self.patches(x)
        B, T, K = p.shape
        vectors = self.encode_patches(p.reshape(-1, K)).per_patch()
        return self.hidden_from_vectors(vectors.view(B, T, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Byte logits (B, N, 256) for the windows x (B, N): position i predicts byte i."""
        B, N = x.shape
        h = self.hidden(x)
        logits = self.decoder(h.reshape(-1, h.shape[-1]), self.patches(x).reshape(-1, self.patch_size))
        return logits.view(B, N, 256)


class FlatTransformer(nn.Module):
    """A byte-level causal transformer (the `main` stack over bytes): the non-hierarchical baseline."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(257, cfg.main.dim)
        self.stack = Stack(cfg.main, causal=True, rope_base=cfg.rope_base, max_positions=max(cfg.max_seq_len + 1, 1 << 15))
        self.head = nn.Linear(cfg.main.dim, 256, bias=False)
        init_weights(self)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, prepend_start: bool = True) -> torch.Tensor:
        tokens = x.long()
        if prepend_start:
            start = torch.full_like(tokens[:, :1], START)
            tokens = torch.cat((start, tokens[:, :-1]), dim=1)
        return self.head(self.stack(self.token_embedding(tokens), cache))


def init_weights(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, std=0.02)
    # Residual output projections shrink with depth (GPT-2) so that deep stacks start stable.
    for module in model.modules():
        if isinstance(module, Stack):
            scale = 0.02 / math.sqrt(2 * max(1, module.cfg.layers))
            for block in module.blocks:
                nn.init.normal_(block.attn.out.weight, std=scale)
                nn.init.normal_(block.mlp.down.weight, std=scale)


def build_model(cfg: ModelConfig) -> nn.Module:
    return HAED(cfg) if cfg.arch == "haed" else FlatTransformer(cfg)


def count_parameters(model: nn.Module) -> dict[str, int]:
    if isinstance(model, HAED):
        parts = {
            "encoder": model.encoder,
            "main": model.main,
            "decoder": model.decoder,
        }
        counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
        counts["main"] += model.start.numel() + model.score_proj.weight.numel()
        if hasattr(model, "score_log_scale"):
            counts["main"] += 1
    else:
        counts = {"flat": sum(p.numel() for p in model.parameters())}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def attention_flops(layers: int, dim: int, rows: int, context: int, causal: bool) -> float:
    """Forward FLOPs of the attention products (QK^T and AV) of a stack."""
    return 4.0 * rows * context * dim * layers * (0.5 if causal else 1.0)


def forward_flops(model: nn.Module, batch_size: int, seq_len: int, distinct: float | None = None,
                  candidates: float | None = None) -> dict[str, float]:
    """Matrix FLOPs of one forward pass over (batch_size, seq_len) bytes, per part of the model.

    2 x linear weights x rows, attention 4 x rows x context x dim per layer (halved when causal);
    embedding lookups, norms and elementwise work are not counted. The encoder runs on the `distinct`
    patches (default: every patch); IEM's "scores" are W h_t and the rows x `candidates` products.
    A flat model has one part, "flat".
    """
    B, N = batch_size, seq_len
    if not isinstance(model, HAED):
        s = model.cfg.main
        flat = 2.0 * (linear_weights(model.stack) + model.head.weight.numel()) * B * N
        return {"flat": flat + attention_flops(s.layers, s.dim, B * N, N, True)}
    cfg = model.cfg
    K = cfg.patch_size
    T = N // K
    U = float(distinct if distinct is not None else B * T)
    C = float(candidates if candidates is not None else U)
    return {
        "encoder": (2.0 * linear_weights(model.encoder.stack) * U * K + 2.0 * model.encoder.proj.weight.numel() * U
                    + attention_flops(cfg.encoder.layers, cfg.encoder.dim, int(U * K), K, False)),
        "main": 2.0 * linear_weights(model.main) * B * T + attention_flops(cfg.main.layers, cfg.main.dim, B * T, T, True),
        "decoder": (2.0 * model.decoder.condition.weight.numel() * B * T
                    + 2.0 * (linear_weights(model.decoder.stack) + model.decoder.head.weight.numel()) * B * N
                    + attention_flops(cfg.decoder.layers, cfg.decoder.dim, B * N, K, True)),
        "scores": 2.0 * model.score_proj.weight.numel() * B * T + 2.0 * B * T * C * cfg.main.dim,
    }
