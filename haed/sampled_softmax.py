"""IEM's sampled softmax, computed chunk by chunk over rows so that the `steps x candidates` logits never
exist whole: each row's positive against the batch's candidate patches, with the log-Q shift, gradients
computed in the forward pass (its own autograd function). `haed.objectives.iem_loss` calls it.
"""

from __future__ import annotations

import torch


def _chunk_softmax(q, cand, logq_cand, target_col, pos_logit, pos, needs_grad: bool):
    """Loss terms of one chunk of rows (queries q, positives pos) against the candidates: their logits
    q . cand_j, less the log-Q shift.

    Returns per-row losses and correctness, and for the backward pass the chunk's gradients of q, of the
    candidates (float32, to be summed over chunks) and of pos. The logits live as one float32 block worked
    on in place (eager, `logsumexp` and `exp(x - lse)` would each hold two more copies, and the bfloat16
    logits a half: about half of the IEM phase's peak memory on music in one chunk). Written as plain
    tensor code so that, compiled, it becomes a couple of fused passes over the logits and the gradient
    products, one call on the host instead of about twenty operators.
    """
    logits = q @ cand.T
    dtype = logits.dtype
    work = logits.float()  # the same tensor where the logits are float32 already
    del logits  # the bfloat16 logits are not kept beside their float32 copy
    cols = torch.arange(work.shape[1], device=work.device)
    work.sub_(logq_cand).masked_fill_(cols[None, :] == target_col[:, None], float("-inf"))
    top = work.amax(dim=-1)
    correct = pos_logit > top
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row with no other candidate
    work.sub_(top[:, None]).exp_()  # exp(shifted - top), in [0, 1]
    lse = torch.logaddexp(top + torch.log(work.sum(dim=-1)), pos_logit)
    losses = lse - pos_logit
    if not needs_grad:
        return losses, correct, None, None, None
    probs = work.mul_(torch.exp(top - lse)[:, None]).to(dtype).to(cand.dtype)  # softmax over the candidates
    pos_coef = torch.exp(pos_logit - lse) - 1.0  # d loss / d pos_logit
    grad_q = (probs @ cand).float().add_(pos_coef[:, None] * pos.float()).to(q.dtype)
    grad_cand = (probs.T @ q).float()
    grad_pos = (pos_coef[:, None] * q.float()).to(pos.dtype)
    return losses, correct, grad_q, grad_cand, grad_pos


def _by_chunks(softmax, q, cand, logq_cand, target_col, pos_logits, pos, chunk: int, needs_grad: bool):
    """`softmax` over rows chunk by chunk, each chunk's results written into whole-batch tensors (the
    candidates' gradient summed), so that only one chunk's logits and temporaries exist at a time."""
    R = q.shape[0]
    losses = torch.empty(R, dtype=torch.float32, device=q.device)
    correct = torch.empty(R, dtype=torch.bool, device=q.device)
    grad_q = torch.empty_like(q) if needs_grad else None
    grad_pos = torch.empty_like(pos) if needs_grad else None
    grad_cand = None
    for s in range(0, R, chunk):
        e = min(R, s + chunk)
        losses[s:e], correct[s:e], grad_q_c, grad_cand_c, grad_pos_c = softmax(
            q[s:e], cand, logq_cand, target_col[s:e], pos_logits[s:e], pos[s:e], needs_grad
        )
        if needs_grad:
            grad_q[s:e], grad_pos[s:e] = grad_q_c, grad_pos_c
            grad_cand = grad_cand_c if grad_cand is None else grad_cand.add_(grad_cand_c)
    return losses, correct, grad_q, grad_cand, grad_pos


_compiled_chunk_softmax = None


def chunk_softmax_fn(compiled: bool):
    """The chunk function, compiled once per process (dynamic shapes: the candidate count varies)."""
    global _compiled_chunk_softmax
    if not compiled:
        return _chunk_softmax
    if _compiled_chunk_softmax is None:
        _compiled_chunk_softmax = torch.compile(_chunk_softmax, dynamic=True)
    return _compiled_chunk_softmax


class _SampledSoftmax(torch.autograd.Function):
    """Cross-entropy of [positive, candidates] logits, computed chunk by chunk over rows.

    Row r's logits are q_r . pos_r - logq_pos_r (the positive, column 0) and q_r . cand_j - logq_j for
    every candidate j except the row's own positive (target_col[r], or -1 when the positive is not
    among the candidates). Gradients are computed in the forward pass chunk by chunk, so only
    `chunk x C` logits exist at any time, never the whole `R x C` matrix.
    """

    @staticmethod
    def forward(ctx, q, cand, pos, target_col, logq_cand, logq_pos, chunk: int, needs_grad: bool, compiled: bool):
        R, C = q.shape[0], cand.shape[0]
        if logq_cand is None:
            logq_cand = torch.zeros(C, dtype=torch.float32, device=q.device)
        pos_logits = (q.float() * pos.float()).sum(-1)
        if logq_pos is not None:
            pos_logits = pos_logits - logq_pos
        softmax = chunk_softmax_fn(compiled)
        if R <= chunk:  # one chunk (the usual case): its outputs are the results, nothing copied
            losses, correct, grad_q, grad_cand, grad_pos = softmax(
                q, cand, logq_cand, target_col, pos_logits, pos, needs_grad
            )
        else:
            losses, correct, grad_q, grad_cand, grad_pos = _by_chunks(
                softmax, q, cand, logq_cand, target_col, pos_logits, pos, chunk, needs_grad
            )
        ctx.save_for_backward(grad_q, grad_cand, grad_pos)
        ctx.cand_dtype = cand.dtype
        ctx.mark_non_differentiable(correct)
        return losses.mean(), correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_q, grad_cand, grad_pos = ctx.saved_tensors
        scale = grad_loss / grad_q.shape[0]
        return (
            grad_q * scale.to(grad_q.dtype),
            (grad_cand * scale).to(ctx.cand_dtype),
            grad_pos * scale.to(grad_pos.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def sampled_softmax_loss(
    q, cand, pos, target_col, logq_cand=None, logq_pos=None, chunk: int = 4096, compiled: bool = False
):
    """Mean cross-entropy of each row's positive against the candidates; also per-row correctness.

    q (R, D) queries; cand (C, D) candidate vectors; pos (R, D) each row's positive vector; target_col
    (R,) the positive's column among the candidates (-1 if absent) so it is counted once. `compiled`:
    run the per-chunk softmax through torch.compile.
    """
    # Gradients are computed inside the forward pass, so skip them where no backward will follow
    # (validation under torch.no_grad).
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or cand.requires_grad or pos.requires_grad)
    return _SampledSoftmax.apply(q, cand, pos, target_col, logq_cand, logq_pos, max(1, chunk), needs_grad, compiled)
