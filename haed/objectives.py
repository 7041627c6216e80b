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
from haed.iem_sampling import byte_loss_rows, choose_candidates, fixed_shape_draws
from haed.model import HAED, FlatTransformer
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

    With `cfg.fixed_shapes` every shape follows from x's: the step's random numbers are drawn first
    (`fixed_shape_draws`), and the rest is one function of tensors, which `cfg.compile` compiles whole on
    CUDA (`fixed_shape_loss`).
    """
    if cfg.fixed_shapes and candidates is None and gather is None:
        draws = fixed_shape_draws(x.shape[0] * (x.shape[1] // model.patch_size), cfg, generator, x.device)
        return _whole_loss(_fixed_shape_iem_loss, model, x, cfg, draws)
    return _iem_loss(model, x, cfg, generator, candidates, gather)


def _iem_loss(model, x, cfg: TrainConfig, generator=None, candidates=None, gather=None, draws=None):
    """`iem_loss`; with `draws` (fixed shapes) its random numbers are those, and nothing waits on the host."""
    p = model.patches(x)
    B, T, K = p.shape
    targets = p.reshape(-1, K)
    encoded = model.encode_patches(targets, fixed_shapes=draws is not None)
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
        vectors, uniq, counts, cfg, generator, candidates, draws
    )
    target_col = col_of_uniq[inverse]
    loss, correct = sampled_softmax_loss(
        q, cand, pos_scored, target_col, logq_cand, logq_pos, cfg.logits_chunk, compiled=cfg.compile and x.is_cuda
    )
    metrics = {"softmax_loss": loss.detach(), "patch_accuracy": correct.float().mean(), "candidates": num_candidates}
    if cfg.byte_loss_fraction > 0:
        chosen = draws["byte_rows"] if draws is not None else None
        byte_loss = sampled_byte_loss(
            model, h.reshape(B * T, -1), targets, cfg.byte_loss_fraction, generator, cfg.byte_loss_bytes, chosen
        )
        loss = loss + cfg.byte_loss_weight * byte_loss
        metrics["byte_bits_per_byte"] = byte_loss.detach() / LN2
    metrics["loss"] = loss.detach()
    return loss, metrics


def _fixed_shape_iem_loss(model, x, cfg: TrainConfig, draws: dict) -> tuple[torch.Tensor, dict]:
    """`_iem_loss` with fixed shapes, its metrics as float32 scalars."""
    return _float_metrics(*_iem_loss(model, x, cfg, draws=draws))


def _fixed_shape_full_loss(model, x, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """`full_loss` with fixed shapes, its metrics as float32 scalars."""
    loss = byte_cross_entropy(model(x, fixed_shapes=True), x)
    return _float_metrics(loss, _byte_metrics(loss))


def _fixed_shape_decoder_loss(model, x, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """`decoder_loss` with fixed shapes, its metrics as float32 scalars."""
    loss = _decoder_byte_loss(model, x, cfg, fixed_shapes=True)
    return _float_metrics(loss, _byte_metrics(loss))


def _float_metrics(loss: torch.Tensor, metrics: dict) -> tuple[torch.Tensor, dict]:
    """The metrics as float32 scalars, inside the compiled loss: `_whole_loss` stacks them into one copy."""
    return loss, {name: value.float() for name, value in metrics.items()}


def _whole_loss(loss_fn: Callable, model, x, cfg: TrainConfig, *args) -> tuple[torch.Tensor, dict]:
    """`loss_fn` (a loss with fixed shapes) on x, compiled whole where `cfg.compile` on CUDA
    (`fixed_shape_loss`). As CUDA graphs, a graph's outputs are overwritten by its next replay, and a step's
    metrics outlive it: one copy of them all (one launch), then views."""
    loss, metrics = fixed_shape_loss(loss_fn, cfg.compile and x.is_cuda, cfg.compile_mode)(model, x, cfg, *args)
    return loss, dict(zip(metrics, torch.stack(list(metrics.values())).unbind()))


_fixed_shape_losses: dict = {}


def fixed_shape_loss(loss_fn: Callable, compiled: bool, mode: str = "default") -> Callable:
    """A loss with fixed shapes (`_fixed_shape_iem_loss`, `_fixed_shape_full_loss`, `_fixed_shape_decoder_loss`:
    one function of tensors), compiled whole in torch.compile's `mode` where `compiled`: one graph forward and
    one backward instead of a dozen compiled calls and a few hundred operators launched one by one between them,
    which bound IEM's step on the host at short windows (traced at seq 2,048 on an H100: GPU busy 15.3 of
    20.8 ms, docs/2026-12-06-big-corpora.md). Once per loss, mode and process; the stacks' own compiled calls
    are inlined into it."""
    if not compiled:
        return loss_fn
    key = (loss_fn, mode)
    if key not in _fixed_shape_losses:
        _fixed_shape_losses[key] = torch.compile(loss_fn, mode=mode, dynamic=False)
    return _fixed_shape_losses[key]


def sampled_byte_loss(
    model: HAED,
    h: torch.Tensor,
    targets: torch.Tensor,
    fraction: float,
    generator: torch.Generator | None,
    leading_bytes: int = 0,
    chosen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decoder's byte cross-entropy on a uniform random `fraction` of the patches (at least one), over
    their first `leading_bytes` bytes (0: all K). `chosen`: those rows, drawn already (fixed shapes).

    h (R, D) and targets (R, K): every patch's h_t and bytes. Only the chosen rows and positions enter
    the decoder (causal within the patch), so its activations cost `fraction * leading_bytes / K` of
    full training's.
    """
    rows = h.shape[0]
    count = byte_loss_rows(rows, fraction)
    if chosen is None and count < rows:
        chosen = host_to_device(torch.randperm(rows, generator=generator)[:count], h.device)
    if chosen is not None:
        h, targets = h[chosen], targets[chosen]
    if 0 < leading_bytes < targets.shape[1]:
        targets = targets[:, :leading_bytes]
    return byte_cross_entropy(model.decoder(h, targets), targets)


