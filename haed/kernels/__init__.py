"""Triton kernels for a patch step of generation, used only when asked (`haed generate --decoder-kernels`,
`generate(..., decoder_kernels=True)`), on CUDA with Triton (or Triton's interpreter, for the tests).

- `decoder.py`, `DecoderKernels`: the byte decoder's K steps of a patch in one launch, drawing the bytes
  (greedy or temperature only; for top-k and top-p one launch per byte, the byte drawn between). Used
  by the whole-patch step of `haed.samplers.HierarchicalSampler` for any number of streams, where the
  decoder's widths are powers of two.
- `main.py`, `MainKernels`: the encoder and the main model's step after the patch, in one launch. Used
  for one stream only, where the encoder's and the main model's widths are powers of two too (the
  `speech` recipe); otherwise that step stays compiled.
- `stages.py`: the Triton stages both are made of, and the grid-wide sync between them; `support.py`:
  what they need on the host (which models and devices they run, weights stacked by layer, tile sizes).

Measured on an H200 (docs/performance.md, 6e-6f): for one stream the fastest way to generate; for 64
streams slower than the compiled step, so the kernels are opt-in. These modules import Triton; the rest
of haed imports them only when the kernels are asked for. A new kernel goes in a file of its own here,
built from `stages.py` (a new stage shared by two kernels goes there too), its host-side checks in
`support.py`, and a test in tests/test_kernels.py against the model's own step.
"""

from haed.kernels.decoder import DecoderKernels
from haed.kernels.main import MainKernels, main_unsupported_reason
from haed.kernels.support import config_unsupported_reason, unsupported_reason

__all__ = [
    "DecoderKernels",
    "MainKernels",
    "config_unsupported_reason",
    "main_unsupported_reason",
    "unsupported_reason",
]
