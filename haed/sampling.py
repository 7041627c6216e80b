"""Drawing bytes on the device: temperature, top-k and top-p as tensor operations, then Gumbel-max
with counter-based noise.

The noise for stream seed s, output position t and byte value j is a fixed function of (s, t, j), an
integer hash computed with tensor operations on the device, so a stream draws the same random numbers
whatever else is in the batch (bit for bit, on any device), and stream i of a batch reproduces a
single run with seed `seed + i`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from haed.errors import HaedError

# -- counter-based random numbers ------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 tensors x in [0, 2^32): in two 16-bit halves of c, so no product
    leaves the int64 range (torch has no unsigned 32-bit arithmetic on every device)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def mix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer (a bijection with full avalanche) on int64 tensors in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seeds(seed: int, num_samples: int) -> list[int]:
    """The seeds of `num_samples` streams: stream i gets `seed + i`."""
    return [seed + i for i in range(num_samples)]


class StreamNoise:
    """Standard Gumbel noise G(s, t, j) for streams with seeds s, output positions t, byte values j.

    Each value is a hash of (s, t, j): two 32-bit key words from the seed (splitmix64, on the host,
    once) are mixed with the position by two `mix32` rounds (a bijection of t for each stream), and
    the result with a per-byte constant by one more, on the device.
    The top 23 bits of the hash give a uniform u in (0, 1), and G = -log(-log(u)). Nothing depends on
    the other streams of the batch or on how positions are grouped into blocks.
    """

    def __init__(self, seeds: Sequence[int], device):
        keys = [_splitmix64(int(s) & _MASK64) for s in seeds]
        self.device = torch.device(device)
        self.k0 = torch.tensor([k & _MASK32 for k in keys], dtype=torch.int64, device=self.device).view(-1, 1)
        self.k1 = torch.tensor([k >> 32 for k in keys], dtype=torch.int64, device=self.device).view(-1, 1)
        byte_values = torch.arange(256, dtype=torch.int64, device=self.device)
        self.byte_keys = mix32(_mul32(byte_values + 1, 0x9E3779B9))

    def uniform(self, start: int, length: int) -> torch.Tensor:
        """(streams, length, 256) uniforms in (0, 1) for positions start .. start + length - 1."""
        return self.uniform_at(torch.arange(start, start + length, dtype=torch.int64, device=self.device))

    def uniform_at(self, positions: torch.Tensor) -> torch.Tensor:
        """(streams, L, 256) uniforms for the positions in a (L,) int64 device tensor: no host value is
        read, so the same kernels can be recorded in a CUDA graph with positions kept on the device."""
        w = mix32(mix32((positions & _MASK32).view(1, -1) ^ self.k0) ^ self.k1)[
            ..., None
        ]  # one word per (stream, position)
        h = mix32(w ^ self.byte_keys)  # 256 distinct inputs per (stream, position): a bijection keeps them apart
        return ((h >> 9).float() + 0.5) * 2.0**-23

    def gumbel(self, start: int, length: int) -> torch.Tensor:
        """(streams, length, 256) standard Gumbel noise for positions start .. start + length - 1."""
        return self.gumbel_at(torch.arange(start, start + length, dtype=torch.int64, device=self.device))

    def gumbel_at(self, positions: torch.Tensor) -> torch.Tensor:
        """(streams, L, 256) standard Gumbel noise for the positions in a (L,) int64 device tensor."""
        return -torch.log(-torch.log(self.uniform_at(positions)))


# -- the sampling rule -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingOptions:
    """temperature 0: greedy; top_k 0 (or >= 256): off; top_p 1: off."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.95


def check_sampling(temperature: float, top_k: int, top_p: float, names: dict | None = None) -> SamplingOptions:
    """Validated sampling options; a bad value is a HaedError naming where it came from."""
    names = names or {}
    t_name, k_name, p_name = (names.get(k, k) for k in ("temperature", "top_k", "top_p"))
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise HaedError(f"{t_name} must be a number >= 0 (0: greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise HaedError(f"{k_name} must be an integer >= 0 (0: off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (0 < top_p <= 1):
        raise HaedError(f"{p_name} must lie in (0, 1] (1: off), got {top_p!r}")
    return SamplingOptions(float(temperature), int(top_k), float(top_p))


def sample_bytes(logits: torch.Tensor, options: SamplingOptions, noise: torch.Tensor | None) -> torch.Tensor:
    """Draw one byte per row of (B, 256) logits on their device: (B,) long.

    Temperature, then top-k, then top-p (the smallest set of most likely bytes whose mass reaches
    top_p; sorted stably, so ties are cut the same way in any batch), then the arg-max of the scores
    plus `noise` (B, 256) standard Gumbel: an exact draw from the filtered distribution. With top-p
    the noise is added in the sorted order; any fixed assignment of independent noise values to the
    bytes gives the same distribution.
    """
    if options.temperature == 0:
        return logits.argmax(-1)
    # (x / 1 is x: no kernel for the default temperature of audio, which runs once per sample)
    scores = logits.float() if options.temperature == 1 else logits.float() / options.temperature
    if 0 < options.top_k < scores.shape[-1]:
        kth = torch.topk(scores, options.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if options.top_p < 1:
        ranked, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        probs = torch.softmax(ranked, dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the bytes ranked above each one
        ranked = ranked.masked_fill(before > options.top_p, float("-inf"))
        return order.gather(-1, (ranked + noise).argmax(-1, keepdim=True)).squeeze(-1)
    return (scores + noise).argmax(-1)


# -- samplers: next-byte distributions with key/value caches, B streams at once --------------------
