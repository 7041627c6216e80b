"""Attention over very short sequences (the byte decoder's and the encoder's K positions), fwd + bwd.

The decoder attends within one patch: batch = patches (16,384 at seq 8192 x batch 16), length K = 8.
Compares PyTorch's SDPA backends with plain matrix-product attention (eager and compiled).

    python benchmarks/attention_small.py --json attention-small.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from haed.layers import short_attention as plain  # noqa: E402  (haed's own attention for short sequences)


def time_it(fn, q, k, v, steps=20, warmup=5):
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = fn(q, k, v)
        y.backward(torch.ones_like(y))
        torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = []
    compiled_plain = torch.compile(plain, dynamic=False)
    for B, H, L, D, causal in [(16384, 4, 8, 64, True), (16384, 4, 9, 64, True), (14000, 2, 8, 64, False)]:
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        variants = {
            "sdpa-flash": (SDPBackend.FLASH_ATTENTION,),
            "sdpa-efficient": (SDPBackend.EFFICIENT_ATTENTION,),
            "sdpa-cudnn": (SDPBackend.CUDNN_ATTENTION,),
        }
        for name, backends in variants.items():

            def fn(q, k, v, backends=backends):
                with sdpa_kernel(list(backends)):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            try:
                ms = time_it(fn, q, k, v)
            except RuntimeError as e:
                ms = f"error: {str(e)[:80]}"
            rows.append({"shape": [B, H, L, D], "causal": causal, "variant": name, "fwd_bwd_ms": ms})
            print(rows[-1], flush=True)
        for name, fn in (
            ("plain-eager", lambda q, k, v: plain(q, k, v, causal)),
            ("plain-compiled", lambda q, k, v: compiled_plain(q, k, v, causal)),
        ):
            rows.append({"shape": [B, H, L, D], "causal": causal, "variant": name, "fwd_bwd_ms": time_it(fn, q, k, v)})
            print(rows[-1], flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
