"""The peer users would pick instead of haed: lucidrains/MEGABYTE-pytorch, as a model haed trains.

`model.arch = "megabyte"` builds MEGABYTE (the `peer` extra: `pip install 'haed[peer]'`, imported only
here, when such a model is built) from the recipe's own sizes: its global model is the recipe's
`main` stack (width, depth) over patches of `patch_size` bytes, its local model the `decoder`
stack's width and depth. Heads, head width and feed-forward width are MEGABYTE's defaults (8 heads of
64, x4), as a user of the package gets them; so is its attention (scaled_dot_product_attention limited
by the package to the math and memory-efficient kernels on GPUs other than the A100).

haed's own loop trains it (same windows, AdamW, schedule, time budget, bf16 autocast, clipping,
validation and best checkpoint: the objective `megabyte`), and haed's exact evaluation scores it: every
byte's cross-entropy given the bytes before it in its window. The package's own loss ignores the
byte 0 as padding (`pad_id = 0`); haed's windows are never padded, so haed counts every byte, byte 0
included (a real sample value in mu-law audio). Generation is MEGABYTE-pytorch's own business: haed
samples only its own models.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from haed.config import ModelConfig
from haed.errors import HaedError
from haed.layers import attention_flops, linear_weights

PACKAGE, VERSION = "MEGABYTE-pytorch", "0.3.6"
HEADS, DIM_HEAD, FF_MULT = 8, 64, 4  # MEGABYTE's defaults


def megabyte_class():
    try:
        from MEGABYTE_pytorch import MEGABYTE
    except ImportError as e:
        raise HaedError(
            f"model.arch = 'megabyte' needs {PACKAGE} ({e}): pip install 'haed[peer]' "
            f"(or {PACKAGE}=={VERSION} from wheels, benchmarks/README.md)"
        ) from None
    return MEGABYTE


class MegabytePeer(nn.Module):
    """MEGABYTE-pytorch with haed's model interface: `forward(x)` gives (B, N, 256) logits where
    position i predicts byte i of the window, as `HAED.forward` does."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_size = cfg.patch_size
        self.net = megabyte_class()(
            num_tokens=256,
            dim=(cfg.main.dim, cfg.decoder.dim),
            depth=(cfg.main.layers, cfg.decoder.layers),
            max_seq_len=(max(1, cfg.max_seq_len // cfg.patch_size), cfg.patch_size),
            dim_head=DIM_HEAD,
            heads=HEADS,
            ff_mult=FF_MULT,
            flash_attn=True,  # the package's scaled_dot_product_attention path
        )

    def first_byte_logits(self) -> torch.Tensor:
        """(1, 1, 256): MEGABYTE's prediction of a window's first byte. The package computes it from its
        local start token alone (its first position sees nothing else) and drops it from the logits it
        returns, keeping it only inside its loss; this is the same computation."""
        start = self.net.start_tokens[-1].view(1, 1, -1)
        return self.net.to_logits(self.net.transformers[-1](start))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N = x.shape
        if N % self.patch_size:
            raise HaedError(f"MEGABYTE's windows must be whole patches of {self.patch_size} bytes, not {N}")
        after = self.net(x.long())  # (B, N, 256): position i predicts byte i + 1
        first = self.first_byte_logits().to(after.dtype).expand(B, 1, -1)
        return torch.cat((first, after[:, :-1]), dim=1)

    def parameter_counts(self) -> dict[str, int]:
        return parameter_counts(self.net)

    def forward_flops(self, batch_size: int, seq_len: int) -> dict[str, float]:
        return {"megabyte": forward_flops(self.net, self.patch_size, batch_size, seq_len)}


def parameter_counts(net: nn.Module) -> dict[str, int]:
    """A MEGABYTE model's parameters: its global and local transformers, the rest, the total."""
    glob = sum(p.numel() for p in net.transformers[0].parameters())
    local = sum(p.numel() for p in net.transformers[1].parameters())
    total = sum(p.numel() for p in net.parameters())
    return {"global": glob, "local": local, "other": total - glob - local, "total": total}


def forward_flops(net: nn.Module, patch_size: int, batch_size: int, seq_len: int) -> float:
    """Matrix FLOPs of one forward pass of a MEGABYTE model, counted as `haed.model.forward_flops` counts
    haed's: each stage prepends a start position; attention 4 x rows x context x width per layer, halved
    (causal). Heads, head width and depths are read off the model."""
    B, K = batch_size, patch_size
    T = seq_len // K
    glob_rows, local_rows = B * (T + 1), B * T * (K + 1)
    flops = 2.0 * (
        linear_weights(net.transformers[0]) * glob_rows
        + linear_weights(net.transformers[1]) * local_rows
        + linear_weights(net.token_embs[1]) * B * T
        + linear_weights(net.to_next_transformer_projections[0]) * B * T
        + net.to_logits.weight.numel() * local_rows
    )
    for stage, (rows, context) in zip(net.transformers, ((glob_rows, T + 1), (local_rows, K + 1))):
        attention = stage.layers[0][0]
        inner = attention.to_q.out_features  # heads x head width
        flops += attention_flops(len(stage.layers), inner, rows, context, True)
    return flops
