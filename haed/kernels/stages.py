"""The Triton stages both kernels are made of (`haed.kernels.decoder`, `haed.kernels.main`): a
transformer layer of a few rows as four stages (qkv, attention, up, down), each split over the launch's
programs by rows of its weights, and the grid-wide sync between stages.

Between stages the programs meet at a grid-wide sync (`arrive`, `wait`: an atomic counter with
release and acquire); a stage loads its weights before it waits. The next byte's embedding takes the
first of the head's maxima. Outputs are split over programs and sums never are, so no number depends
on the split, and a run is deterministic. Triton's interpreter, which runs programs one after
another, runs the same code stage by stage, one launch each.

The arithmetic follows the model under bf16 autocast: bf16 weights and matrix inputs with float32
accumulation, each Linear's output rounded to bf16, the residual stream and the norms in float32,
softmax in float32. It differs from the eager step only in the order of float32 sums (and the
attention weights are not rounded to bf16 as flash attention rounds them), so a draw changes only at
a near tie, as with the compiled step.
"""

from __future__ import annotations

try:  # the kernels exist where Triton does (a CUDA build of torch); nothing else here needs it
    import triton
    import triton.language as tl
except ImportError:
    triton = None


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
    def picked_bytes(best_ptr, best_byte_ptr, rows, rmask, HT: tl.constexpr, HTP: tl.constexpr):
        """The byte the head stage drew for each row: the first maximum over its HT tasks' maxima (tasks
        are in byte order and each keeps its first maximum, so this is the first maximum of all 256)."""
        c = tl.arange(0, HTP)
        m = rmask[:, None] & (c < HT)[None, :]
        scores = tl.load(best_ptr + rows[:, None] * HT + c[None, :], mask=m, other=float("-inf"), cache_modifier=".cg")
        task = tl.argmax(scores, axis=1, tie_break_left=True)
        return tl.load(best_byte_ptr + rows * HT + task, mask=rmask, other=0, cache_modifier=".cg")

    @triton.jit
    def layer_input(
        t, layer, pos, from_best, rows, rmask, cols, bytes_ptr, emb_ptr, cond_ptr, cond_len, x_ptr, best_ptr,
        best_byte_ptr, D: tl.constexpr, KC: tl.constexpr, ADD: tl.constexpr, START: tl.constexpr,
        HT: tl.constexpr, HTP: tl.constexpr, EMBED: tl.constexpr,
    ):  # fmt: skip
        """`qkv_stage`'s input rows (see there); at layer 0 task 0 stores the embedded input at x."""
        m = rmask[:, None]
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
        return x

    @triton.jit
    def store_rotated(
        a, b, part, h, i, rows, stream, position, layer, m, q_ptr, k_cache_ptr, v_cache_ptr, B,
        D: tl.constexpr, HD: tl.constexpr, NH: tl.constexpr, KC: tl.constexpr, PER: tl.constexpr,
    ):  # fmt: skip
        """`qkv_stage`'s outputs as bf16: rows a and b (dimensions i and HALF + i of head h) of the query
        (`part` 0) to q, of the key (1) or value (2) to the cache."""
        HALF: tl.constexpr = HD // 2
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

    # The stage issues its loads in this order: its weights, the wait at the sync, then the input (one of three
    # kinds, `layer_input`); that order sets its time. Triton inlines `layer_input` and `store_rotated` where
    # they are called, so the split keeps it: the same PTX (benchmarks/kernel_ptx.py, docs/performance.md 9).
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
                x = layer_input(
                    t, layer, pos, from_best, rows, rmask, cols, bytes_ptr, emb_ptr, cond_ptr, cond_len, x_ptr,
                    best_ptr, best_byte_ptr, D, KC, ADD, START, HT, HTP, EMBED,
                )  # fmt: skip
                xn = rms_norm(x, norm_w, eps, D)
                a = times_t(xn, wa, DOT).to(tl.bfloat16).to(tl.float32)  # rounded as the projection's output
                b = times_t(xn, wb, DOT).to(tl.bfloat16).to(tl.float32)
                if part < 2:  # rotary positions for queries and keys
                    a, b = a * cos_a + b * sin_a, b * cos_b + a * sin_b
                store_rotated(
                    a, b, part, h, i, rows, stream, position, layer, m, q_ptr, k_cache_ptr, v_cache_ptr, B, D, HD, NH,
                    KC, PER,
                )  # fmt: skip
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
