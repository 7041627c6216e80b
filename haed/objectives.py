"""The three training objectives (IEM, decoder phase, full), the flat baseline's and the MEGABYTE peer's.

Each objective takes the model and a batch of byte windows (B, N) and returns (loss, metrics), so the
trainer is the same for all of them. Each has one `Objective` record (`IEM`, `DECODER`, `FULL`, `FLAT`,
`MEGABYTE`): a name from the command line or a run's config.json is looked up once (`get_objective`), and
the record is what the trainer, the profiler and the comparison pass on. This is the one module that
compares or lists objective names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from haed.config import TrainConfig
from haed.device import host_to_device
from haed.errors import HaedError
from haed.model import HAED, FlatTransformer, patch_keys
from haed.sampled_softmax import sampled_softmax_loss

LN2 = math.log(2.0)


def iem_loss(
    model: HAED,
    x: torch.Tensor,
    cfg: TrainConfig,
    generator: torch.Generator | None = None,
    candidates: torch.Tensor | None = None,
    gather: Callable | None = None,
):
    """IEM: sampled softmax over patches, scored <W h_t, E(P)> / tau (or by `model.score_vectors`' cosine).

    The decoder is not in the graph, unless `cfg.byte_loss_fraction` adds its byte loss on a sample of
    the patches.

    Candidates are the distinct target patches of the batch (or an explicit (C, K) set of patches);
    `cfg.num_negatives` caps the shared candidates by uniform subsampling, and every row keeps its
    positive. With `cfg.logq`, log Q(P) (log of the patch's count in the batch, plus the
    subsampling rate for capped negatives) is subtracted from each candidate's score. `gather` (one rank of
    several: `haed.distributed.global_candidates`, handed over by the trainer through the record) takes the
    distinct patches of every rank's batch instead of this rank's.
    """
    p = model.patches(x)
    B, T, K = p.shape
    targets = p.reshape(-1, K)
    fixed_shapes = cfg.fixed_shapes and candidates is None and gather is None
    encoded = model.encode_patches(targets, fixed_shapes)
    uniq, inverse, counts, vectors = encoded.distinct, encoded.inverse, encoded.counts, encoded.vectors
    # Padding rows (zero patches) give the encoder and the score products recurring shapes; as
    # candidates they are shifted to -inf below, so they change neither the loss nor a gradient.
    pos = encoded.per_patch()  # every target patch's vector: the positives, and (shifted) the main model's inputs
    if candidates is None and gather is not None:  # several ranks: the global batch's patches (log-Q counts too)
        uniq, vectors, counts, inverse = gather(uniq, vectors, counts, inverse, cfg.candidates)
    h = model.hidden_from_vectors(pos.view(B, T, -1))
    explicit = model.encoder(candidates.to(x.device)) if candidates is not None else None
    q, pos_scored, vectors = model.score_vectors(
        h.reshape(B * T, -1), pos, explicit if explicit is not None else vectors, cfg.tau
    )
    logq_pos = counts.float().log()[inverse] if cfg.logq else None
    cand, col_of_uniq, logq_cand, num_candidates = choose_candidates(
        vectors, uniq, counts, cfg, generator, candidates, fixed_shapes
    )
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


def choose_candidates(vectors, uniq, counts, cfg: TrainConfig, generator, candidates, fixed_shapes: bool):
    """IEM's candidates: (their vectors, each distinct patch's column among them or -1, their log Q shift or
    None, how many count). An explicit (C, K) set of `candidates` is matched to the batch's distinct patches
    `uniq` by key; otherwise the distinct patches themselves, subsampled to `cfg.num_negatives` where set."""
    device = vectors.device
    U = uniq.shape[0]
    if candidates is not None:
        cand_keys = patch_keys(candidates.to(device))
        order = torch.argsort(cand_keys)
        where = torch.searchsorted(cand_keys[order], patch_keys(uniq)).clamp(max=len(order) - 1)
        found = cand_keys[order][where] == patch_keys(uniq)
        col_of_uniq = torch.where(found, order[where], torch.full_like(where, -1))
        logq_cand = None
        if cfg.logq:
            logq_cand = torch.zeros(vectors.shape[0], device=device)
            logq_cand[col_of_uniq[found]] = counts[found].float().log()
        return vectors, col_of_uniq, logq_cand, vectors.shape[0]
    if cfg.num_negatives and U > cfg.num_negatives:
        if fixed_shapes:
            keep, log_rate = capped_slots(counts, cfg.num_negatives, generator)
        else:
            keep = host_to_device(capped_candidates(U, cfg.num_negatives, generator), device)
            log_rate = math.log(len(keep) / U)
        cand = vectors[keep]
        col_of_uniq = torch.full((U,), -1, dtype=torch.long, device=device)
        col_of_uniq[keep] = torch.arange(len(keep), device=device)
        logq_cand = candidate_shift(counts[keep], len(keep), cfg.logq)
        if cfg.logq:
            logq_cand = logq_cand + log_rate  # the kept patches' counts as a share of the batch's
    else:
        cand = vectors
        col_of_uniq = torch.arange(U, device=device)
        logq_cand = candidate_shift(counts, cand.shape[0], cfg.logq)
    if fixed_shapes:  # counted on the device: no synchronisation
        num_candidates = (counts > 0).sum().clamp(max=cand.shape[0])
    else:
        num_candidates = min(cand.shape[0], U)  # padding not counted
    return cand, col_of_uniq, logq_cand, num_candidates


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


def capped_slots(
    counts: torch.Tensor, cap: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`capped_candidates` for `unique_patches_fixed`'s rows, chosen on the device: (indices of `cap` rows, a
    uniform random subset of the distinct patches, all of them and then padding rows where there are at most
    `cap`; log of the distinct patches' sampling rate). The random numbers come from the step's generator."""
    noise = host_to_device(torch.rand(counts.shape[0], generator=generator), counts.device)
    keep = torch.topk(noise.masked_fill(counts == 0, -1.0), cap).indices
    distinct = (counts > 0).sum()
    return keep, torch.log(distinct.clamp(max=cap) / distinct)


