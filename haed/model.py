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

from haed.config import ModelConfig, TrainConfig
from haed.layers import START, KVCache, Stack, attention_flops, linear_weights


class PatchEncoder(nn.Module):
    """Maps each patch of K bytes, with no context outside it, to one vector of the main width.

    Recomputed (`recompute`), it keeps no activations for the backward pass but its input bytes, in
    `recompute_chunks` chunks of patches (a phase's `encoder_chunks`), and recomputes and back-propagates one
    chunk at a time. Block by block, as the other stacks recompute, the one-block encoder would recompute all
    its activations at once in the backward pass, when the main model's gradients are alive too: it moved IEM's
    peak by 0.02 GiB on an H100; in chunks, 0.29 GiB (seq 2,048 x batch 16, the `code` recipe with a 4 x 512
    decoder), at 5.3 ms a step that the FLOPs do not explain (docs/2026-12-06-big-corpora.md, seventh
    session), when only its stack was compiled: the 4 chunks added 10 compiled calls and 79 eager operators
    to the host's work per step (counted on the CPU, benchmarks/trace_step.py --cpu-inductor). Training now
    compiles the whole encoder (haed.steps.compile_stacks): the chunks' forward, recomputation and backward
    are one compiled forward and one backward call a step. Patches are independent, so the chunks give the
    same vectors and gradients.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        k, d = cfg.patch_size, cfg.encoder.dim
        self.cfg = cfg.encoder
        self.pooling = cfg.pooling
        self.recompute = cfg.encoder.recompute  # a training phase may turn recomputation on for itself
        self.recompute_chunks = TrainConfig.encoder_chunks  # and its chunks (haed.steps.apply_recompute)
        self.byte_embedding = nn.Embedding(256, d)
        self.stack = Stack(cfg.encoder, causal=False, rope_base=cfg.rope_base, max_positions=k)
        self.stack.recompute = False  # the encoder recomputes whole, in chunks of patches (above)
        self.proj = nn.Linear(k * d if cfg.pooling == "concat" else d, cfg.main.dim, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: (..., K) bytes -> (..., main_dim)."""
        lead, k = patches.shape[:-1], patches.shape[-1]
        rows = patches.reshape(-1, k)
        if self.recompute and self.training and torch.is_grad_enabled():
            chunks = rows.tensor_split(min(self.recompute_chunks, max(1, rows.shape[0])))
            # Without dropout the encoder draws no random numbers: nothing to restore, and saving the CUDA
            # generator's state per chunk would cost the host time.
            rng = self.cfg.dropout > 0
            parts = []
            for c in chunks:  # a loop, not a comprehension: torch.compile traces a checkpoint in a loop's body
                parts.append(
                    torch.utils.checkpoint.checkpoint(self.encode_rows, c, use_reentrant=False, preserve_rng_state=rng)
                )
            vectors = torch.cat(parts)
        else:
            vectors = self.encode_rows(rows)
        return vectors.view(*lead, -1)

    def encode_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(R, K) bytes -> (R, main_dim)."""
        # F.embedding with the weight, not the module: torch.compile (2.13, dynamic shapes) fails to trace the
        # module's call inside a checkpointed chunk whose row count is symbolic.
        x = self.stack(F.embedding(rows.long(), self.byte_embedding.weight))
        x = x.flatten(1) if self.pooling == "concat" else x.mean(dim=1)
        return self.proj(x)


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


def unique_patches_fixed(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`unique_patches` in shapes that do not depend on the data: (distinct (N, K), inverse (N,), counts (N,))
    for N patches (K <= 8), the U distinct ones first in `unique_patches`' order, then N - U zero rows with count 0.

    `torch.unique` must tell the host U before anything can be shaped by it: on CUDA a synchronisation in
    every IEM step, after which the GPU waits for the host's next launches. A sort, a comparison of
    neighbours and scatters need no such count: the host runs ahead, and the shapes recur every step.
    """
    n, k = patches.shape
    sorted_keys, order = torch.sort(patch_keys(patches))
    first = torch.ones(n, dtype=torch.bool, device=patches.device)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group = torch.cumsum(first, 0) - 1  # each sorted patch's row among the distinct ones
    inverse = torch.empty_like(group).scatter_(0, order, group)
    counts = torch.zeros(n, dtype=torch.long, device=patches.device).scatter_add_(0, group, torch.ones_like(group))
    slot = torch.where(first, group, n)  # repeats write to a spare row n, dropped below
    distinct = patches.new_zeros((n + 1, k)).index_copy_(0, slot, patches[order])[:n]
    return distinct, inverse, counts


