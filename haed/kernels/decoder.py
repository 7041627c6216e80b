"""The byte decoder's whole patch as one Triton kernel (`decoder_kernel`, driven by `DecoderKernels`).

A generation step of the decoder is one row per stream through a few small layers (the `speech`
recipe: 3 x 256), so its time is set by launch count and load latency, not by arithmetic (the eager
step launches about 144 kernels per byte at `speech`; one launch per layer with one program per head
left most SMs idle: docs/performance.md, 6d). `decoder_kernel` runs the K positions of a patch in one
launch of up to 64 programs, one per SM at most. Each byte passes through every layer in four stages
(`haed.kernels.stages`), then the head:

- qkv: the layer's input (at layer 0 the byte's embedding and its conditioning vector), the norm,
  and a few rotary pairs of rows of W_qkv per task: queries to a buffer, keys and values to the cache;
- attention: each task attends with every head over the cached positions (a few KB) and computes a
  few rows of the output projection, added to the residual stream;
- up: the norm and a few hidden units per task: gate, value, SiLU;
- down: a few rows of the down projection per task, added to the residual stream;
- head: the final norm and a few logits per task, each task keeping its first maximum of logits plus
  the counter-based Gumbel noise of `haed.sampling.StreamNoise`, computed in place (greedy and
  temperature-only sampling); for top-k and top-p it writes the logits, and the byte is drawn by
  `sample_bytes` between launches of one position each.
"""

from __future__ import annotations

import os

import torch

from haed.kernels.support import pow2, sm_count, stacked_weights
from haed.layers import START

