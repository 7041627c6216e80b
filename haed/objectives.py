"""The three training objectives (IEM, decoder phase, full), the flat baseline's and the MEGABYTE peer's.

Each objective takes the model and a batch of byte windows (B, N) and returns (loss, metrics), so the
trainer is the same for all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from haed.config import TrainConfig
from haed.device import host_to_device
from haed.distributed import global_candidates
from haed.errors import HaedError
from haed.model import HAED, FlatTransformer, patch_keys

LN2 = math.log(2.0)


def _chunk_softmax(logits, logq_cand, target_col, pos_logit, needs_grad: bool):
    """Loss terms of one chunk of rows from its (rows, C) candidate logits (before the log-Q shift).

    Returns per-row losses, correctness, and for the backward pass the candidate probabilities (in the
    logits' dtype) and d loss / d positive logit. Written as plain tensor code so that, compiled, it
    becomes a couple of fused passes over the logits instead of about ten.
    """
    cols = torch.arange(logits.shape[1], device=logits.device)
    shifted = (logits.float() - logq_cand).masked_fill(cols[None, :] == target_col[:, None], float("-inf"))
    lse = torch.logaddexp(torch.logsumexp(shifted, dim=-1), pos_logit)
    losses = lse - pos_logit
    correct = pos_logit > shifted.amax(dim=-1)
    if not needs_grad:
        return losses, correct, None, None
    probs = torch.exp(shifted - lse[:, None]).to(logits.dtype)  # softmax over the candidate columns
    pos_coef = torch.exp(pos_logit - lse) - 1.0  # d loss / d pos_logit
    return losses, correct, probs, pos_coef


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
        grad_q = torch.empty_like(q) if needs_grad else None
        grad_pos = torch.empty_like(pos) if needs_grad else None
        grad_cand = torch.zeros(cand.shape, dtype=torch.float32, device=cand.device) if needs_grad else None
        losses = torch.empty(R, dtype=torch.float32, device=q.device)
        correct = torch.empty(R, dtype=torch.bool, device=q.device)
        if logq_cand is None:
            logq_cand = torch.zeros(C, dtype=torch.float32, device=q.device)
        pos_logits = (q.float() * pos.float()).sum(-1)
        if logq_pos is not None:
            pos_logits = pos_logits - logq_pos
        softmax = chunk_softmax_fn(compiled)
        for s in range(0, R, chunk):
            e = min(R, s + chunk)
            qc, pc = q[s:e], pos[s:e]
            loss_c, correct_c, probs, pos_coef = softmax(
                qc @ cand.T, logq_cand, target_col[s:e], pos_logits[s:e], needs_grad
            )
            losses[s:e] = loss_c
            correct[s:e] = correct_c
            if needs_grad:
                probs = probs.to(cand.dtype)
                grad_q[s:e] = (probs @ cand).float().add_(pos_coef[:, None] * pc.float()).to(q.dtype)
                grad_cand += (probs.T @ qc).float()
                grad_pos[s:e] = (pos_coef[:, None] * qc.float()).to(pos.dtype)
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


def iem_loss(
    model: HAED,
    x: torch.Tensor,
    cfg: TrainConfig,
    generator: torch.Generator | None = None,
    candidates: torch.Tensor | None = None,
):
    """IEM: sampled softmax over patches, scored <W h_t, E(P)> / tau (or by `model.score_vectors`' cosine).

    The decoder is not in the graph, unless `cfg.byte_loss_fraction` adds its byte loss on a sample of
    the patches.

    Candidates are the distinct target patches of the batch (or an explicit (C, K) set of patches);
    `cfg.num_negatives` caps the shared candidates by uniform subsampling, and every row keeps its
    positive. With `cfg.logq`, log Q(P) (log of the patch's count in the batch, plus the
    subsampling rate for capped negatives) is subtracted from each candidate's score.
    """
    p = model.patches(x)
    B, T, K = p.shape
    targets = p.reshape(-1, K)
    encoded = model.encode_patches(targets)
    uniq, inverse, counts, vectors = encoded.distinct, encoded.inverse, encoded.counts, encoded.vectors
    U = uniq.shape[0]
    # Padding rows (zero patches) give the encoder and the score products recurring shapes; as
    # candidates they are shifted to -inf below, so they change neither the loss nor a gradient.
    pos = encoded.per_patch()  # every target patch's vector: the positives, and (shifted) the main model's inputs
    if candidates is None:  # with several ranks: the distinct patches of the global batch (log-Q counts too)
        uniq, vectors, counts, inverse = global_candidates(uniq, vectors, counts, inverse, cfg.candidates)
        U = uniq.shape[0]
    h = model.hidden_from_vectors(pos.view(B, T, -1))
    explicit = model.encoder(candidates.to(x.device)) if candidates is not None else None
    q, pos_scored, vectors = model.score_vectors(
        h.reshape(B * T, -1), pos, explicit if explicit is not None else vectors, cfg.tau
    )
    logq_pos = counts.float().log()[inverse] if cfg.logq else None
    if candidates is not None:
        cand = vectors
        cand_keys = patch_keys(candidates.to(x.device))
        order = torch.argsort(cand_keys)
        where = torch.searchsorted(cand_keys[order], patch_keys(uniq)).clamp(max=len(order) - 1)
        found = cand_keys[order][where] == patch_keys(uniq)
        col_of_uniq = torch.where(found, order[where], torch.full_like(where, -1))
        logq_cand = None
        if cfg.logq:
            logq_cand = torch.zeros(cand.shape[0], device=x.device)
            logq_cand[col_of_uniq[found]] = counts[found].float().log()
    elif cfg.num_negatives and U > cfg.num_negatives:
        keep = host_to_device(capped_candidates(U, cfg.num_negatives, generator), x.device)
        cand = vectors[keep]
        col_of_uniq = torch.full((U,), -1, dtype=torch.long, device=x.device)
        col_of_uniq[keep] = torch.arange(len(keep), device=x.device)
        logq_cand = (counts[keep].float() * (len(keep) / U)).log() if cfg.logq else None
    else:
        cand = vectors
        col_of_uniq = torch.arange(U, device=x.device)
        logq_cand = counts.float().log() if cfg.logq else None
        if cand.shape[0] > U:
            real = logq_cand if logq_cand is not None else torch.zeros(U, device=x.device)
            logq_cand = torch.cat((real, real.new_full((cand.shape[0] - U,), float("inf"))))
    num_candidates = min(cand.shape[0], U) if candidates is None else cand.shape[0]  # padding not counted
    target_col = col_of_uniq[inverse]
    loss, correct = sampled_softmax_loss(
        q, cand, pos_scored, target_col, logq_cand, logq_pos, cfg.logits_chunk, compiled=cfg.compile and x.is_cuda
    )
    metrics = {"softmax_loss": loss.detach(), "patch_accuracy": correct.float().mean(), "candidates": num_candidates}
    if cfg.byte_loss_fraction > 0:
        byte_loss = sampled_byte_loss(
            model, h.reshape(B * T, -1), targets, cfg.byte_loss_fraction, generator, cfg.byte_loss_bytes
        )
        loss = loss + cfg.byte_loss_weight * byte_loss
        metrics["byte_bits_per_byte"] = byte_loss.detach() / LN2
    metrics["loss"] = loss.detach()
    return loss, metrics


def sampled_byte_loss(
    model: HAED,
    h: torch.Tensor,
    targets: torch.Tensor,
    fraction: float,
    generator: torch.Generator | None,
    leading_bytes: int = 0,
) -> torch.Tensor:
    """The decoder's byte cross-entropy on a uniform random `fraction` of the patches (at least one), over
    their first `leading_bytes` bytes (0: all K).

    h (R, D) and targets (R, K): every patch's h_t and bytes. Only the chosen rows and positions enter
    the decoder (causal within the patch), so its activations cost `fraction * leading_bytes / K` of
    full training's.
    """
    rows = h.shape[0]
    count = max(1, min(rows, round(fraction * rows)))
    chosen = host_to_device(torch.randperm(rows, generator=generator)[:count], h.device) if count < rows else None
    if chosen is not None:
        h, targets = h[chosen], targets[chosen]
    if 0 < leading_bytes < targets.shape[1]:
        targets = targets[:, :leading_bytes]
    return byte_cross_entropy(model.decoder(h, targets), targets)


def capped_candidates(num_distinct: int, cap: int, generator: torch.Generator | None) -> torch.Tensor:
    """A uniform random subset of `cap` of the distinct patches (indices), shared by every row."""
    return torch.randperm(num_distinct, generator=generator)[:cap]


def byte_cross_entropy(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, 256).float(), x.reshape(-1).long())


def _byte_metrics(loss: torch.Tensor) -> dict:
    return {"loss": loss.detach(), "bits_per_byte": loss.detach() / LN2}


def decoder_loss(model: HAED, x: torch.Tensor, cfg: TrainConfig, generator=None):
    """Decoder phase: h_t from the frozen encoder and main model without autograd (the trainer keeps them
    in eval mode: no dropout, as at inference); byte cross-entropy. With `cfg.main_layers = n` the main
    model's last n blocks and final norm train too: the rest runs without autograd up to them."""
    n = cfg.main_layers
    if n:
        layers = len(model.main.blocks)
        with torch.no_grad():
            below = model.main(model.main_inputs_of(x), blocks=(0, layers - n), norm=False)
        h = model.main(below, blocks=(layers - n, layers))
    else:
        with torch.no_grad():
            h = model.hidden(x)
    K = model.patch_size
    logits = model.decoder(h.reshape(-1, h.shape[-1]), x.reshape(-1, K))
    loss = byte_cross_entropy(logits, x)
    return loss, _byte_metrics(loss)


def full_loss(model: HAED, x: torch.Tensor, cfg: TrainConfig, generator=None):
    """Full (MEGABYTE-style) training: encoder, main model and decoder end to end on byte cross-entropy."""
    loss = byte_cross_entropy(model(x), x)
    return loss, _byte_metrics(loss)


def flat_loss(model: FlatTransformer, x: torch.Tensor, cfg: TrainConfig, generator=None):
    loss = byte_cross_entropy(model(x), x)
    return loss, _byte_metrics(loss)


def peer_loss(model, x: torch.Tensor, cfg: TrainConfig, generator=None):
    """The MEGABYTE peer (`haed.peer`): the byte cross-entropy of every byte of the window, as haed evaluates
    it (the package's own loss leaves out the byte 0, its padding id)."""
    loss = byte_cross_entropy(model(x), x)
    return loss, _byte_metrics(loss)


def _all_parameters(model, cfg=None):
    return list(model.parameters())


def _iem_parameters(model, cfg=None):
    if cfg is not None and cfg.byte_loss_fraction > 0:
        return list(model.parameters())
    skip = {id(p) for p in model.decoder.parameters()}
    return [p for p in model.parameters() if id(p) not in skip]


def trained_main_parts(model, cfg: TrainConfig | None) -> list:
    """The main model's modules that the decoder phase trains (`cfg.main_layers`): its last blocks and
    final norm, or none."""
    n = cfg.main_layers if cfg is not None else 0
    return [*model.main.blocks[len(model.main.blocks) - n :], model.main.norm] if n else []


def _iem_step_parts(model, cfg: TrainConfig | None) -> tuple:
    parts = (("encoder", 3), ("main", 3), ("scores", 3))
    if cfg is None or cfg.byte_loss_fraction <= 0:
        return parts
    K = model.cfg.patch_size
    covered = cfg.byte_loss_bytes if 0 < cfg.byte_loss_bytes < K else K
    # the byte loss: the decoder, trained, on that fraction of the patches and their first `covered` bytes
    return parts + (("decoder", 3 * cfg.byte_loss_fraction * covered / K),)


def _decoder_step_parts(model, cfg: TrainConfig | None) -> tuple:
    n = cfg.main_layers if cfg is not None else 0
    # the main model runs forward; its last n blocks (`main_layers`) also backward
    return (("encoder", 1), ("main", 1 + 2 * n / model.cfg.main.layers), ("decoder", 3))


def _decoder_parameters(model, cfg=None):
    return [*model.decoder.parameters(), *(p for m in trained_main_parts(model, cfg) for p in m.parameters())]


@dataclass(frozen=True)
class Objective:
    """Everything the rest of haed needs to know about one training objective.

    Calling the record computes its loss: `OBJECTIVES[name](model, x, cfg, generator)`.
    """

    name: str
    loss: Callable
    trained_parameters: Callable  # (model, phase config) -> the parameters this objective trains
    section: str  # the recipe section that holds its TrainConfig
    arch: str  # the model architecture it trains ("haed", "flat" or "megabyte": haed.peer)
    selection_metric: str  # validation metric (lower is better) that picks the best checkpoint
    # (model, phase config) -> the parts of the model a step runs, each with its multiple of forward
    # FLOPs: 3 trained (forward + backward), 1 frozen (forward only), a fraction for a part that runs
    # on some of the rows. Names as in `haed.model.forward_flops`.
    step_parts: Callable = lambda model, cfg: ()
    parent_objective: str | None = None  # the objective of the run whose weights it starts from
    frozen_parts: tuple[str, ...] = ()  # parts that run without training, in eval mode (no dropout)
    trains_decoder: bool = True  # False: the run's byte decoder is untrained (evaluate and sample its decoder phase)
    # What `haed compare --memory-cap` may recompute (a phase's `recompute`), least compute first: each
    # choice saves more activation memory than the one before it and costs more time.
    recompute_choices: tuple[str, ...] = ("",)

    def __call__(self, model, x, cfg, generator=None):
        return self.loss(model, x, cfg, generator)


OBJECTIVES = {
    o.name: o
    for o in (
        Objective(
            "iem",
            iem_loss,
            _iem_parameters,
            "iem",
            "haed",
            "loss",
            step_parts=_iem_step_parts,
            trains_decoder=False,
            recompute_choices=("", "main", "encoder,main,decoder"),
        ),
        Objective(
            "decoder",
            decoder_loss,
            _decoder_parameters,
            "decoder",
            "haed",
            "bits_per_byte",
            step_parts=_decoder_step_parts,
            parent_objective="iem",
            frozen_parts=("encoder", "main"),
            recompute_choices=("", "decoder", "main,decoder"),
        ),
        Objective(
            "full",
            full_loss,
            _all_parameters,
            "full",
            "haed",
            "bits_per_byte",
            step_parts=lambda model, cfg: (("encoder", 3), ("main", 3), ("decoder", 3)),
            recompute_choices=("", "decoder", "main,decoder", "encoder,main,decoder"),
        ),
        Objective(
            "flat",
            flat_loss,
            _all_parameters,
            "full",
            "flat",
            "bits_per_byte",
            step_parts=lambda model, cfg: (("flat", 3),),
            recompute_choices=("", "main"),
        ),
        Objective(
            "megabyte",
            peer_loss,
            _all_parameters,
            "full",
            "megabyte",
            "bits_per_byte",
            step_parts=lambda model, cfg: (("megabyte", 3),),
        ),
    )
}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise HaedError(f"unknown objective {name!r}: one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def trainable_parameters(model, objective: str, cfg: TrainConfig | None = None):
    """The parameters an objective trains: IEM not the decoder (unless its byte loss is on); the decoder
    phase only the decoder."""
    return get_objective(objective).trained_parameters(model, cfg)
