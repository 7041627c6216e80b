"""Triton kernels for a patch step of generation: the byte decoder's whole patch in one launch, and
for one stream the encoder and main model's step in another (`main_kernel`, `MainKernels`).

A generation step of the decoder is one row per stream through a few small layers (the `speech`
recipe: 3 x 256), so its time is set by launch count and load latency, not by arithmetic (the eager
step launches about 144 kernels per byte at `speech`; one launch per layer with one program per head
left most SMs idle: docs/performance.md, 6d). `decoder_kernel` runs the K positions of a patch in one
launch of up to 64 programs, one per SM at most. Each byte passes through every layer in four stages,
then the head:

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

Between stages the programs meet at a grid-wide sync (`arrive`, `wait`: an atomic counter with
release and acquire); a stage loads its weights before it waits. The next byte's embedding takes the
first of the head's maxima. Outputs are split over programs and sums never are, so no number depends
on the split, and a run is deterministic. Triton's interpreter, which runs programs one after
another, runs the same code stage by stage, one launch each.

The arithmetic follows the model under bf16 autocast: bf16 weights and matrix inputs with float32
accumulation, each Linear's output rounded to bf16, the residual stream and the norms in float32,
softmax in float32. It differs from the eager step only in the order of float32 sums (and the
attention weights are not rounded to bf16 as flash attention rounds them), so a draw changes only at
a near tie, as with the compiled step. Measured on an H200 (docs/performance.md, 6e-6f): for one
stream the fastest way to generate; for 64 streams slower than the compiled step. This module imports
Triton; the rest of haed imports it only when the kernels are asked for.

`main_kernel` reuses the decoder's stages: the encoder's K positions of one stream are its rows (each
with its own rotary position, every position seeing every other), then a stage pools them into the
main model's input; the main model's layers are the decoder's stages with attention over the long
cache split into parts per head (`split_attention_stage`) and combined with the output projection
(`combine_out_stage`); a last stage writes the decoder's conditioning. About 46 stages at `speech`.
"""

from __future__ import annotations

import os

import torch

from haed.layers import START

try:  # the kernels exist where Triton does (a CUDA build of torch); nothing else here needs it
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def _width_reason(name: str, stack_cfg) -> str | None:
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
    return _width_reason("decoder", model_cfg.decoder)


def unsupported_reason(model) -> str | None:
    """`config_unsupported_reason` for a sampler's model, which must also have bf16 Linear weights (a
    sampler made under CUDA autocast: `haed.generate.linear_weights_in`)."""
    weight = next(model.parameters())
    reason = config_unsupported_reason(model.cfg, weight.device)
    if reason is None and model.decoder.head.weight.dtype != torch.bfloat16:
        return "they need bf16 Linear weights (a sampler made under CUDA autocast)"
    return reason


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