def candidate_shift(counts: torch.Tensor, rows: int, logq: bool) -> torch.Tensor:
    """What IEM's softmax subtracts from the scores of `rows` candidates whose first `len(counts)` have these
    counts in the batch: log Q (the log count, with `logq`; else 0), and +inf for padding (a count of 0, or
    a row beyond `counts`), which then changes neither the loss nor a gradient."""
    shift = counts.float().log() if logq else torch.zeros(counts.shape[0], device=counts.device)
    shift = shift.masked_fill(counts == 0, float("inf"))
    if rows > counts.shape[0]:
        shift = torch.cat((shift, shift.new_full((rows - counts.shape[0],), float("inf"))))
    return shift


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

    Calling the record computes its loss: `IEM(model, x, cfg, generator)`.
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
    subfolder: str = ""  # where its run lies inside the parent's run directory (the decoder phase: run/decoder)
    frozen_parts: tuple[str, ...] = ()  # parts that run without training, in eval mode (no dropout)
    trains_decoder: bool = True  # False: the run's byte decoder is untrained (evaluate and sample its decoder phase)
    takes_main_layers: bool = False  # its section's `main_layers` trains the main model's top blocks too
    # What `haed compare --memory-cap` may recompute (a phase's `recompute`), least compute first: each
    # choice saves more activation memory than the one before it and costs more time.
    recompute_choices: tuple[str, ...] = ("",)
    # Phase settings that save memory for almost no compute, tried under a cap before any recomputation,
    # where they lower the recipe's value: IEM's softmax in chunks of fewer rows (its `rows x candidates`
    # logits and probabilities live only while the loss is computed, on top of every stored activation).
    lean_settings: tuple[tuple[str, int], ...] = ()
    # Its loss scores against the batch's distinct patches (IEM): where several ranks train, the trainer
    # hands the record how to gather them from every rank (`across_ranks`); objectives know no process group.
    scores_batch_patches: bool = False
    gather_candidates: Callable | None = None  # (uniq, vectors, counts, inverse, mode) -> the global batch's

    def __call__(self, model, x, cfg, generator=None):
        if self.gather_candidates is None:
            return self.loss(model, x, cfg, generator)
        return self.loss(model, x, cfg, generator, gather=self.gather_candidates)

    def across_ranks(self, gather_candidates: Callable) -> Objective:
        """The record as one rank of several trains it: a loss that scores against the batch's patches takes
        every rank's through `gather_candidates`; any other record is returned as it is."""
        return replace(self, gather_candidates=gather_candidates) if self.scores_batch_patches else self