@dataclass
class EncodedPatches:
    """The encoder's vectors of a set of patches, each distinct patch encoded once.

    `vectors` has one row per distinct patch, then zero-patch padding rows up to `row_bucket`'s
    multiple (recurring shapes on CUDA); `per_patch()` gives every patch's own vector. Found with fixed
    shapes (`unique_patches_fixed`), U is N: the rows after the distinct ones are zero patches of count 0.
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
        self.main = Stack(
            cfg.main,
            causal=True,
            rope_base=cfg.rope_base,
            max_positions=max(cfg.max_seq_len // cfg.patch_size + 1, 1 << 15),
        )
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
            return (
                F.normalize(q, dim=-1) * scale.to(q.dtype),
                F.normalize(patch_vectors, dim=-1),
                F.normalize(candidates, dim=-1),
            )
        return q / tau, patch_vectors, candidates

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        B, N = x.shape
        return x.view(B, N // self.patch_size, self.patch_size)

    def main_inputs(self, patch_vectors: torch.Tensor) -> torch.Tensor:
        """(B, T-1, D) vectors of patches 1..T-1 -> (B, T, D) main-model inputs with the start vector first."""
        B = patch_vectors.shape[0]
        start = self.start.to(patch_vectors.dtype).expand(B, 1, -1)
        return torch.cat((start, patch_vectors), dim=1)

    def encode_patches(self, patches: torch.Tensor, fixed_shapes: bool = False) -> EncodedPatches:
        """Encode (N, K) patches, each distinct one once (real text repeats many patches). `fixed_shapes`:
        through `unique_patches_fixed` (N rows, zero patches after the distinct ones), without a host
        synchronisation."""
        distinct, inverse, counts = (unique_patches_fixed if fixed_shapes else unique_patches)(patches)
        rows = pad_rows(distinct, row_bucket(patches.device))
        # The row count changes every step (not with fixed shapes): compiled (haed.steps.compile_stacks), one
        # graph for every count. Inside IEM's loss compiled whole (fixed shapes) every shape is static, and
        # torch.compile refuses the call.
        if not torch.compiler.is_compiling():
            torch._dynamo.maybe_mark_dynamic(rows, 0)
        vectors = self.encoder(rows)
        return EncodedPatches(distinct, inverse, counts, vectors)

    def hidden_from_vectors(self, patch_vectors: torch.Tensor) -> torch.Tensor:
        """h_t for every patch from the (B, T, D) vectors of the patches themselves (shifted: h_t sees < t)."""
        return self.main(self.main_inputs(patch_vectors[:, :-1]))

    def main_inputs_of(self, x: torch.Tensor, fixed_shapes: bool = False) -> torch.Tensor:
        """The main model's (B, T, D) inputs for the byte windows x (B, N): start vector, then patches 1..T-1.
        `fixed_shapes`: as in `encode_patches`."""
        p = self.patches(x)
        B, T, K = p.shape
        vectors = self.encode_patches(p.reshape(-1, K), fixed_shapes).per_patch()
        return self.main_inputs(vectors.view(B, T, -1)[:, :-1])

    def hidden(self, x: torch.Tensor, fixed_shapes: bool = False) -> torch.Tensor:
        """h_t for every patch of the byte windows x (B, N): (B, T, main_dim)."""
        return self.main(self.main_inputs_of(x, fixed_shapes))

    def forward(self, x: torch.Tensor, fixed_shapes: bool = False) -> torch.Tensor:
        """Byte logits (B, N, 256) for the windows x (B, N): position i predicts byte i. `fixed_shapes`: every
        shape follows from x's (the distinct patches found without a host synchronisation, `encode_patches`)."""
        B, N = x.shape
        h = self.hidden(x, fixed_shapes)
        logits = self.decoder(h.reshape(-1, h.shape[-1]), self.patches(x).reshape(-1, self.patch_size))
        return logits.view(B, N, 256)


class FlatTransformer(nn.Module):
    """A byte-level causal transformer (the `main` stack over bytes): the non-hierarchical baseline."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(257, cfg.main.dim)
        self.stack = Stack(
            cfg.main, causal=True, rope_base=cfg.rope_base, max_positions=max(cfg.max_seq_len + 1, 1 << 15)
        )
        self.head = nn.Linear(cfg.main.dim, 256, bias=False)
        init_weights(self)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, prepend_start: bool = True) -> torch.Tensor:
        tokens = x.long()
        if prepend_start:
            start = torch.full_like(tokens[:, :1], START)
            tokens = torch.cat((start, tokens[:, :-1]), dim=1)
        return self.head(self.stack(self.token_embedding(tokens), cache))


def init_weights(model: nn.Module) -> None:
    for p in model.parameters():
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
    if cfg.arch == "megabyte":  # the peer, from its own package (haed.peer imports it only when asked)
        from haed.peer import MegabytePeer

        return MegabytePeer(cfg)
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
    elif hasattr(model, "parameter_counts"):  # the MEGABYTE peer: its global and local models
        return model.parameter_counts()
    else:
        counts = {"flat": sum(p.numel() for p in model.parameters())}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def forward_flops(
    model: nn.Module, batch_size: int, seq_len: int, distinct: float | None = None, candidates: float | None = None
) -> dict[str, float]:
    """Matrix FLOPs of one forward pass over (batch_size, seq_len) bytes, per part of the model.

    2 x linear weights x rows, attention 4 x rows x context x dim per layer (halved when causal);
    embedding lookups, norms and elementwise work are not counted. The encoder runs on the `distinct`
    patches (default: every patch); IEM's "scores" are W h_t and the rows x `candidates` products.
    A flat model has one part, "flat"; the MEGABYTE peer one, "megabyte".
    """
    B, N = batch_size, seq_len
    if hasattr(model, "forward_flops"):  # the MEGABYTE peer counts its own
        return model.forward_flops(B, N)
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
        "encoder": (
            2.0 * linear_weights(model.encoder.stack) * U * K
            + 2.0 * model.encoder.proj.weight.numel() * U
            + attention_flops(cfg.encoder.layers, cfg.encoder.dim, int(U * K), K, False)
        ),
        "main": 2.0 * linear_weights(model.main) * B * T
        + attention_flops(cfg.main.layers, cfg.main.dim, B * T, T, True),
        "decoder": (
            2.0 * model.decoder.condition.weight.numel() * B * T
            + 2.0 * (linear_weights(model.decoder.stack) + model.decoder.head.weight.numel()) * B * N
            + attention_flops(cfg.decoder.layers, cfg.decoder.dim, B * N, K, True)
        ),
        "scores": 2.0 * model.score_proj.weight.numel() * B * T + 2.0 * B * T * C * cfg.main.dim,
    }