try:  # the kernels exist where Triton does (a CUDA build of torch); nothing else here needs it
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:
    from haed.kernels.stages import (
        arrive,
        attention_stage,
        down_stage,
        load_residual,
        load_rows,
        picked_bytes,
        qkv_stage,
        rms_norm,
        times_t,
        up_stage,
        wait,
    )

    @triton.jit
    def mix32(h):
        h = h ^ (h >> 16)
        h = h * 0x85EBCA6B
        h = h ^ (h >> 13)
        h = h * 0xC2B2AE35
        return h ^ (h >> 16)

    @triton.jit
    def head_stage(
        pid, nprog, counter_ptr, target, synced, pos, norm_ptr, head_ptr, x_ptr, logits_ptr, best_ptr,
        best_byte_ptr, k0_ptr, k1_ptr, byte_keys_ptr, positions_ptr, B, eps, temperature,
        D: tl.constexpr, BB: tl.constexpr, DOT: tl.constexpr, HEAD_R: tl.constexpr, RULE: tl.constexpr,
    ):  # fmt: skip
        """The final norm and HEAD_R logits per task. RULE 0 (greedy) and 1 (Gumbel-max at `temperature`,
        with `StreamNoise`'s uniforms for (stream key, output position, byte value) bit for bit) keep
        each task's first maximum and its byte; RULE 2 writes the logits (the rule runs afterwards)."""
        HT: tl.constexpr = 256 // HEAD_R
        cols = tl.arange(0, D)
        norm_w = tl.load(norm_ptr + cols)
        for t in range(pid, HT, nprog):
            byte_values = t * HEAD_R + tl.arange(0, HEAD_R)
            w = load_rows(head_ptr + t * HEAD_R * D, D, HEAD_R, HEAD_R, D)
            if t == pid:
                wait(counter_ptr, target, synced)
            for r0 in range(0, B, BB):
                rows = r0 + tl.arange(0, BB)
                rmask = rows < B
                xn = rms_norm(load_residual(x_ptr, rows, rmask, D), norm_w, eps, D)
                logits = times_t(xn, w, DOT).to(tl.bfloat16)
                if RULE == 2:
                    tl.store(logits_ptr + rows[:, None] * 256 + byte_values[None, :], logits, mask=rmask[:, None])
                else:
                    scores = logits.to(tl.float32)
                    if RULE == 1:
                        step = (tl.load(positions_ptr + pos) & 0xFFFFFFFF).to(tl.uint32)
                        k0 = tl.load(k0_ptr + rows, mask=rmask, other=0).to(tl.uint32)
                        k1 = tl.load(k1_ptr + rows, mask=rmask, other=0).to(tl.uint32)
                        stream = mix32(mix32(step ^ k0) ^ k1)
                        if temperature != 1.0:
                            scores = scores / temperature
                        keys = tl.load(byte_keys_ptr + byte_values).to(tl.uint32)
                        u = (
                            (mix32(stream[:, None] ^ keys[None, :]) >> 9).to(tl.float32) + 0.5
                        ) * 1.1920928955078125e-07
                        scores = scores - tl.log(-tl.log(u))
                    best = tl.max(scores, axis=1)
                    best_byte = tl.argmax(scores, axis=1, tie_break_left=True) + t * HEAD_R
                    tl.store(best_ptr + rows * HT + t, best, mask=rmask)
                    tl.store(best_byte_ptr + rows * HT + t, best_byte.to(tl.int32), mask=rmask)
        if pid >= HT:
            wait(counter_ptr, target, synced)

    @triton.jit
    def store_bytes(
        pid, counter_ptr, target, synced, pos, bytes_ptr, best_ptr, best_byte_ptr, B,
        KC: tl.constexpr, BB: tl.constexpr, HT: tl.constexpr, HTP: tl.constexpr,
    ):  # fmt: skip
        if pid == 0:
            wait(counter_ptr, target, synced)
            for r0 in range(0, B, BB):
                rows = r0 + tl.arange(0, BB)
                rmask = rows < B
                byte = picked_bytes(best_ptr, best_byte_ptr, rows, rmask, HT, HTP)
                tl.store(bytes_ptr + rows * KC + pos, byte.to(tl.uint8), mask=rmask)

    # Triton compiles a kernel again for each integer argument that is 1 or a multiple of 16 where it was
    # not (its specialisations): the positions, layers, stage and program count, which change between
    # the stage-by-stage launches and with `programs`, are not specialised, so they share one compilation.
    @triton.jit(do_not_specialize=["first_pos", "end_pos", "first_layer", "end_layer", "stage", "nprog"])
    def decoder_kernel(
        bytes_ptr, emb_ptr, cond_ptr, cond_len,
        norm1_ptr, qkv_ptr, out_ptr, norm2_ptr, up_ptr, down_ptr, final_norm_ptr, head_ptr,
        cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr,
        x_ptr, q_ptr, hidden_ptr, best_ptr, best_byte_ptr, logits_ptr, counter_ptr,
        k0_ptr, k1_ptr, byte_keys_ptr, positions_ptr,
        B, first_pos, end_pos, first_layer, end_layer, stage, nprog, eps, scale, temperature, H,
        D: tl.constexpr, HD: tl.constexpr, NH: tl.constexpr, KC: tl.constexpr, KP: tl.constexpr,
        HP: tl.constexpr, ADD: tl.constexpr, START: tl.constexpr, RULE: tl.constexpr, BB: tl.constexpr,
        DOT: tl.constexpr, QP: tl.constexpr, OUT_R: tl.constexpr, UP_R: tl.constexpr, DOWN_R: tl.constexpr,
        HEAD_R: tl.constexpr,
    ):  # fmt: skip
        """`stage` -1: decoder positions first_pos .. end_pos - 1, every stage of layers first_layer ..
        end_layer - 1 and the head, the `nprog` programs meeting between stages (`arrive`, `wait`: all of
        them must be resident at once, so nprog is at most the SM count). `stage` 0-5 (qkv, attention, up,
        down, head, the bytes): that stage alone, at position first_pos, of the layer first_layer (Triton's
        interpreter runs programs one after another, so it cannot wait). The same code runs both ways."""
        pid = tl.program_id(0)
        HT: tl.constexpr = 256 // HEAD_R
        HTP: tl.constexpr = HT if HT > 1 else 2
        synced = stage < 0
        syncs = 0  # arrivals so far, over all programs
        for pos in range(first_pos, end_pos):
            for layer in range(first_layer, end_layer):
                if synced | (stage == 0):
                    qkv_stage(
                        pid, nprog, counter_ptr, syncs, synced, layer, pos, pos > first_pos, bytes_ptr, emb_ptr,
                        cond_ptr, cond_len, norm1_ptr, qkv_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, x_ptr,
                        q_ptr, best_ptr, best_byte_ptr, B, eps, D, HD, NH, KC, ADD, START, BB, DOT, QP, HT, HTP, 1, 1,
                    )  # fmt: skip
                    arrive(counter_ptr, synced)
                    syncs += nprog
                if synced | (stage == 1):
                    attention_stage(
                        pid, nprog, counter_ptr, syncs, synced, layer, pos, q_ptr, k_cache_ptr, v_cache_ptr,
                        out_ptr, x_ptr, B, scale, D, HD, NH, KC, KP, BB, DOT, OUT_R, 1, False,
                    )  # fmt: skip
                    arrive(counter_ptr, synced)
                    syncs += nprog
                if synced | (stage == 2):
                    up_stage(
                        pid, nprog, counter_ptr, syncs, synced, layer, norm2_ptr, up_ptr, x_ptr, hidden_ptr,
                        B, eps, H, D, HP, BB, DOT, UP_R,
                    )  # fmt: skip
                    arrive(counter_ptr, synced)
                    syncs += nprog
                if synced | (stage == 3):
                    down_stage(
                        pid, nprog, counter_ptr, syncs, synced, layer, down_ptr, hidden_ptr, x_ptr, B, H,
                        D, HP, BB, DOT, DOWN_R, False,
                    )  # fmt: skip
                    arrive(counter_ptr, synced)
                    syncs += nprog
            if synced | (stage == 4):
                head_stage(
                    pid, nprog, counter_ptr, syncs, synced, pos, final_norm_ptr, head_ptr, x_ptr, logits_ptr,
                    best_ptr, best_byte_ptr, k0_ptr, k1_ptr, byte_keys_ptr, positions_ptr, B, eps, temperature,
                    D, BB, DOT, HEAD_R, RULE,
                )  # fmt: skip
                arrive(counter_ptr, synced)
                syncs += nprog
            if RULE != 2:
                if synced | (stage == 5):
                    store_bytes(
                        pid, counter_ptr, syncs, synced, pos, bytes_ptr, best_ptr, best_byte_ptr, B, KC, BB, HT, HTP
                    )


