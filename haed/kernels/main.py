"""The encoder and the main model's step of one stream as one Triton kernel (`main_kernel`, driven by
`MainKernels`): what runs after a patch's K bytes are drawn, before the next patch's decoder.

`main_kernel` reuses the decoder's stages (`haed.kernels.stages`): the encoder's K positions of one
stream are its rows (each with its own rotary position, every position seeing every other), then a
stage pools them into the main model's input; the main model's layers are the decoder's stages with
attention over the long cache split into parts per head (`split_attention_stage`) and combined with the
output projection (`combine_out_stage`); a last stage writes the decoder's conditioning. These three kinds
of stage, the main kernel's own, are in `haed.kernels.main_stages`. About 46 stages at `speech`.
"""

from __future__ import annotations

import os

import torch

from haed.kernels.support import pow2, sm_count, stacked_weights, unsupported_reason, width_reason

try:  # the kernels exist where Triton does (a CUDA build of torch); nothing else here needs it
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:
    from haed.kernels.main_stages import combine_out_stage, cond_stage, pool_stage, split_attention_stage
    from haed.kernels.stages import (
        arrive,
        attention_stage,
        down_stage,
        qkv_stage,
        up_stage,
    )

    @triton.jit
    def run_encoder(
        pid, nprog, counter_ptr, synced, stage, e_first, e_end, bytes_ptr, e_emb_ptr, e_norm1_ptr, e_qkv_ptr,
        e_out_ptr, e_norm2_ptr, e_up_ptr, e_down_ptr, e_norm_ptr, proj_ptr, e_cos_ptr, e_sin_ptr, e_k_ptr, e_v_ptr,
        e_x_ptr, e_q_ptr, e_hidden_ptr, cond_ptr, m_ptr, x_ptr, eps, e_scale, e_H,
        K: tl.constexpr, KP: tl.constexpr, MEAN: tl.constexpr, DE: tl.constexpr, HDE: tl.constexpr,
        NHE: tl.constexpr, HPE: tl.constexpr, RE: tl.constexpr, E_QP: tl.constexpr, E_OUT_R: tl.constexpr,
        E_UP_R: tl.constexpr, E_DOWN_R: tl.constexpr, POOL_R: tl.constexpr, D: tl.constexpr,
    ):  # fmt: skip
        """`main_kernel`'s stages 0-4: the encoder's layers over the patch's K rows, each in four stages, then
        the pooling into the main model's input at x. Returns the arrivals so far, over all programs."""
        syncs = 0
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
        return syncs

    @triton.jit
    def run_main_model(
        pid, nprog, counter_ptr, syncs, synced, stage, first, end, pos, bytes_ptr, e_emb_ptr, cond_ptr,
        norm1_ptr, qkv_ptr, out_ptr, norm2_ptr, up_ptr, down_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr,
        x_ptr, q_ptr, hidden_ptr, m_ptr, l_ptr, acc_ptr, eps, scale, H,
        D: tl.constexpr, HD: tl.constexpr, NH: tl.constexpr, KC: tl.constexpr, HP: tl.constexpr,
        QP: tl.constexpr, S: tl.constexpr, KB: tl.constexpr, OUT_R: tl.constexpr, UP_R: tl.constexpr,
        DOWN_R: tl.constexpr,
    ):  # fmt: skip
        """`main_kernel`'s stages 5-9: the main model's layers at position `pos`, each in five stages.
        Returns the arrivals so far (`syncs`, those of the stages before, counted on)."""
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
        return syncs

    # The eleven stages (the encoder's four, the pooling, the main model's five, the conditioning) run in launch
    # order, each followed by its sync, as `decoder_kernel` lists its five; one launch runs them all, and the
    # stage numbers of the interpreter's launches follow this order. `run_encoder` and `run_main_model` are
    # inlined where they are called: the same PTX as the stages written out here (docs/performance.md 9).
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
        syncs = run_encoder(
            pid, nprog, counter_ptr, synced, stage, e_first, e_end, bytes_ptr, e_emb_ptr, e_norm1_ptr, e_qkv_ptr,
            e_out_ptr, e_norm2_ptr, e_up_ptr, e_down_ptr, e_norm_ptr, proj_ptr, e_cos_ptr, e_sin_ptr, e_k_ptr, e_v_ptr,
            e_x_ptr, e_q_ptr, e_hidden_ptr, cond_ptr, m_ptr, x_ptr, eps, e_scale, e_H, K, KP, MEAN, DE, HDE, NHE, HPE,
            RE, E_QP, E_OUT_R, E_UP_R, E_DOWN_R, POOL_R, D,
        )  # fmt: skip
        syncs = run_main_model(
            pid, nprog, counter_ptr, syncs, synced, stage, first, end, pos, bytes_ptr, e_emb_ptr, cond_ptr,
            norm1_ptr, qkv_ptr, out_ptr, norm2_ptr, up_ptr, down_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr,
            x_ptr, q_ptr, hidden_ptr, m_ptr, l_ptr, acc_ptr, eps, scale, H, D, HD, NH, KC, HP, QP, S, KB, OUT_R,
            UP_R, DOWN_R,
        )  # fmt: skip
        if synced | (stage == 10):
            cond_stage(pid, nprog, counter_ptr, syncs, synced, norm_ptr, cond_w_ptr, x_ptr, cond_ptr, eps, cond_out, D,
                       COND_R)  # fmt: skip


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
    reason = width_reason("encoder", cfg.encoder) or width_reason("main", cfg.main)
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
        sms = sm_count(dev)
        self.programs = programs or (2 if interpreted else 1 << (min(128, sms).bit_length() - 1))
        self.programs = min(self.programs, sms)
        self.e_head_dim, self.head_dim = e_head_dim, head_dim = self.e_dim // self.e_heads, self.dim // self.heads
        P = self.programs
        # Rows of weights per task: about one task per program on a GPU (the interpreter, whose cost is
        # per operation, takes as few tasks as it can). Attention over the main cache: S parts per head.
        if interpreted:
            self.e_pairs, self.e_out_rows, self.e_down_rows = e_head_dim // 2, self.e_dim, self.e_dim
            self.e_up_rows = min(pow2(self.e_hidden), 256)
            self.pairs, self.out_rows, self.down_rows, self.pool_rows = head_dim // 2, self.dim, self.dim, self.dim
            self.up_rows = self.cond_rows = 256
            self.splits = 2
        else:

            def rows(outputs: int, most: int) -> int:
                return min(most, pow2(max(1, -(-outputs // P))))

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
        self.e_hidden_units = torch.zeros(self.K, pow2(self.e_hidden), **bf16)
        self.x = torch.zeros(1, self.dim, **f32)
        self.q = torch.zeros(1, self.dim, **bf16)
        self.hidden_units = torch.zeros(1, pow2(self.hidden), **bf16)
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
            K=self.K, KP=pow2(self.K), MEAN=self.mean,
            DE=self.e_dim, HDE=self.e_head_dim, NHE=self.e_heads, HPE=pow2(self.e_hidden), RE=pow2(self.K),
            E_QP=self.e_pairs, E_OUT_R=self.e_out_rows, E_UP_R=self.e_up_rows, E_DOWN_R=self.e_down_rows,
            POOL_R=self.pool_rows,
            D=self.dim, HD=self.head_dim, NH=self.heads, KC=self.cache.max_len, HP=pow2(self.hidden),
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
