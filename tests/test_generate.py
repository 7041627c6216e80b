"""Cached hierarchical generation against the uncached forward pass."""

import pytest
import torch

from _tiny import random_bytes, tiny_model
from haed.generate import generate, make_sampler, sample_next


@pytest.mark.parametrize("conditioning", ["add", "prefix"])
@pytest.mark.parametrize("prompt_len", [0, 1, 4, 6, 11])
def test_cached_distributions_equal_uncached_forward(conditioning, prompt_len):
    """Every next-byte distribution of the cached sampler equals the full forward's, prompt mid-patch too."""
    model = tiny_model(patch_size=4, conditioning=conditioning)
    x = random_bytes(1, 48, seed=prompt_len)
    with torch.no_grad():
        reference = torch.log_softmax(model(x)[0].double(), -1)
    sampler = make_sampler(model, context_bytes=64)
    logits = sampler.start(x[0, :prompt_len])
    for i in range(prompt_len, 48):
        torch.testing.assert_close(torch.log_softmax(logits.double(), -1), reference[i], rtol=0, atol=1e-5)
        logits = sampler.feed(x[0, i : i + 1])


def test_flat_cached_distributions_equal_uncached_forward():
    model = tiny_model(arch="flat")
    x = random_bytes(1, 40)
    with torch.no_grad():
        reference = torch.log_softmax(model(x)[0].double(), -1)
    sampler = make_sampler(model, context_bytes=64)
    logits = sampler.start(x[0, :7])
    for i in range(7, 40):
        torch.testing.assert_close(torch.log_softmax(logits.double(), -1), reference[i], rtol=0, atol=1e-5)
        logits = sampler.feed(x[0, i : i + 1])


def test_generation_is_seeded_and_runs_past_the_context():
    model = tiny_model(patch_size=4)
    a = generate(model, b"hello wor", 100, seed=7, context_bytes=32)
    b = generate(model, b"hello wor", 100, seed=7, context_bytes=32)
    c = generate(model, b"hello wor", 100, seed=8, context_bytes=32)
    assert len(a.output) == 100 and a.output == b.output and a.output != c.output
    assert a.bytes_per_second > 0


def test_sampling_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0] + [-30.0] * 252)
    assert int(sample_next(logits, 0.0, 0, 1.0, g)) == 0  # greedy
    draws = {int(sample_next(logits, 1.0, 2, 1.0, g)) for _ in range(200)}
    assert draws == {0, 1}  # top-k = 2
    draws = {int(sample_next(logits, 1.0, 0, 0.5, g)) for _ in range(100)}
    assert draws == {0}  # byte 0 alone holds over half the mass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_steps_equal_eager_steps(dtype):
    """Replayed CUDA graphs give the eager steps' distributions, and bf16 autocast sampling the same bytes."""
    model = tiny_model(patch_size=4).cuda()
    x = random_bytes(1, 48, seed=3).cuda()
    got = {}
    for graphs in (True, False):
        sampler = make_sampler(model, context_bytes=24, cuda_graphs=graphs)  # 6 patches: re-prefills on the way
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            rows = [sampler.start(x[0, :6])]
            rows += [sampler.feed(x[0, i : i + 1]) for i in range(6, 48)]
        got[graphs] = torch.stack([r.float() for r in rows])
    torch.testing.assert_close(got[True], got[False], rtol=0, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = generate(model, b"hello", 60, seed=5, context_bytes=24, cuda_graphs=True)
        b = generate(model, b"hello", 60, seed=5, context_bytes=24, cuda_graphs=False)
    assert a.output == b.output
