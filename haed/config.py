"""Typed configuration: the sections a recipe (`haed.recipe`) is made of, and the checks of every field.

Each section is a dataclass whose every field has a default. Every field is checked against its
annotation and, where `FIELD_BOUNDS` names it, its range, so a bad value is one clear error before
anything runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from haed.errors import HaedError


@dataclass
class StackConfig:
    """One transformer stack: width, depth, heads and MLP expansion."""

    dim: int = 256
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0  # hidden = mlp_ratio * dim (the gated MLP uses 2/3 of it per branch)
    dropout: float = 0.0  # on each residual branch while training (small datasets overfit without it)
    # Recompute each block's activations in the backward pass (less memory, ~1/3 more compute); the encoder
    # recomputes whole, in chunks of patches (haed.model.PatchEncoder)
    recompute: bool = False


@dataclass
class ModelConfig:
    arch: str = (
        "haed"  # "haed" (encoder / main / decoder), "flat" (byte-level causal transformer = `main` over bytes) or
        # "megabyte" (the peer, MEGABYTE-pytorch: global model = `main`, local model = `decoder`; haed.peer)
    )
    patch_size: int = 8  # K bytes per patch
    encoder: StackConfig = field(default_factory=lambda: StackConfig(dim=128, layers=1, heads=4))
    main: StackConfig = field(default_factory=lambda: StackConfig(dim=256, layers=4, heads=4))
    decoder: StackConfig = field(default_factory=lambda: StackConfig(dim=128, layers=2, heads=4))
    pooling: str = (
        "concat"  # how the encoder turns K byte vectors into one: "concat" (linear of the concatenation) or "mean"
    )
    conditioning: str = (
        "add"  # how h_t enters the decoder: "add" (K per-position vectors) or "prefix" (one extra position)
    )
    # IEM's patch score: "dot" <W h_t, E(P)> / tau, or "cosine": the cosine of W h_t and E(P) times a
    # learned scale (starts at 10, at most 100), so that the first loss is near ln(candidates).
    score: str = "dot"
    max_seq_len: int = 8192  # longest window in bytes that rotary tables are built for (grown on demand)
    rope_base: float = 10000.0


@dataclass
class DataConfig:
    dataset: str = ""  # dataset directory made by `haed prepare`
    seq_len: int = 1024  # training window in bytes (a multiple of patch_size)


# torch.compile's modes a phase's `compile_mode` may name; the one that makes the stacks CUDA graphs
CUDA_GRAPHS = "reduce-overhead"
COMPILE_MODES = ("default", CUDA_GRAPHS, "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """One training phase. The same fields serve IEM, the decoder phase and full training."""

    steps: int = 1000  # optimizer steps the schedule runs over (without a time budget)
    # Seconds of training (0: off). With a budget the warm-up still counts steps, the cosine decay
    # runs over the budget's seconds, and the run ends when they are spent; `steps` is then only a
    # cap. Validation and checkpoint writing are not charged to it.
    time_budget: float = 0.0
    batch_size: int = 8  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 200  # validate every N steps, and at the end of the phase (0 and no eval_every_seconds: never)
    eval_every_seconds: float = 0.0  # also validate every N seconds of training (0: off)
    eval_batches: int = 8
    ckpt_every: int = 500
    log_every: int = 10
    seed: int = 0
    compile: bool = False  # torch.compile the model's stacks and IEM's chunked softmax (CUDA only)
    # torch.compile's mode for the stacks: "default", or "reduce-overhead" (CUDA graphs: a graph's kernels
    # replayed in one launch, for steps whose GPU waits on the host's launches: IEM's at short sequences),
    # or "max-autotune-no-cudagraphs". One process only.
    compile_mode: str = "default"
    # Stacks whose activations this phase recomputes in the backward pass instead of storing
    # ("main", "encoder", "decoder", comma-separated; "" for none): less memory, more compute.
    # Adds to each stack's own `checkpoint` setting.
    recompute: str = ""
    # The chunks of patches the encoder recomputes in where `recompute` names it, one at a time: more, less
    # memory in the backward pass; fewer, fewer kernel launches a step (compiled: 155 kernels in 4 chunks, 96 in
    # 2, 55 in 1, counted on a CPU). On CUDA, row counts are multiples of 512: a chunk count that divides 512
    # keeps one compiled graph for every count (3 chunks took IEM's step at seq 2,048 from 18.5 to 22.5 ms).
    # One H100, seq 2,048: 2 chunks 1.32x full training's bytes/s at 0.329x its memory, 4 chunks 1.26x at
    # 0.319x (docs/2026-12-06-big-corpora.md, tenth session).
    encoder_chunks: int = 2
    # IEM, the decoder phase and full training: find the batch's distinct patches without telling the host their
    # count (`haed.model.unique_patches_fixed`): no synchronisation in the step, so the host runs ahead of the GPU,
    # and the encoder's (and IEM's softmax's) shapes recur every step. Costs: the encoder (and IEM's candidates)
    # take every patch row of the batch, the repeats masked, instead of the distinct ones (on `code` about 1.4x as
    # many at seq 8,192; at most `num_negatives` candidates still). One process (several take the default: IEM's
    # candidates are gathered by count). With `compile` (CUDA), the whole loss is then one compiled graph
    # (`haed.objectives.fixed_shape_loss`): one forward and one backward call a step instead of a dozen compiled
    # calls and a few hundred operators between.
    # Measured on one H100 (code, seq 2,048, as CUDA graphs, 2026-12-07) before the loss compiled whole: no faster
    # than the default for IEM (18.65 ms against 18.51 pooled), and no steadier from run to run, so it stays off.
    fixed_shapes: bool = False
    # IEM only
    num_negatives: int = 0  # cap on shared candidates per step (0: every distinct target patch of the batch)
    logq: bool = True  # subtract log(count) of each candidate (sampled-softmax correction)
    tau: float = 1.0  # temperature of the patch scores
    # Byte-level loss during IEM: the decoder's cross-entropy on this fraction of the patches (0: off,
    # the decoder is not in the graph), added with this weight. It trains the decoder alongside, and
    # its gradient teaches the main model what the decoder needs, for a fraction of full training's memory.
    byte_loss_fraction: float = 0.0
    byte_loss_weight: float = 1.0
    # How many leading bytes of each sampled patch the byte loss covers (0: all K). The decoder is causal
    # within a patch, so the first m bytes cost m/K of it: fraction 1 with 1 byte gives every patch's h_t a
    # byte-level gradient for the cost of fraction 1/K with all K bytes. At equal decoder cost it lost to
    # whole patches on the CPU, on text and audio (docs/iem-research.md).
    byte_loss_bytes: int = 0
    logits_chunk: int = 4096  # rows of the steps x candidates logits computed at once
    # Decoder phase only (the other phases train the whole main model anyway): also train the main
    # model's last N blocks and its final norm (0: the main model stays frozen). They adapt h_t to the
    # decoder; the lower blocks and the encoder run frozen, without autograd, so the phase keeps most
    # of its memory advantage over full training.
    main_layers: int = 0
    # Decoder phase only: start its AdamW from the IEM phase's moments of the parameters it trains (the
    # decoder, which the byte loss trained, and the `main_layers` blocks) instead of zeros, so that it
    # needs no warm-up. Read from the IEM run's newest step checkpoint (one process).
    carry_moments: bool = False
    # With carry_moments: raise each carried second moment, tensor by tensor, to the phase's first clipped
    # gradient where it lies below it. The IEM phase clips its whole gradient (softmax, byte loss, every
    # stack) to `grad_clip`, which shrinks the decoder's share; the decoder phase's gradient is not
    # shrunk so, and carried moments would take steps several times `lr` until they adapt (CPU, `code`
    # scaled down as in docs/2026-12-06-big-corpora.md: 16 of 29 tensors raised, x1.78 median, x3.63 most).
    match_moments: bool = False
    # With several processes (torchrun): "global" scores against the distinct patches of every rank's
    # batch (as one process with the whole batch would), "local" against each rank's own only.
    candidates: str = "global"


@dataclass
class GenerateConfig:
    max_bytes: int = 512
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.95
    seed: int = 0


@dataclass
class CompareConfig:
    """`haed compare`'s settings that belong to a recipe (the budget and the systems are the command's)."""

    # Share of the IEM system's time budget that its decoder phase gets; the IEM phase gets the rest.
    decoder_fraction: float = 0.1


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric field: low and high, each included unless marked open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


AT_LEAST_1 = Bounds(1)
AT_LEAST_0 = Bounds(0)
POSITIVE = Bounds(0, low_open=True)

# Ranges of the numeric fields, per config class. Every field is type-checked against its
# annotation whether or not it is listed here.
FIELD_BOUNDS: dict[type, dict[str, Bounds]] = {
    StackConfig: dict(
        dim=AT_LEAST_1, layers=AT_LEAST_1, heads=AT_LEAST_1, mlp_ratio=POSITIVE, dropout=Bounds(0, 1, high_open=True)
    ),
    ModelConfig: dict(patch_size=AT_LEAST_1, max_seq_len=AT_LEAST_1, rope_base=POSITIVE),
    DataConfig: dict(seq_len=AT_LEAST_1),
    TrainConfig: dict(
        steps=AT_LEAST_1,
        batch_size=AT_LEAST_1,
        grad_accum=AT_LEAST_1,
        lr=POSITIVE,
        min_lr_ratio=Bounds(0, 1),
        warmup_steps=AT_LEAST_0,
        weight_decay=AT_LEAST_0,
        beta1=Bounds(0, 1, high_open=True),
        beta2=Bounds(0, 1, high_open=True),
        grad_clip=POSITIVE,
        eval_every=AT_LEAST_0,
        eval_batches=AT_LEAST_1,
        ckpt_every=AT_LEAST_1,
        log_every=AT_LEAST_1,
        seed=AT_LEAST_0,
        num_negatives=AT_LEAST_0,
        tau=POSITIVE,
        logits_chunk=AT_LEAST_1,
        encoder_chunks=AT_LEAST_1,
        time_budget=AT_LEAST_0,
        eval_every_seconds=AT_LEAST_0,
        byte_loss_fraction=Bounds(0, 1),
        byte_loss_weight=AT_LEAST_0,
        byte_loss_bytes=AT_LEAST_0,
        main_layers=AT_LEAST_0,
    ),
    CompareConfig: dict(decoder_fraction=Bounds(0, 1, low_open=True, high_open=True)),
    GenerateConfig: dict(
        max_bytes=AT_LEAST_1,
        temperature=AT_LEAST_0,
        top_k=AT_LEAST_0,
        top_p=Bounds(0, 1, low_open=True),
        seed=AT_LEAST_0,
    ),
}


@functools.cache
def field_types(cls) -> dict[str, Any]:
    """A config class's field annotations, resolved (this module postpones annotations)."""
    return typing.get_type_hints(cls)