IEM = Objective(
    "iem",
    iem_loss,
    _iem_parameters,
    "iem",
    "haed",
    "loss",
    step_parts=_iem_step_parts,
    trains_decoder=False,
    recompute_choices=("", "main", "encoder,main,decoder"),
    lean_settings=(("logits_chunk", 2048),),
    scores_batch_patches=True,
)
DECODER = Objective(
    "decoder",
    decoder_loss,
    _decoder_parameters,
    "decoder",
    "haed",
    "bits_per_byte",
    step_parts=_decoder_step_parts,
    parent_objective="iem",
    subfolder="decoder",
    frozen_parts=("encoder", "main"),
    takes_main_layers=True,
    recompute_choices=("", "decoder", "main,decoder"),
)
FULL = Objective(
    "full",
    full_loss,
    _all_parameters,
    "full",
    "haed",
    "bits_per_byte",
    step_parts=lambda model, cfg: (("encoder", 3), ("main", 3), ("decoder", 3)),
    recompute_choices=("", "decoder", "main,decoder", "encoder,main,decoder"),
)
FLAT = Objective(
    "flat",
    flat_loss,
    _all_parameters,
    "full",
    "flat",
    "bits_per_byte",
    step_parts=lambda model, cfg: (("flat", 3),),
    recompute_choices=("", "main"),
)
MEGABYTE = Objective(
    "megabyte",
    peer_loss,
    _all_parameters,
    "full",
    "megabyte",
    "bits_per_byte",
    step_parts=lambda model, cfg: (("megabyte", 3),),
)

# By name: how the command line and a run's config.json reach a record (`get_objective`).
OBJECTIVES = {o.name: o for o in (IEM, DECODER, FULL, FLAT, MEGABYTE)}

# The ratios `haed profile-memory` reports, numerator / denominator, where both cells were measured;
# "megabyte-peer" is the MEGABYTE-pytorch package measured by benchmarks/megabyte_peer.py.
PROFILE_RATIOS = (
    ("full", "iem"),
    ("decoder", "iem"),
    ("flat", "iem"),
    ("flat", "full"),
    ("megabyte", "iem"),
    ("megabyte", "full"),
    ("full", "megabyte-peer"),
    ("iem", "megabyte-peer"),
    ("flat", "megabyte-peer"),
)


def get_objective(objective: Objective | str) -> Objective:
    """The record of an objective: a name (from the command line, a run's config.json) is looked up here,
    at the entry points; a record passes through."""
    if isinstance(objective, Objective):
        return objective
    if objective not in OBJECTIVES:
        raise HaedError(f"unknown objective {objective!r}: one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[objective]


def phase_sections() -> list[str]:
    """The recipe sections that configure a training phase, each once, in the records' order."""
    return list(dict.fromkeys(o.section for o in OBJECTIVES.values()))


def trainable_parameters(model, objective: Objective | str, cfg: TrainConfig | None = None):
    """The parameters an objective trains: IEM not the decoder (unless its byte loss is on); the decoder
    phase only the decoder (and the main model's top `main_layers`)."""
    return get_objective(objective).trained_parameters(model, cfg)