class DecoderKernels:
    """The decoder's byte steps for `batch` streams as one Triton kernel over a sampler's buffers.

    `patch()` runs decoder positions 0 .. K - 1 in one launch when the kernel draws the bytes (greedy or
    temperature only), writing them to `patch_bytes[:, 0]` with the noise of output positions
    `positions`. `step(k)` runs position k alone: it reads the patch's bytes before k from
    `patch_bytes` (B, 1, K) uint8, its conditioning from `cond`, writes position k's keys and values
    into `cache`, and either draws byte k into `patch_bytes` (returning None) or, for top-k and top-p,
    returns the (B, 256) bf16 logits. Every launch has fixed arguments, so a patch of steps can be
    captured in a CUDA graph.

    `persistent` (the default on CUDA): one launch of `programs` programs runs every stage, meeting at
    a grid-wide sync between stages; otherwise (Triton's interpreter) each stage is its own launch, with
    the same arithmetic in the same order, so the two give the same numbers bit for bit.

    `programs` (default 64) and `warps` (default 4 for one stream, 8 for blocks of 16) were chosen with
    `benchmarks/decoder_kernel.py` on an H200 (docs/performance.md, 6f).
    """

    def __init__(
        self, decoder, cache, cond: torch.Tensor, patch_bytes: torch.Tensor, options, noise, positions,
        persistent: bool | None = None, programs: int | None = None, warps: int | None = None,
    ):  # fmt: skip
        stack = decoder.stack
        cfg = stack.cfg
        self.cache, self.cond, self.patch_bytes = cache, cond, patch_bytes
        self.batch, self.K = patch_bytes.shape[0], patch_bytes.shape[2]
        self.dim, self.heads, self.head_dim = cfg.dim, cfg.heads, cfg.dim // cfg.heads
        self.layers = cfg.layers
        self.hidden = stack.blocks[0].mlp.down.in_features
        dev = cond.device
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        self.persistent = not interpreted if persistent is None else persistent
        # One program per SM at most, so that all are resident at once and can wait for each other.
        # (Two in the interpreter: tasks still stride over programs, at little cost.)
        self.programs = min(programs or (2 if interpreted else 64), sm_count(dev))
        # Streams per block of rows: one alone; else 16 with tensor-core products (tl.dot takes 16 rows
        # and widths of 16; rows past the batch are masked), or as few as the batch needs.
        self.dot = self.batch > 1 and self.head_dim >= 32 and self.dim >= 16
        self.rows = 1 if self.batch == 1 else 16 if self.dot else min(16, pow2(self.batch))
        # Rows of each stage's weights per task: few on a GPU, so that a stage's work spreads over every
        # program (16 with tensor-core products); in Triton's interpreter, whose cost is per operation
        # more than per element, one task per stage where it can. Outputs are split, never sums, so the
        # split does not change the numbers.
        if interpreted:
            self.pairs, self.out_rows, self.down_rows = self.head_dim // 2, self.dim, self.dim
            self.up_rows, self.head_rows = min(pow2(self.hidden), 256), 256
        else:
            wide = 16 if self.dot else 4
            self.pairs = min(16 if self.dot else 8, self.head_dim // 2)
            self.out_rows = self.down_rows = self.head_rows = wide
            self.up_rows = 16
        self.norm1, self.qkv, self.out, self.norm2, self.up, self.down, self.final_norm = stacked_weights(stack)
        self.head = decoder.head.weight
        self.embedding = decoder.token_embedding.weight
        self.add = decoder.conditioning == "add"
        f32 = dict(device=dev, dtype=torch.float32)
        self.hidden_pad = pow2(self.hidden)
        # Warps per program: 4 for one stream (on an H200, 275 us per `speech` patch against 317 at 8);
        # 8 for blocks of 16 streams, whose tiles spill at 4.
        self.warps = warps or (4 if self.batch == 1 else 8)
        self.x = torch.zeros(self.batch, self.dim, **f32)
        self.q = torch.zeros(self.batch, self.dim, device=dev, dtype=torch.bfloat16)
        self.hidden_units = torch.zeros(self.batch, self.hidden_pad, device=dev, dtype=torch.bfloat16)
        head_tasks = 256 // self.head_rows
        self.best = torch.zeros(self.batch, head_tasks, **f32)
        self.best_byte = torch.zeros(self.batch, head_tasks, device=dev, dtype=torch.int32)
        self.logits = torch.zeros(self.batch, 256, device=dev, dtype=torch.bfloat16)
        self.counter = torch.zeros(1, device=dev, dtype=torch.int32)
        if options.temperature == 0:
            self.rule = 0
        elif options.top_k == 0 or options.top_k >= 256:
            self.rule = 1 if options.top_p >= 1 and noise is not None else 2
        else:
            self.rule = 2
        self.temperature = float(options.temperature)
        self.positions = positions
        if self.rule == 1:
            self.k0, self.k1, self.byte_keys = noise.k0.view(-1), noise.k1.view(-1), noise.byte_keys
        else:
            self.k0 = self.k1 = self.byte_keys = torch.zeros(1, dtype=torch.int64, device=dev)
        # Rotary tables for positions 0 .. K - 1, as the stack's cached step reads them.
        cos, sin = stack.rope(0, self.K)
        self.cos, self.sin = cos.contiguous(), sin.contiguous()
        self.eps = torch.finfo(torch.float32).eps  # F.rms_norm's default for the float32 residual stream
        self.scale = self.head_dim**-0.5
        self.draws = self.rule != 2

    def _launch(self, first: int, end: int, stage: int = -1, layer: int = 0) -> None:
        # num_stages=1: no software pipelining of the task loops, whose buffers asked for 303 KB of shared
        # memory at 16 rows (an H200 has 227 KB); a task's loads are already issued together.
        if stage < 0:
            layers = (0, self.layers)
        else:
            layers = (layer, layer + 1) if stage < 4 else (0, 0)
        decoder_kernel[(self.programs,)](
            self.patch_bytes, self.embedding, self.cond, self.cond.shape[1],
            self.norm1, self.qkv, self.out, self.norm2, self.up, self.down, self.final_norm, self.head,
            self.cos, self.sin, self.cache.k_layers, self.cache.v_layers,
            self.x, self.q, self.hidden_units, self.best, self.best_byte, self.logits, self.counter,
            self.k0, self.k1, self.byte_keys, self.positions,
            self.batch, first, end, *layers, stage, self.programs, self.eps, self.scale, self.temperature,
            self.hidden,
            D=self.dim, HD=self.head_dim, NH=self.heads, KC=self.K, KP=pow2(self.K), HP=self.hidden_pad,
            ADD=self.add, START=START, RULE=self.rule, BB=self.rows, DOT=self.dot, QP=self.pairs,
            OUT_R=self.out_rows, UP_R=self.up_rows, DOWN_R=self.down_rows, HEAD_R=self.head_rows,
            num_warps=self.warps, num_stages=1,
        )  # fmt: skip

    def _run(self, first: int, end: int) -> None:
        if self.persistent:
            self.counter.zero_()
            self._launch(first, end)
            return
        for k in range(first, end):
            for layer in range(self.layers):
                for stage in range(4):
                    self._launch(k, k + 1, stage, layer)
            self._launch(k, k + 1, 4)
            if self.draws:
                self._launch(k, k + 1, 5)

    def patch(self) -> None:
        """Positions 0 .. K - 1, drawing every byte (a rule the kernel draws: `draws`)."""
        assert self.draws
        self._run(0, self.K)

    def step(self, k: int) -> torch.Tensor | None:
        """Position k: None when the kernel drew the byte, else the (B, 256) logits."""
        self._run(k, k + 1)
        return None if self.draws else self.logits
