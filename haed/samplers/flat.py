"""The sampler of the flat byte-level baseline: the same interface as the hierarchical one, one key/value
cache, one byte per step.
"""

from __future__ import annotations

import torch

from haed.layers import START
from haed.model import FlatTransformer
from haed.samplers.prefill import broadcast_cache, prompt_rows


class FlatSampler:
    """The same interface for the flat byte-level baseline, with one key/value cache."""

    def __init__(self, model: FlatTransformer, context: int, batch: int = 1):
        self.model = model
        self.batch = batch
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.context = max(2, context)
        self.cache = model.stack.new_cache(batch, self.context, self.device, self.dtype)
        self.prefill_cache = model.stack.new_cache(1, self.context, self.device, self.dtype) if batch > 1 else None
        self.history: list[torch.Tensor] = []  # (B,) per position
        self.logits = None

    @torch.no_grad()
    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        prompt = prompt_rows(prompt.to(self.device), self.batch).long()[:, -(self.context - 1) :]
        rows = prompt.shape[0]
        self.history = [prompt[:, j].expand(self.batch) for j in range(prompt.shape[1])]
        cache = self.cache if rows == self.batch else self.prefill_cache
        cache.reset()
        tokens = torch.cat((torch.full((rows, 1), START, dtype=torch.long, device=self.device), prompt), dim=1)
        logits = self.model(tokens, cache, prepend_start=False)[:, -1]
        if cache is not self.cache:
            broadcast_cache(cache, self.cache)
        self.logits = logits.expand(self.batch, -1)
        return self.logits

    def current_logits(self) -> torch.Tensor:
        return self.logits

    def can_sample_patch(self) -> bool:
        return False  # one byte is one step already

    @torch.no_grad()
    def feed(self, byte: torch.Tensor) -> torch.Tensor:
        byte = byte.to(self.device).view(self.batch).long()
        self.history.append(byte)
        if self.cache.length >= self.cache.max_len:
            return self.start(torch.stack(self.history[-(self.context // 2) :], dim=1))
        self.logits = self.model(byte.view(self.batch, 1), self.cache, prepend_start=False)[:, -1]
        return self.logits