if triton is not None:
    # Every load that does not depend on an earlier result is written before it is needed, and short
    # loops are unrolled (`tl.static_range`), so that a program's loads are in flight together: at one
    # row a stage's time is load latency, not arithmetic. Data that other programs of the same launch
    # wrote (the residual stream, queries, the cache, hidden units, the head's maxima) is read with
    # `.cg`, from L2, never from an SM's own L1, which is not kept coherent.

    @triton.jit
    def load_rows(w_ptr, stride, rows_valid, NR: tl.constexpr, NC: tl.constexpr):
        """W[:NR, :NC] as a (NR, NC) tile, row r at w_ptr + r * stride; rows from `rows_valid` on read as 0."""
        r = tl.arange(0, NR)
        c = tl.arange(0, NC)
        return tl.load(w_ptr + r[:, None] * stride + c[None, :], mask=(r < rows_valid)[:, None], other=0.0)

    @triton.jit
    def times_t(x, w, DOT: tl.constexpr):
        """x (BB, NC) bf16 times the transpose of the tile w (NR, NC): (BB, NR) float32."""
        if DOT:
            return tl.dot(x, tl.trans(w))
        return tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)

    @triton.jit
    def rms_norm(x, w, eps, D: tl.constexpr):
        """x (BB, D) float32 and the norm's weight (D,) -> normalized times the weight, as bf16."""
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        return (x * rstd[:, None] * w[None, :]).to(tl.bfloat16)

    @triton.jit
    def load_residual(x_ptr, rows, rmask, D: tl.constexpr):
        cols = tl.arange(0, D)
        return tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=rmask[:, None], other=0.0, cache_modifier=".cg")

    @triton.jit
    def add_to_residual(x_ptr, rows, rmask, cols, out, D: tl.constexpr, ROUND: tl.constexpr):
        """x[rows, cols] += out, the bf16 rounding of a Linear's float32 output (each column has one writer).
        ROUND: the sum rounded to bf16 too, for a residual stream that is bf16 in the model (the main
        model's, whose input is the encoder's bf16 output)."""
        offs = rows[:, None] * D + cols[None, :]
        m = rmask[:, None]
        x = tl.load(x_ptr + offs, mask=m, other=0.0, cache_modifier=".cg")
        x = x + out.to(tl.bfloat16).to(tl.float32)
        if ROUND:
            x = x.to(tl.bfloat16).to(tl.float32)
        tl.store(x_ptr + offs, x, mask=m)

    @triton.jit
    def arrive(counter_ptr, synced):
        """This program has written everything of its stage (`synced`: the stages run in one launch)."""
        if synced:
            tl.debug_barrier()  # the program's threads have all written
            tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")

    @triton.jit
    def wait(counter_ptr, target, synced):
        """Until every program has arrived `target / programs` times: the counter (zeroed before the launch)
        reaches `target`. With `arrive`'s release, this acquire makes every write before any program's
        arrival visible to this program. Stages call it after loading their weights, which do not
        depend on the stage before, so those loads are in flight while the program waits."""
        if synced:
            seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
            while seen < target:
                seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
            tl.debug_barrier()

    @triton.jit
    def mix32(h):
        h = h ^ (h >> 16)
        h = h * 0x85EBCA6B
        h = h ^ (h >> 13)
        h = h * 0xC2B2AE35
        return h ^ (h >> 16)

    @triton.jit
    def picked_bytes(best_ptr, best_byte_ptr, rows, rmask, HT: tl.constexpr, HTP: tl.constexpr):
        """The byte the head stage drew for each row: the first maximum over its HT tasks' maxima (tasks
        are in byte order and each keeps its first maximum, so this is the first maximum of all 256)."""
        c = tl.arange(0, HTP)
        m = rmask[:, None] & (c < HT)[None, :]
        scores = tl.load(best_ptr + rows[:, None] * HT + c[None, :], mask=m, other=float("-inf"), cache_modifier=".cg")
        task = tl.argmax(scores, axis=1, tie_break_left=True)
        return tl.load(best_byte_ptr + rows * HT + task, mask=rmask, other=0, cache_modifier=".cg")

    @triton.jit
    def qkv_stage(
        pid, nprog, counter_ptr, target, synced, layer, pos, from_best, bytes_ptr, emb_ptr, cond_ptr, cond_len,
        norm1_ptr, qkv_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, x_ptr, q_ptr, best_ptr,
        best_byte_ptr, B, eps,
        D: tl.constexpr, HD: tl.constexpr, NH: tl.constexpr, KC: tl.constexpr, ADD: tl.constexpr,
        START: tl.constexpr, BB: tl.constexpr, DOT: tl.constexpr, QP: tl.constexpr, HT: tl.constexpr,
        HTP: tl.constexpr, EMBED: tl.constexpr, PER: tl.constexpr,
    ):  # fmt: skip
        """The layer's input, its norm, and QP rotary pairs of rows of the query, key or value per task:
        queries to q, keys and values to the cache (KC positions per stream and head).

        The input at layer 0: EMBED 1, the decoder's (the byte before `pos`, or START, embedded, and its
        conditioning), EMBED 2, the encoder's (byte r of `bytes` embedded for row r), stored at x; else
        (and EMBED 0) the residual stream x. PER 1: a row is a stream at position `pos`; PER > 1 (the
        encoder): row r is position r % PER of stream r // PER, B rows of B / PER streams."""
        HALF: tl.constexpr = HD // 2
        TASKS: tl.constexpr = 3 * D // 2 // QP
        cols = tl.arange(0, D)
        norm_w = tl.load(norm1_ptr + layer * D + cols)
        w_layer = qkv_ptr + layer * 3 * D * D
        for t in range(pid, TASKS, nprog):
            j0 = t * QP  # the task's first pair: dimension i0 of head h of part (query, key, value)
            part = j0 // (D // 2)
            h = (j0 % (D // 2)) // HALF
            i0 = j0 % HALF
            row_a = part * D + h * HD + i0  # its rows: row_a + i and, turning with them, row_a + HALF + i
            wa = load_rows(w_layer + row_a * D, D, QP, QP, D)
            wb = load_rows(w_layer + (row_a + HALF) * D, D, QP, QP, D)
            i = i0 + tl.arange(0, QP)
            if PER == 1:
                cos_a = tl.load(cos_ptr + pos * HD + i)[None, :]
                cos_b = tl.load(cos_ptr + pos * HD + HALF + i)[None, :]
                sin_a = tl.load(sin_ptr + pos * HD + i)[None, :]  # the table's sign: (-sin, sin)
                sin_b = tl.load(sin_ptr + pos * HD + HALF + i)[None, :]
            if t == pid:
                wait(counter_ptr, target, synced)
            for r0 in range(0, B, BB):
                rows = r0 + tl.arange(0, BB)
                rmask = rows < B
                m = rmask[:, None]
                if PER == 1:
                    stream = rows
                    position = pos
                else:  # each row's own position: the tables' rows for it
                    stream = rows // PER
                    position = rows % PER
                    at = position[:, None] * HD + i[None, :]
                    cos_a = tl.load(cos_ptr + at)
                    cos_b = tl.load(cos_ptr + at + HALF)
                    sin_a = tl.load(sin_ptr + at)
                    sin_b = tl.load(sin_ptr + at + HALF)
                if EMBED == 0:
                    x = load_residual(x_ptr, rows, rmask, D)
                elif EMBED == 2:
                    if layer == 0:
                        token = tl.load(bytes_ptr + rows, mask=rmask, other=0).to(tl.int32)
                        x = tl.load(emb_ptr + token[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
                        if t == 0:
                            tl.store(x_ptr + rows[:, None] * D + cols[None, :], x, mask=m)
                    else:
                        x = load_residual(x_ptr, rows, rmask, D)
                elif layer == 0:
                    if from_best:  # the byte this launch drew at pos - 1
                        token = picked_bytes(best_ptr, best_byte_ptr, rows, rmask, HT, HTP).to(tl.int32)
                    else:
                        prev = tl.load(bytes_ptr + rows * KC + tl.maximum(pos - 1, 0), mask=rmask, other=0)
                        token = tl.where(pos > 0, prev.to(tl.int32), START)
                    x = tl.load(emb_ptr + token[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
                    if ADD:
                        c = tl.load(cond_ptr + (rows[:, None] * cond_len + pos) * D + cols[None, :], mask=m, other=0.0)
                        x = x + c.to(tl.float32)
                    else:  # "prefix": the conditioning vector in place of START's embedding
                        c = tl.load(cond_ptr + rows[:, None] * cond_len * D + cols[None, :], mask=m, other=0.0)
                        x = tl.where(pos == 0, c.to(tl.float32), x)
                    if t == 0:
                        tl.store(x_ptr + rows[:, None] * D + cols[None, :], x, mask=m)
                else:
                    x = load_residual(x_ptr, rows, rmask, D)
                xn = rms_norm(x, norm_w, eps, D)
                a = times_t(xn, wa, DOT).to(tl.bfloat16).to(tl.float32)  # rounded as the projection's output
                b = times_t(xn, wb, DOT).to(tl.bfloat16).to(tl.float32)
                if part < 2:  # rotary positions for queries and keys
                    a, b = a * cos_a + b * sin_a, b * cos_b + a * sin_b
                a16 = a.to(tl.bfloat16)
                b16 = b.to(tl.bfloat16)
                if part == 0:
                    offs = rows[:, None] * D + (h * HD + i)[None, :]
                    tl.store(q_ptr + offs, a16, mask=m)
                    tl.store(q_ptr + offs + HALF, b16, mask=m)
                else:
                    slot = ((((layer * (B // PER) + stream) * NH + h) * KC + position) * HD)[:, None] + i[None, :]
                    if part == 1:
                        tl.store(k_cache_ptr + slot, a16, mask=m)
                        tl.store(k_cache_ptr + slot + HALF, b16, mask=m)
                    else:
                        tl.store(v_cache_ptr + slot, a16, mask=m)
                        tl.store(v_cache_ptr + slot + HALF, b16, mask=m)
        if pid >= TASKS:
            wait(counter_ptr, target, synced)

    @triton.jit
    def attention_stage(
        pid, nprog, counter_ptr, target, synced, layer, pos, q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, x_ptr,
        B, scale,
        D: tl.constexpr, HD: tl.constexpr, NH: tl.constexpr, KC: tl.constexpr, KP: tl.constexpr,
        BB: tl.constexpr, DOT: tl.constexpr, OUT_R: tl.constexpr, PER: tl.constexpr, ROUND: tl.constexpr,
    ):  # fmt: skip
        """Attention of every head over positions 0 .. pos (each task computes all heads: a few KB), and
        OUT_R rows of the output projection per task, added to the residual stream. Rows as in
        `qkv_stage` (PER); pos = KC - 1 sees every position (the encoder's)."""
        TASKS: tl.constexpr = D // OUT_R
        d = tl.arange(0, HD)
        j = tl.arange(0, KP)
        head = tl.arange(0, NH)
        w_layer = out_ptr + layer * D * D
        visible = (j <= pos)[None, :]  # (1, KP)
        for t in range(pid, TASKS, nprog):
            r_out = t * OUT_R + tl.arange(0, OUT_R)
            w = load_rows(w_layer + t * OUT_R * D, D, OUT_R, OUT_R, D)
            if t == pid:
                wait(counter_ptr, target, synced)
            for r0 in range(0, B, BB):
                rows = r0 + tl.arange(0, BB)
                rmask = rows < B
                m = rmask[:, None]
                seen = m & visible
                y = tl.zeros([BB, NH, HD], tl.float32)  # the heads' outputs side by side
                for h in tl.static_range(NH):
                    q = tl.load(
                        q_ptr + rows[:, None] * D + h * HD + d[None, :], mask=m, other=0.0, cache_modifier=".cg"
                    )
                    first = ((layer * (B // PER) + rows // PER) * NH + h) * KC  # (BB,): the row's position 0
                    tile = ((first[:, None] + j[None, :]) * HD)[:, :, None] + d[None, None, :]  # (BB, KP, HD)
                    kc = tl.load(k_cache_ptr + tile, mask=seen[:, :, None], other=0.0, cache_modifier=".cg")
                    vc = tl.load(v_cache_ptr + tile, mask=seen[:, :, None], other=0.0, cache_modifier=".cg")
                    s = tl.sum(q.to(tl.float32)[:, None, :] * kc.to(tl.float32), axis=2) * scale
                    s = tl.where(visible, s, float("-inf"))
                    p = tl.exp(s - tl.max(s, axis=1)[:, None])
                    y_h = tl.sum(p[:, :, None] * vc.to(tl.float32), axis=1) / tl.sum(p, axis=1)[:, None]
                    y = tl.where((head == h)[None, :, None], y_h.to(tl.bfloat16).to(tl.float32)[:, None, :], y)
                out = times_t(tl.reshape(y, (BB, D)).to(tl.bfloat16), w, DOT)
                add_to_residual(x_ptr, rows, rmask, r_out, out, D, ROUND)
        if pid >= TASKS:
            wait(counter_ptr, target, synced)

    @triton.jit
    def gated(xn, w_gate, w_value, DOT: tl.constexpr):
        """The hidden units SiLU(gate) * value (bf16) of the normed input xn for the tiles' rows of W_up."""
        gate = times_t(xn, w_gate, DOT).to(tl.bfloat16).to(tl.float32)
        value = times_t(xn, w_value, DOT).to(tl.bfloat16).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(tl.bfloat16).to(tl.float32)  # rounded as F.silu's output
        return (act * value).to(tl.bfloat16)

    @triton.jit
    def up_stage(
        pid, nprog, counter_ptr, target, synced, layer, norm2_ptr, up_ptr, x_ptr, hidden_ptr, B, eps, H,
        D: tl.constexpr, HP: tl.constexpr, BB: tl.constexpr, DOT: tl.constexpr, UP_R: tl.constexpr,
    ):  # fmt: skip
        """The norm, and UP_R hidden units per task: gate and value, SiLU(gate) * value."""
        cols = tl.arange(0, D)
        c = tl.arange(0, UP_R)
        norm_w = tl.load(norm2_ptr + layer * D + cols)
        w_layer = up_ptr + layer * 2 * H * D
        tasks = tl.cdiv(H, UP_R)
        for t in range(pid, tasks, nprog):
            first = t * UP_R
            valid = H - first  # units past H read as 0
            w_gate = load_rows(w_layer + first * D, D, valid, UP_R, D)
            w_value = load_rows(w_layer + (H + first) * D, D, valid, UP_R, D)
            if t == pid:
                wait(counter_ptr, target, synced)
            for r0 in range(0, B, BB):
                rows = r0 + tl.arange(0, BB)
                rmask = rows < B
                xn = rms_norm(load_residual(x_ptr, rows, rmask, D), norm_w, eps, D)
                m = rmask[:, None] & (c < valid)[None, :]
                tl.store(hidden_ptr + rows[:, None] * HP + first + c[None, :], gated(xn, w_gate, w_value, DOT), mask=m)
        if pid >= tasks:
            wait(counter_ptr, target, synced)

    @triton.jit
    def down_stage(
        pid, nprog, counter_ptr, target, synced, layer, down_ptr, hidden_ptr, x_ptr, B, H,
        D: tl.constexpr, HP: tl.constexpr, BB: tl.constexpr, DOT: tl.constexpr, DOWN_R: tl.constexpr,
        ROUND: tl.constexpr,
    ):  # fmt: skip
        """DOWN_R rows of the down projection per task, added to the residual stream."""
        TASKS: tl.constexpr = D // DOWN_R
        c = tl.arange(0, HP)
        w_layer = down_ptr + layer * D * H
        for t in range(pid, TASKS, nprog):
            r_out = t * DOWN_R + tl.arange(0, DOWN_R)
            w = tl.load(w_layer + r_out[:, None] * H + c[None, :], mask=(c < H)[None, :], other=0.0)
            if t == pid:
                wait(counter_ptr, target, synced)
            for r0 in range(0, B, BB):
                rows = r0 + tl.arange(0, BB)
                rmask = rows < B
                m = rmask[:, None] & (c < H)[None, :]
                hidden = tl.load(hidden_ptr + rows[:, None] * HP + c[None, :], mask=m, other=0.0, cache_modifier=".cg")
                add_to_residual(x_ptr, rows, rmask, r_out, times_t(hidden, w, DOT), D, ROUND)
        if pid >= TASKS:
            wait(counter_ptr, target, synced)

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

    @triton.jit
    def pool_stage(
        pid, nprog, counter_ptr, target, synced, norm_ptr, proj_ptr, x_enc_ptr, x_ptr, eps,
        K: tl.constexpr, KP: tl.constexpr, DE: tl.constexpr, DM: tl.constexpr, POOL_R: tl.constexpr,
        MEAN: tl.constexpr,
    ):  # fmt: skip
        """The encoder's final norm over its K rows (one stream), pooled ("concat": side by side; MEAN:
        averaged), and POOL_R rows of the projection to the main width per task: the main model's input,
        rounded to bf16 as the projection's output, written as its residual stream."""
        TASKS: tl.constexpr = DM // POOL_R
        k = tl.arange(0, KP)
        d = tl.arange(0, DE)
        r = tl.arange(0, POOL_R)
        norm_w = tl.load(norm_ptr + d)
        for t in range(pid, TASKS, nprog):
            rows_out = t * POOL_R + r
            if MEAN:
                w = tl.load(proj_ptr + rows_out[:, None] * DE + d[None, :])  # (POOL_R, DE)
            else:  # row o of W, (K * DE,), as (K, DE)
                at = rows_out[:, None, None] * (K * DE) + k[None, :, None] * DE + d[None, None, :]
                w = tl.load(proj_ptr + at, mask=(k < K)[None, :, None], other=0.0)  # (POOL_R, KP, DE)
            if t == pid:
                wait(counter_ptr, target, synced)
            x = tl.load(
                x_enc_ptr + k[:, None] * DE + d[None, :], mask=(k < K)[:, None], other=0.0, cache_modifier=".cg"
            )
            xn = x * (1.0 / tl.sqrt(tl.sum(x * x, axis=1) / DE + eps))[:, None] * norm_w[None, :]  # float32
            if MEAN:
                pooled = (tl.sum(xn, axis=0) / K).to(tl.bfloat16).to(tl.float32)  # (DE,)
                out = tl.sum(pooled[None, :] * w.to(tl.float32), axis=1)
            else:
                xb = xn.to(tl.bfloat16).to(tl.float32)  # (KP, DE), rows past K are 0
                out = tl.sum(tl.sum(xb[None, :, :] * w.to(tl.float32), axis=2), axis=1)
            tl.store(x_ptr + rows_out, out.to(tl.bfloat16).to(tl.float32))
        if pid >= TASKS:
            wait(counter_ptr, target, synced)

    @triton.jit
    def split_attention_stage(
        pid, nprog, counter_ptr, target, synced, layer, pos, q_ptr, k_cache_ptr, v_cache_ptr, m_ptr, l_ptr,
        acc_ptr, scale,
        HD: tl.constexpr, NH: tl.constexpr, KC: tl.constexpr, S: tl.constexpr, KB: tl.constexpr,
    ):  # fmt: skip
        """One stream's attention over positions 0 .. pos of a long cache, in NH * S tasks: head h, split s
        takes the blocks of KB positions s, s + S, s + 2S, ... and leaves its softmax's running maximum,
        sum and weighted values (float32) for `combine_out_stage`, as flash-decoding does."""
        d = tl.arange(0, HD)
        j = tl.arange(0, KB)
        for t in range(pid, NH * S, nprog):
            h = t // S
            s = t % S
            if t == pid:
                wait(counter_ptr, target, synced)
            q = tl.load(q_ptr + h * HD + d, cache_modifier=".cg").to(tl.float32)
            first = (layer * NH + h) * KC
            best = tl.full([1], float("-inf"), tl.float32)
            total = tl.zeros([1], tl.float32)
            acc = tl.zeros([HD], tl.float32)
            for j0 in range(s * KB, pos + 1, S * KB):
                keys = j0 + j
                seen = keys <= pos
                tile = (first + keys)[:, None] * HD + d[None, :]
                kc = tl.load(k_cache_ptr + tile, mask=seen[:, None], other=0.0, cache_modifier=".cg")
                vc = tl.load(v_cache_ptr + tile, mask=seen[:, None], other=0.0, cache_modifier=".cg")
                scores = tl.sum(q[None, :] * kc.to(tl.float32), axis=1) * scale
                scores = tl.where(seen, scores, float("-inf"))
                new_best = tl.maximum(best, tl.max(scores, axis=0))
                keep = tl.exp(best - new_best)
                p = tl.exp(scores - new_best)
                total = total * keep + tl.sum(p, axis=0)
                acc = acc * keep + tl.sum(p[:, None] * vc.to(tl.float32), axis=0)
                best = new_best
            tl.store(m_ptr + t + tl.arange(0, 1), best)
            tl.store(l_ptr + t + tl.arange(0, 1), total)
            tl.store(acc_ptr + t * HD + d, acc)
        if pid >= NH * S:
            wait(counter_ptr, target, synced)

    @triton.jit
    def combine_out_stage(
        pid, nprog, counter_ptr, target, synced, layer, out_ptr, m_ptr, l_ptr, acc_ptr, x_ptr,
        D: tl.constexpr, HD: tl.constexpr, NH: tl.constexpr, S: tl.constexpr, OUT_R: tl.constexpr,
    ):  # fmt: skip
        """Every head's output from `split_attention_stage`'s S parts (each task combines them all: a few
        KB), rounded to bf16 as attention's output, and OUT_R rows of the output projection per task,
        added to the (bf16) residual stream."""
        TASKS: tl.constexpr = D // OUT_R
        part = tl.arange(0, NH)[:, None] * S + tl.arange(0, S)[None, :]  # (NH, S)
        d = tl.arange(0, HD)
        w_layer = out_ptr + layer * D * D
        row = tl.arange(0, 1)
        for t in range(pid, TASKS, nprog):
            r_out = t * OUT_R + tl.arange(0, OUT_R)
            w = load_rows(w_layer + t * OUT_R * D, D, OUT_R, OUT_R, D)
            if t == pid:
                wait(counter_ptr, target, synced)
            m = tl.load(m_ptr + part, cache_modifier=".cg")
            total = tl.load(l_ptr + part, cache_modifier=".cg")
            acc = tl.load(acc_ptr + part[:, :, None] * HD + d[None, None, :], cache_modifier=".cg")
            weight = tl.exp(m - tl.max(m, axis=1)[:, None])  # (NH, S); a split without positions: 0
            y = tl.sum(weight[:, :, None] * acc, axis=1) / tl.sum(weight * total, axis=1)[:, None]  # (NH, HD)
            y = tl.reshape(y.to(tl.bfloat16), (1, D))
            add_to_residual(x_ptr, row, row < 1, r_out, times_t(y, w, False), D, True)
        if pid >= TASKS:
            wait(counter_ptr, target, synced)

    @triton.jit
    def cond_stage(
        pid, nprog, counter_ptr, target, synced, norm_ptr, cond_w_ptr, x_ptr, cond_ptr, eps, OUT,
        D: tl.constexpr, COND_R: tl.constexpr,
    ):  # fmt: skip
        """The main model's final norm (h) and COND_R rows of the decoder's conditioning projection per
        task, into the decoder's conditioning buffer (bf16, its OUT values in order)."""
        cols = tl.arange(0, D)
        norm_w = tl.load(norm_ptr + cols)
        row = tl.arange(0, 1)
        for t in range(pid, tl.cdiv(OUT, COND_R), nprog):
            valid = OUT - t * COND_R
            w = load_rows(cond_w_ptr + t * COND_R * D, D, valid, COND_R, D)
            if t == pid:
                wait(counter_ptr, target, synced)
            h = rms_norm(load_residual(x_ptr, row, row < 1, D), norm_w, eps, D)
            c = t * COND_R + tl.arange(0, COND_R)
            tl.store(cond_ptr + c[None, :], times_t(h, w, False).to(tl.bfloat16), mask=(c < OUT)[None, :])

    @triton.jit(do_not_specialize=["e_first", "e_end", "first", "end", "stage", "nprog"])  # as decoder_kernel
    def main_kernel(
        bytes_ptr, position_ptr,
        e_emb_ptr, e_norm1_ptr, e_qkv_ptr, e_out_ptr, e_norm2_ptr, e_up_ptr, e_down_ptr, e_norm_ptr, proj_ptr,
        e_cos_ptr, e_sin_ptr, e_k_ptr, e_v_ptr, e_x_ptr, e_q_ptr, e_hidden_ptr,
        norm1_ptr, qkv_ptr, out_ptr, norm2_ptr, up_ptr, down_ptr, norm_ptr, cond_w_ptr,
        cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, x_ptr, q_ptr, hidden_ptr, m_ptr, l_ptr, acc_ptr,
        cond_ptr, counter_ptr,
        e_first, e_end, first, end, stage, nprog, eps, e_scale, scale, e_H, H, cond_out,
        K: tl.constexpr, KP: tl.constexpr, MEAN: tl.constexpr,
        DE: tl.constexpr, HDE: tl.constexpr, NHE: tl.constexpr, HPE: tl.constexpr, RE: tl.constexpr,
        E_QP: tl.constexpr, E_OUT_R: tl.constexpr, E_UP_R: tl.constexpr, E_DOWN_R: tl.constexpr,
        POOL_R: tl.constexpr,
        D: tl.constexpr, HD: tl.constexpr, NH: tl.constexpr, KC: tl.constexpr, HP: tl.constexpr,
        QP: tl.constexpr, S: tl.constexpr, KB: tl.constexpr, OUT_R: tl.constexpr, UP_R: tl.constexpr,
        DOWN_R: tl.constexpr, COND_R: tl.constexpr,
    ):  # fmt: skip
        """One stream's patch step after its K bytes are drawn: the encoder over the patch (its K rows,
        every position seeing every other), pooled and projected (the main model's input), the main
        model's step at the position `position_ptr` holds (its keys and values into the cache, attention
        over positions 0 .. that one), and the decoder's conditioning for the next patch.

        `stage` -1: all of it, the `nprog` programs meeting between stages as in `decoder_kernel`;
        0-10 (the encoder's qkv, attention, up, down; the pooling; the main model's qkv, attention in
        parts, their combination with the output projection, up, down; the conditioning): that stage
        alone, of the encoder's layer e_first or the main model's first (Triton's interpreter)."""
        pid = tl.program_id(0)
        pos = tl.load(position_ptr)
        synced = stage < 0
        syncs = 0  # arrivals so far, over all programs
        for layer in range(e_first, e_end):
            if synced | (stage == 0):
                qkv_stage(
                    pid, nprog, counter_ptr, syncs, synced, layer, 0, False, bytes_ptr, e_emb_ptr, cond_ptr, 0,
                    e_norm1_ptr, e_qkv_ptr, e_cos_ptr, e_sin_ptr, e_k_ptr, e_v_ptr, e_x_ptr, e_q_ptr, m_ptr,
                    m_ptr, K, eps, DE, HDE, NHE, K, False, 0, RE, False, E_QP, 1, 2, 2, K,
                )  # fmt: skip
                arrive(counter_ptr, synced)
                syncs += nprog
            if synced | (stage == 1):
                attention_stage(
                    pid, nprog, counter_ptr, syncs, synced, layer, K - 1, e_q_ptr, e_k_ptr, e_v_ptr, e_out_ptr,
                    e_x_ptr, K, e_scale, DE, HDE, NHE, K, KP, RE, False, E_OUT_R, K, False,
                )  # fmt: skip
                arrive(counter_ptr, synced)
                syncs += nprog
            if synced | (stage == 2):
                up_stage(
                    pid, nprog, counter_ptr, syncs, synced, layer, e_norm2_ptr, e_up_ptr, e_x_ptr, e_hidden_ptr,
                    K, eps, e_H, DE, HPE, RE, False, E_UP_R,
                )  # fmt: skip
                arrive(counter_ptr, synced)
                syncs += nprog
            if synced | (stage == 3):
                down_stage(
                    pid, nprog, counter_ptr, syncs, synced, layer, e_down_ptr, e_hidden_ptr, e_x_ptr, K, e_H,
                    DE, HPE, RE, False, E_DOWN_R, False,
                )  # fmt: skip
                arrive(counter_ptr, synced)
                syncs += nprog
        if synced | (stage == 4):
            pool_stage(pid, nprog, counter_ptr, syncs, synced, e_norm_ptr, proj_ptr, e_x_ptr, x_ptr, eps, K, KP, DE,
                       D, POOL_R, MEAN)  # fmt: skip
            arrive(counter_ptr, synced)
            syncs += nprog
        for layer in range(first, end):
            if synced | (stage == 5):
                qkv_stage(
                    pid, nprog, counter_ptr, syncs, synced, layer, pos, False, bytes_ptr, e_emb_ptr, cond_ptr, 0,
                    norm1_ptr, qkv_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, x_ptr, q_ptr, m_ptr, m_ptr, 1,
                    eps, D, HD, NH, KC, False, 0, 1, False, QP, 1, 2, 0, 1,
                )  # fmt: skip
                arrive(counter_ptr, synced)
                syncs += nprog
            if synced | (stage == 6):
                split_attention_stage(
                    pid, nprog, counter_ptr, syncs, synced, layer, pos, q_ptr, k_cache_ptr, v_cache_ptr, m_ptr,
                    l_ptr, acc_ptr, scale, HD, NH, KC, S, KB,
                )  # fmt: skip
                arrive(counter_ptr, synced)
                syncs += nprog
            if synced | (stage == 7):
                combine_out_stage(
                    pid, nprog, counter_ptr, syncs, synced, layer, out_ptr, m_ptr, l_ptr, acc_ptr, x_ptr, D, HD,
                    NH, S, OUT_R,
                )  # fmt: skip
                arrive(counter_ptr, synced)
                syncs += nprog
            if synced | (stage == 8):
                up_stage(
                    pid, nprog, counter_ptr, syncs, synced, layer, norm2_ptr, up_ptr, x_ptr, hidden_ptr, 1, eps, H,
                    D, HP, 1, False, UP_R,
                )  # fmt: skip
                arrive(counter_ptr, synced)
                syncs += nprog
            if synced | (stage == 9):
                down_stage(
                    pid, nprog, counter_ptr, syncs, synced, layer, down_ptr, hidden_ptr, x_ptr, 1, H, D, HP, 1,
                    False, DOWN_R, True,
                )  # fmt: skip
                arrive(counter_ptr, synced)
                syncs += nprog
        if synced | (stage == 10):
            cond_stage(pid, nprog, counter_ptr, syncs, synced, norm_ptr, cond_w_ptr, x_ptr, cond_ptr, eps, cond_out, D,
                       COND_R)  # fmt: skip


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


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 64  # Triton's interpreter: any count runs


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
        self.programs = min(programs or (2 if interpreted else 64), _sm_count(dev))
        # Streams per block of rows: one alone; else 16 with tensor-core products (tl.dot takes 16 rows
        # and widths of 16; rows past the batch are masked), or as few as the batch needs.
        self.dot = self.batch > 1 and self.head_dim >= 32 and self.dim >= 16
        self.rows = 1 if self.batch == 1 else 16 if self.dot else min(16, _pow2(self.batch))
        # Rows of each stage's weights per task: few on a GPU, so that a stage's work spreads over every
        # program (16 with tensor-core products); in Triton's interpreter, whose cost is per operation
        # more than per element, one task per stage where it can. Outputs are split, never sums, so the
        # split does not change the numbers.
        if interpreted:
            self.pairs, self.out_rows, self.down_rows = self.head_dim // 2, self.dim, self.dim
            self.up_rows, self.head_rows = min(_pow2(self.hidden), 256), 256
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
        self.hidden_pad = _pow2(self.hidden)
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
            D=self.dim, HD=self.head_dim, NH=self.heads, KC=self.K, KP=_pow2(self.K), HP=self.hidden_pad,
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


def main_unsupported_reason(model, batch: int) -> str | None:
    """Why `MainKernels` cannot run a sampler's model for `batch` streams (None: it can): beyond the
    decoder kernels' needs (`unsupported_reason`), one stream, power-of-two widths for the encoder and
    the main model, and patches of at most 16 bytes."""
    reason = unsupported_reason(model)
    if reason is not None:
        return reason
    if batch != 1:
        return "one stream only (more are faster through the compiled main-model step)"
    cfg = model.cfg
    reason = _width_reason("encoder", cfg.encoder) or _width_reason("main", cfg.main)
    if reason is not None:
        return reason
    if cfg.patch_size > 16:
        return f"patches of at most 16 bytes (patch size {cfg.patch_size})"
    return None


class MainKernels:
    """The rest of a patch step for one stream as one Triton kernel (`main_kernel`): the encoder over the
    patch's K drawn bytes (`patch_bytes`), the main model's step at the position `position` holds
    (writing its keys and values into `cache`, the main model's), and the decoder's conditioning for the
    next patch into `cond`. What `HierarchicalSampler._main_step` computes, in the same dtypes (the main
    model's residual stream in bf16, as the model has it), up to the order of float32 sums; attention
    over the main model's cache is split over programs in blocks of positions (flash-decoding), and
    only positions up to `position` are read.

    `persistent` (the default on CUDA): one launch, the programs meeting at grid-wide syncs between
    stages, as in `DecoderKernels`; otherwise one launch per stage (Triton's interpreter), the same
    arithmetic in the same order.
    """

    def __init__(
        self, model, cache, patch_bytes: torch.Tensor, position: torch.Tensor, cond: torch.Tensor,
        persistent: bool | None = None, programs: int | None = None, warps: int = 4,
    ):  # fmt: skip
        reason = main_unsupported_reason(model, patch_bytes.shape[0])
        if reason is not None:
            raise ValueError(reason)
        dev = cond.device
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        self.persistent = not interpreted if persistent is None else persistent
        self.cache, self.patch_bytes, self.position, self.cond = cache, patch_bytes, position, cond
        encoder, main = model.encoder.stack, model.main
        e_cfg, cfg = encoder.cfg, main.cfg
        self.K = model.patch_size
        self.e_layers, self.layers = e_cfg.layers, cfg.layers
        self.e_dim, self.e_heads, self.dim, self.heads = e_cfg.dim, e_cfg.heads, cfg.dim, cfg.heads
        self.e_hidden = encoder.blocks[0].mlp.down.in_features
        self.hidden = main.blocks[0].mlp.down.in_features
        self.cond_out = model.decoder.condition.out_features
        # A power of two of programs, one per SM at most (all resident at once, to wait for each other).
        sms = _sm_count(dev)
        self.programs = programs or (2 if interpreted else 1 << (min(128, sms).bit_length() - 1))
        self.programs = min(self.programs, sms)
        self.e_head_dim, self.head_dim = e_head_dim, head_dim = self.e_dim // self.e_heads, self.dim // self.heads
        P = self.programs
        # Rows of weights per task: about one task per program on a GPU (the interpreter, whose cost is
        # per operation, takes as few tasks as it can). Attention over the main cache: S parts per head.
        if interpreted:
            self.e_pairs, self.e_out_rows, self.e_down_rows = e_head_dim // 2, self.e_dim, self.e_dim
            self.e_up_rows = min(_pow2(self.e_hidden), 256)
            self.pairs, self.out_rows, self.down_rows, self.pool_rows = head_dim // 2, self.dim, self.dim, self.dim
            self.up_rows = self.cond_rows = 256
            self.splits = 2
        else:

            def rows(outputs: int, most: int) -> int:
                return min(most, _pow2(max(1, -(-outputs // P))))

            self.e_pairs = rows(3 * self.e_dim // 2, e_head_dim // 2)
            self.e_out_rows = self.e_down_rows = rows(self.e_dim, self.e_dim)
            self.e_up_rows = rows(self.e_hidden, 256)
            self.pairs = rows(3 * self.dim // 2, head_dim // 2)
            self.out_rows = self.down_rows = self.pool_rows = rows(self.dim, self.dim)
            self.up_rows = rows(self.hidden, 256)
            self.cond_rows = rows(self.cond_out, 256)
            self.splits = max(1, P // self.heads)
        self.key_block = 32
        self.warps = warps
        weights = stacked_weights(encoder)
        self.e_norm1, self.e_qkv, self.e_out, self.e_norm2, self.e_up, self.e_down, self.e_norm = weights
        self.e_embedding = model.encoder.byte_embedding.weight.float().contiguous()
        self.proj = model.encoder.proj.weight
        self.mean = model.encoder.pooling != "concat"
        self.norm1, self.qkv, self.out, self.norm2, self.up, self.down, self.norm = stacked_weights(main, True)
        self.cond_weight = model.decoder.condition.weight
        e_cos, e_sin = encoder.rope(0, self.K)
        self.e_cos, self.e_sin = e_cos.contiguous(), e_sin.contiguous()
        if cache.max_len > main.rope_cos.shape[0]:
            main._grow_rope(cache.max_len)
        self.cos, self.sin = main.rope_cos.contiguous(), main.rope_sin.contiguous()
        f32 = dict(device=dev, dtype=torch.float32)
        bf16 = dict(device=dev, dtype=torch.bfloat16)
        self.e_k = torch.zeros(self.e_layers, 1, self.e_heads, self.K, e_head_dim, **bf16)
        self.e_v = torch.zeros_like(self.e_k)
        self.e_x = torch.zeros(self.K, self.e_dim, **f32)
        self.e_q = torch.zeros(self.K, self.e_dim, **bf16)
        self.e_hidden_units = torch.zeros(self.K, _pow2(self.e_hidden), **bf16)
        self.x = torch.zeros(1, self.dim, **f32)
        self.q = torch.zeros(1, self.dim, **bf16)
        self.hidden_units = torch.zeros(1, _pow2(self.hidden), **bf16)
        parts = self.heads * self.splits
        self.part_max = torch.zeros(parts, **f32)
        self.part_sum = torch.zeros(parts, **f32)
        self.part_acc = torch.zeros(parts, head_dim, **f32)
        self.counter = torch.zeros(1, device=dev, dtype=torch.int32)
        # F.rms_norm's default eps: float32's, for the bf16 residual stream of the main model too (measured).
        self.eps = torch.finfo(torch.float32).eps
        self.e_scale, self.scale = e_head_dim**-0.5, head_dim**-0.5

    def _launch(self, stage: int = -1, layer: int = 0) -> None:
        if stage < 0:
            layers = (0, self.e_layers, 0, self.layers)
        else:
            layers = (layer, layer + 1, layer, layer + 1)
        main_kernel[(self.programs,)](
            self.patch_bytes, self.position,
            self.e_embedding, self.e_norm1, self.e_qkv, self.e_out, self.e_norm2, self.e_up, self.e_down,
            self.e_norm, self.proj, self.e_cos, self.e_sin, self.e_k, self.e_v, self.e_x, self.e_q,
            self.e_hidden_units,
            self.norm1, self.qkv, self.out, self.norm2, self.up, self.down, self.norm, self.cond_weight,
            self.cos, self.sin, self.cache.k_layers, self.cache.v_layers, self.x, self.q, self.hidden_units,
            self.part_max, self.part_sum, self.part_acc, self.cond, self.counter,
            *layers, stage, self.programs, self.eps, self.e_scale, self.scale, self.e_hidden,
            self.hidden, self.cond_out,
            K=self.K, KP=_pow2(self.K), MEAN=self.mean,
            DE=self.e_dim, HDE=self.e_head_dim, NHE=self.e_heads, HPE=_pow2(self.e_hidden), RE=_pow2(self.K),
            E_QP=self.e_pairs, E_OUT_R=self.e_out_rows, E_UP_R=self.e_up_rows, E_DOWN_R=self.e_down_rows,
            POOL_R=self.pool_rows,
            D=self.dim, HD=self.head_dim, NH=self.heads, KC=self.cache.max_len, HP=_pow2(self.hidden),
            QP=self.pairs, S=self.splits, KB=self.key_block, OUT_R=self.out_rows, UP_R=self.up_rows,
            DOWN_R=self.down_rows, COND_R=self.cond_rows,
            num_warps=self.warps, num_stages=1,
        )  # fmt: skip

    def step(self) -> None:
        """The encoder, the main model's step and the conditioning, for the patch in `patch_bytes`."""
        if self.persistent:
            self.counter.zero_()
            self._launch()
            return
        for layer in range(self.e_layers):
            for stage in range(4):
                self._launch(stage, layer)
        self._launch(4)
        for layer in range(self.layers):
            for stage in range(5, 10):
                self._launch(stage, layer)
        self._launch(10)
