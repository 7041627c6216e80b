"""The main kernel's own stages (`haed.kernels.main`), beside the decoder's it reuses
(`haed.kernels.stages`): the pooling of the encoder's K rows into the main model's input, attention over
the main model's long cache split into parts per head and their combination with the output projection,
and the decoder's conditioning for the next patch. Their loads follow the rules of `haed.kernels.stages`.
"""

from __future__ import annotations

try:  # the kernels exist where Triton does (a CUDA build of torch); nothing else here needs it
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:
    from haed.kernels.stages import (
        add_to_residual,
        load_residual,
        load_rows,
        rms_norm,
        times_t,
        wait,
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