def byte_cross_entropy(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, 256).float(), x.reshape(-1).long())


def _byte_metrics(loss: torch.Tensor) -> dict:
    return {"loss": loss.detach(), "bits_per_byte": loss.detach() / LN2}


def decoder_loss(model: HAED, x: torch.Tensor, cfg: TrainConfig, generator=None):
    """Decoder phase: h_t from the frozen encoder and main model without autograd (the trainer keeps them
    in eval mode: no dropout, as at inference); byte cross-entropy. With `cfg.main_layers = n` the main
    model's last n blocks and final norm train too: the rest runs without autograd up to them. With
    `cfg.fixed_shapes` the batch's distinct patches are found without a host synchronisation, and the loss is
    compiled whole on CUDA as full training's is (`fixed_shape_loss`)."""
    if cfg.fixed_shapes:
        return _whole_loss(_fixed_shape_decoder_loss, model, x, cfg)
    loss = _decoder_byte_loss(model, x, cfg)
    return loss, _byte_metrics(loss)


def _decoder_byte_loss(model: HAED, x: torch.Tensor, cfg: TrainConfig, fixed_shapes: bool = False) -> torch.Tensor:
    """The decoder phase's byte cross-entropy on x; `fixed_shapes` as in `HAED.encode_patches`."""
    n = cfg.main_layers
    if n:
        layers = len(model.main.blocks)
        with torch.no_grad():
            below = model.main(model.main_inputs_of(x, fixed_shapes), blocks=(0, layers - n), norm=False)
        h = model.main(below, blocks=(layers - n, layers))
    else:
        with torch.no_grad():
            h = model.hidden(x, fixed_shapes)
    K = model.patch_size
    return byte_cross_entropy(model.decoder(h.reshape(-1, h.shape[-1]), x.reshape(-1, K)), x)


def full_loss(model: HAED, x: torch.Tensor, cfg: TrainConfig, generator=None):
    """Full (MEGABYTE-style) training: encoder, main model and decoder end to end on byte cross-entropy.
    With `cfg.fixed_shapes` the batch's distinct patches are found without a host synchronisation, and the
    loss, one function of tensors, is compiled whole on CUDA as IEM's is (`fixed_shape_loss`)."""
    if cfg.fixed_shapes:
        return _whole_loss(_fixed_shape_full_loss, model, x, cfg)
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