def check_fields(config, where: str = "") -> None:
    """Check (and normalise: an int where a float is declared becomes a float) every field of a
    config and of the configs inside it; the first bad value raises a HaedError naming the field."""
    kinds = field_types(type(config))
    bounds = FIELD_BOUNDS.get(type(config), {})
    for f in dataclasses.fields(config):
        name, kind, value = f"{where}{f.name}", kinds[f.name], getattr(config, f.name)
        if dataclasses.is_dataclass(kind):
            check_fields(value, f"{name}.")
            continue
        value = _typed(name, value, kind)
        if f.name in bounds and value is not None and value not in bounds[f.name]:
            raise HaedError(f"{name} must be {bounds[f.name]}, not {value!r}")
        setattr(config, f.name, value)


def _typed(name: str, value, kind):
    args = typing.get_args(kind)
    if (
        typing.get_origin(kind) in (typing.Union, getattr(types, "UnionType", None))
        and type(None) in args
        and len(args) == 2
    ):  # Optional[X]
        return None if value is None else _typed(name, value, next(a for a in args if a is not type(None)))
    if kind is bool:
        if not isinstance(value, bool):
            raise HaedError(f"{name} must be true or false, not {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise HaedError(f"{name} must be an integer, not {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise HaedError(f"{name} must be a finite number, not {value!r}")
        return float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise HaedError(f"{name} must be a string, not {value!r}")
    return value


def recompute_stacks(text: str) -> list[str]:
    return [name.strip() for name in str(text).split(",") if name.strip()]
