"""The samplers: next-byte distributions of a model for many streams at once, one step at a time, with
key/value caches (never a re-run of the model per byte). `haed.generate` draws the bytes with them.

- `hierarchical.py`, `HierarchicalSampler`: a HAED model. The prompt's patches run through the main
  model once; then each patch is K cached decoder steps, the encoder and one cached main-model step. On
  CUDA every step has fixed shapes and is captured as a CUDA graph; the whole-patch step (K bytes drawn
  on the device, then the main model's step) is one replay, optionally compiled
  (`compiled_patch_step`) or with the decoder as Triton kernels (`haed.kernels`).
- `flat.py`, `FlatSampler`: the flat baseline, one cache, one byte per step.
- `prefill.py`: a prompt shared by every stream, prefilled once and copied to every row.

`make_sampler` picks the sampler for a model. A new sampler is a class with `start(prompt)`,
`current_logits()`, `feed(bytes)` and `can_sample_patch()` (and `sample_patch` where it can draw a
whole patch in one step) in a file of its own here, chosen in `make_sampler`; the loop over streams
(`haed.generate.generate`) needs nothing else.
"""

from __future__ import annotations

import copy

import torch

from haed.errors import HaedError
from haed.model import HAED, FlatTransformer
from haed.samplers.flat import FlatSampler
from haed.samplers.hierarchical import HierarchicalSampler, compiled_main_step, compiled_patch_step

__all__ = [
    "FlatSampler",
    "HierarchicalSampler",
    "compiled_main_step",
    "compiled_patch_step",
    "linear_weights_in",
    "make_sampler",
]


def linear_weights_in(model, dtype: torch.dtype):
    """A copy of `model` whose Linear weights and biases are stored in `dtype` (the rest as it is).

    Under CUDA autocast a Linear casts its float32 weight to the autocast dtype at every call, inside
    a CUDA graph too, where the cast is replayed: one extra kernel per layer per byte. A weight
    already in that dtype is used as it is, and the cast is the same rounding either way, so the
    copy computes bit for bit what the original computes under autocast.
    """
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)
    return model


def make_sampler(
    model,
    context_bytes: int,
    cuda_graphs: bool = True,
    batch: int = 1,
    compile_patch: bool = False,
    decoder_kernels: bool = False,
):
    """The sampler of a HAED or flat model. Made under CUDA autocast, it samples from a copy with Linear
    weights in the autocast dtype (`linear_weights_in`: the same arithmetic, without a cast per layer
    per byte), and must then be used under the same autocast."""
    if next(model.parameters()).device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        model = linear_weights_in(model, torch.get_autocast_dtype("cuda"))
    if isinstance(model, HAED):
        return HierarchicalSampler(
            model, context_bytes // model.patch_size, cuda_graphs, batch, compile_patch, decoder_kernels
        )
    if not isinstance(model, FlatTransformer):
        raise HaedError(
            f"haed samples its own models, not {type(model).__name__} (a comparison's MEGABYTE-pytorch run: "
            "use that package's own generate)"
        )
    if decoder_kernels:
        raise HaedError("the Triton decoder kernels cannot run here: a flat model has no byte decoder")
    return FlatSampler(model, context_bytes, batch)
