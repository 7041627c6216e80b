"""The Triton decoder kernels (`haed.kernels`) against the model's own cached decoder step.

On CUDA the kernels are compiled (`test_cuda_*`, run on the device). Where Triton is installed without
a GPU, its interpreter runs the same kernels on the CPU (in a subprocess: TRITON_INTERPRET must be set
before the kernels are defined); the interpreter rounds to bf16 by truncation, hence its looser bound.
"""

import os
import subprocess
import sys
from dataclasses import replace
from itertools import product

import pytest
import torch
from _tiny import tiny_model

from haed.errors import HaedError
from haed.generate import generate
from haed.samplers import linear_weights_in
from haed.sampling import SamplingOptions, StreamNoise, sample_bytes

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def bf16_decoder(dim: int, heads: int, layers: int, K: int, conditioning: str, device):
    """A HAED decoder of this shape with perturbed weights (init alone gives near-uniform logits), its
    Linear weights in bf16 as a sampler made under autocast has them."""
    base = tiny_model(patch_size=K, conditioning=conditioning)
    cfg = replace(base.cfg, decoder=replace(base.cfg.decoder, dim=dim, heads=heads, layers=layers))
    from haed.model import ByteDecoder, init_weights

    torch.manual_seed(1)
    decoder = ByteDecoder(cfg)
    init_weights(decoder)
    with torch.no_grad():
        for p in decoder.parameters():
            p += 0.05 * torch.randn_like(p)
    return linear_weights_in(decoder, torch.bfloat16).to(device).eval()


def kernel_and_model_steps(decoder, batch: int, options: SamplingOptions, device, autocast_device: str):
    """One patch, position by position, through the kernels and through `decoder.step` (fed the same
    bytes): [(kernel logits or None, the bytes the kernels drew or None, the model's logits)], and both
    caches."""
    from haed.kernels import DecoderKernels

    K = decoder.patch_size
    g = torch.Generator().manual_seed(batch)
    cond = torch.randn(batch, K if decoder.conditioning == "add" else 1, decoder.stack.cfg.dim, generator=g)
    cond = cond.to(device, torch.bfloat16)
    patch = torch.randint(0, 256, (batch, 1, K), generator=g, dtype=torch.uint8).to(device)
    positions = torch.arange(100, 100 + K, device=device)
    noise = StreamNoise(list(range(7, 7 + batch)), device)
    kernel_cache = decoder.stack.new_cache(batch, K, device, torch.bfloat16)
    model_cache = decoder.stack.new_cache(batch, K, device, torch.bfloat16)
    kernels = DecoderKernels(decoder, kernel_cache, cond, patch, options, noise, positions)
    steps = []
    with torch.no_grad(), torch.autocast(autocast_device, dtype=torch.bfloat16):
        for k in range(K):
            model_cache.length = k
            tokens = torch.full((batch, 1), 256, device=device) if k == 0 else patch[:, 0, k - 1 : k].long()
            reference = decoder.step(cond, tokens, model_cache)[:, -1]
            logits = kernels.step(k)
            if logits is None:
                steps.append((None, patch[:, 0, k].clone(), reference))
            else:  # the kernels' logits buffer is overwritten by the next position
                steps.append((logits.clone(), None, reference))
    return steps, kernel_cache, model_cache, noise, positions


def check_kernels(device, autocast_device: str, shapes, batches, tolerance: float) -> None:
    """The kernels' logits follow the model's within `tolerance` (relative to the largest logit), their
    keys and values too; the bytes they draw are `sample_bytes` of their own logits, for greedy and
    temperature-only rules (the rules they draw themselves). `shapes`: (decoder dim, heads) pairs."""
    for conditioning in ("add", "prefix"):
        for dim, heads in shapes:
            decoder = bf16_decoder(dim, heads, 2, 4, conditioning, device)
            for batch in batches:
                logits_only = SamplingOptions(1.0, 5, 1.0)  # top-k: the kernels give logits
                steps, kc, mc, _, _ = kernel_and_model_steps(decoder, batch, logits_only, device, autocast_device)
                for logits, _, reference in steps:
                    error = (logits.float() - reference.float()).abs().max() / reference.float().abs().max()
                    assert error < tolerance, (conditioning, dim, batch, float(error))
                for a, b in zip(kc.k + kc.v, mc.k + mc.v):
                    assert (a.float() - b.float()).abs().max() < tolerance * b.float().abs().max() * 4
                for rule in (SamplingOptions(1.0, 0, 1.0), SamplingOptions(0.7, 0, 1.0), SamplingOptions(0.0, 0, 1.0)):
                    drawn, _, _, noise, positions = kernel_and_model_steps(
                        decoder, batch, rule, device, autocast_device
                    )
                    # The same patch with logits out: fed the drawn bytes, so the logits are those the
                    # drawing kernels computed.
                    steps, *_ = kernel_and_model_steps(decoder, batch, logits_only, device, autocast_device)
                    gumbel = noise.gumbel_at(positions)
                    for k, ((_, byte, _), (logits, _, _)) in enumerate(zip(drawn, steps)):
                        if k == 0:  # later positions depend on earlier draws, which the two runs share only at 0
                            want = sample_bytes(logits, rule, None if rule.temperature == 0 else gumbel[:, k])
                            assert torch.equal(byte.long(), want), (conditioning, dim, batch, rule)


def rerun_interpreted(test) -> bool:
    """Outside Triton's interpreter, run `test` in a subprocess under it (TRITON_INTERPRET must be set
    before the kernels are defined) and assert that it passed: True, the caller is done. Inside: False."""
    pytest.importorskip("triton")
    if INTERPRETED:
        return False
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{test.__name__}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return True


@pytest.mark.skipif(CUDA, reason="with CUDA the kernels are compiled: the test_cuda_* tests")
def test_interpreted_kernels_follow_the_decoder_step():
    if rerun_interpreted(test_interpreted_kernels_follow_the_decoder_step):
        return
    # Head widths under 32: the interpreter's bf16 tl.dot is wrong, so only the other products run here.
    check_kernels(torch.device("cpu"), "cpu", shapes=((32, 2), (64, 4)), batches=(1, 3), tolerance=0.05)


def bf16_model(pooling: str, conditioning: str, device, main_dim: int = 64, main_heads: int = 4, encoder_dim: int = 32):
    """A tiny HAED model with perturbed weights, its Linear weights in bf16 (as a sampler has them)."""
    model = tiny_model(patch_size=4, pooling=pooling, conditioning=conditioning)
    cfg = model.cfg
    cfg = replace(
        cfg,
        encoder=replace(cfg.encoder, dim=encoder_dim, heads=2),
        main=replace(cfg.main, dim=main_dim, heads=main_heads),
    )
    from haed.model import HAED

    torch.manual_seed(2)
    model = HAED(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p += 0.05 * torch.randn_like(p)
    return linear_weights_in(model, torch.bfloat16).to(device).eval()


def check_main_kernels(device, autocast_device: str, tolerance: float, **shape) -> None:
    """`MainKernels.step` against the model's own patch step (`HierarchicalSampler._main_step`): the
    conditioning vectors it writes, and the keys and values it adds to the main model's cache (whose
    other slots it leaves alone), at several positions of a cache with history."""
    from haed.kernels import MainKernels

    for pooling, conditioning in (("concat", "add"), ("mean", "prefix")):
        model = bf16_model(pooling, conditioning, device, **shape)
        K, slots = model.patch_size, 70
        g = torch.Generator().manual_seed(4)
        patch = torch.randint(0, 256, (1, 1, K), generator=g, dtype=torch.uint8).to(device)
        cache = model.main.new_cache(1, slots, device, torch.bfloat16)
        cache.k_layers.copy_(torch.randn(cache.k_layers.shape, generator=g))
        cache.v_layers.copy_(torch.randn(cache.v_layers.shape, generator=g))
        cond_len = K if conditioning == "add" else 1
        cond = torch.zeros(
            1, cond_len, model.decoder.token_embedding.embedding_dim, device=device, dtype=torch.bfloat16
        )
        position = torch.zeros((), dtype=torch.long, device=device)
        kernel_cache = model.main.new_cache(1, slots, device, torch.bfloat16)
        kernels = MainKernels(model, kernel_cache, patch, position, cond)
        for pos in (0, 5, 69):
            kernel_cache.k_layers.copy_(cache.k_layers)
            kernel_cache.v_layers.copy_(cache.v_layers)
            position.fill_(pos)
            with torch.no_grad(), torch.autocast(autocast_device, dtype=torch.bfloat16):
                reference_cache = model.main.new_cache(1, slots, device, torch.bfloat16)
                reference_cache.k_layers.copy_(cache.k_layers)
                reference_cache.v_layers.copy_(cache.v_layers)
                h = model.main(model.encoder(patch), reference_cache, pos=position)[:, -1]
                want = model.decoder.conditioning_vectors(h)
                kernels.step()
            error = (cond.float() - want.float()).abs().max() / want.float().abs().max()
            assert error < tolerance, (pooling, conditioning, pos, float(error))
            for a, b in (
                (kernel_cache.k_layers, reference_cache.k_layers),
                (kernel_cache.v_layers, reference_cache.v_layers),
            ):
                others = torch.arange(slots, device=device) != pos
                assert torch.equal(a[:, :, :, others], b[:, :, :, others])  # only the step's slot is written
                new, ref = a[:, :, :, pos].float(), b[:, :, :, pos].float()
                assert (new - ref).abs().max() < tolerance * ref.abs().max() * 4, (pooling, conditioning, pos)


@pytest.mark.skipif(CUDA, reason="with CUDA the kernels are compiled: the test_cuda_* tests")
def test_interpreted_main_kernels_follow_the_model():
    if rerun_interpreted(test_interpreted_main_kernels_follow_the_model):
        return
    check_main_kernels(torch.device("cpu"), "cpu", tolerance=0.05)


@pytest.mark.slow_gpu
@pytest.mark.skipif(not CUDA, reason="CUDA (run on the device)")
def test_cuda_main_kernels_follow_the_model():
    # The `speech` encoder's and main model's widths: the task sizes of a GPU, 8 heads in 16 parts each.
    # The bound is bf16's: at these widths the model under autocast is itself 0.5-2.1% (of the largest
    # conditioning value) from the same model in float32, and the kernel 0.6-1.9% (H200, 2026-12-02).
    check_main_kernels(torch.device("cuda"), "cuda", tolerance=0.03, main_dim=512, main_heads=8, encoder_dim=128)


@pytest.mark.slow_gpu
@pytest.mark.skipif(not CUDA, reason="CUDA (run on the device)")
def test_cuda_persistent_main_kernel_equals_its_stages_launched_one_by_one():
    """One launch (programs meeting at grid-wide syncs) computes exactly what its stages compute as
    separate launches, bit for bit, with fewer programs than tasks too. (The program count sets the
    parts attention over the cache is split into, so results are compared at equal counts.)"""
    from haed.kernels import MainKernels

    device = torch.device("cuda")
    model = bf16_model("concat", "add", device, main_dim=512, main_heads=8, encoder_dim=128)
    K, slots = model.patch_size, 300
    g = torch.Generator().manual_seed(6)
    patch = torch.randint(0, 256, (1, 1, K), generator=g, dtype=torch.uint8).to(device)
    history = torch.randn(model.main.new_cache(1, slots, "cpu", torch.bfloat16).k_layers.shape, generator=g)
    position = torch.tensor(250, device=device)
    results = {}
    for persistent, programs in product((True, False), (None, 16)):
        cache = model.main.new_cache(1, slots, device, torch.bfloat16)
        cache.k_layers.copy_(history)
        cache.v_layers.copy_(history.flip(0))
        cond = torch.zeros(1, K, model.decoder.token_embedding.embedding_dim, device=device, dtype=torch.bfloat16)
        MainKernels(model, cache, patch, position, cond, persistent, programs).step()
        torch.cuda.synchronize()
        results[persistent, programs] = (cond, cache.k_layers, cache.v_layers)
    for programs in (None, 16):
        assert all(torch.equal(a, b) for a, b in zip(results[True, programs], results[False, programs])), programs


@pytest.mark.slow_gpu  # 99 s on an H200, nearly all of it compiling
@pytest.mark.skipif(not CUDA, reason="CUDA (run on the device)")
def test_cuda_kernels_follow_the_decoder_step():
    # The `speech` decoder's widths (head width 64), and more streams than one: tensor-core products (tl.dot), in
    # two row blocks at 17. (Each shape, batch and rule is a compilation of several seconds.)
    check_kernels(torch.device("cuda"), "cuda", ((256, 4),), batches=(1, 17), tolerance=0.02)


@pytest.mark.slow_gpu  # did not finish compiling in 170 s on an H200 before do_not_specialize (not yet timed since)
@pytest.mark.skipif(not CUDA, reason="CUDA (run on the device)")
@pytest.mark.parametrize("batch", [1, 17])
def test_cuda_persistent_kernel_equals_its_stages_launched_one_by_one(batch):
    """The one-launch patch (every stage, programs meeting at grid-wide syncs) computes exactly what the
    same stages compute as separate launches: the same logits, caches and drawn bytes, bit for bit. So
    the syncs order every write before every read that depends on it. At the `speech` decoder's widths,
    with fewer programs than tasks too (tasks then loop over programs)."""
    from haed.kernels import DecoderKernels

    device = torch.device("cuda")
    K = 4  # the shapes of `test_cuda_kernels_follow_the_decoder_step`: the same compiled kernels
    decoder = bf16_decoder(256, 4, 3, K, "add", device)
    g = torch.Generator().manual_seed(5)
    cond = torch.randn(batch, K, 256, generator=g).to(device, torch.bfloat16)
    positions = torch.arange(50, 50 + K, device=device)
    noise = StreamNoise(list(range(batch)), device)
    for options in (SamplingOptions(1.0, 0, 1.0), SamplingOptions(0.0, 0, 1.0), SamplingOptions(1.0, 5, 1.0)):
        results = []
        for persistent, programs in product((True, False), (None, 7)):
            if not persistent and programs:
                continue
            patch = torch.zeros(batch, 1, K, dtype=torch.uint8, device=device)
            cache = decoder.stack.new_cache(batch, K, device, torch.bfloat16)
            kernels = DecoderKernels(decoder, cache, cond, patch, options, noise, positions, persistent, programs)
            logits = []
            if kernels.draws:
                kernels.patch()
            else:
                for k in range(K):
                    logits.append(kernels.step(k).clone())
                    patch[:, 0, k] = logits[-1].float().argmax(dim=-1).to(torch.uint8)
            torch.cuda.synchronize()
            results.append((patch.clone(), cache.k_layers.clone(), cache.v_layers.clone(), logits))
        first, *others = results
        for other in others:
            assert torch.equal(first[0], other[0]), options
            assert torch.equal(first[1], other[1]) and torch.equal(first[2], other[2]), options
            assert all(torch.equal(a, b) for a, b in zip(first[3], other[3])), options


@pytest.mark.skipif(not CUDA, reason="CUDA (run on the device)")
@pytest.mark.parametrize("batch", [1, pytest.param(17, marks=pytest.mark.slow_gpu)])  # [1]: the kernels' default test
def test_cuda_kernel_patch_graphs_equal_eager_bytes(batch):
    """Whole patches with the decoder as Triton kernels (one stream: the encoder and main model's step
    too): their CUDA graph replays draw exactly the bytes of the same launches without graphs, and
    those are the model's eager bytes (the tiny model's Gumbel-max draws have no near ties over these
    70 bytes)."""
    model = tiny_model(patch_size=4).cuda()
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, seed=3, context_bytes=24, num_samples=batch)
    runs = {
        graphs: generate(model, b"hello", 70, cuda_graphs=graphs, whole_patches=True, decoder_kernels=True, **kw)
        for graphs in (True, False)
    }
    assert all(run.decoder_kernels for run in runs.values())
    assert all(run.main_kernels == (batch == 1) for run in runs.values())  # one stream: the main model's too
    assert runs[True].outputs == runs[False].outputs
    eager = generate(model, b"hello", 70, cuda_graphs=False, whole_patches=False, **kw)
    assert not eager.decoder_kernels
    assert runs[True].outputs == eager.outputs
    # Top-p: the kernels' logits through `sample_bytes`, in the graph as without it. Against the model's
    # own steps only for one stream and its first patch, drawn from the prefill's conditioning: where the
    # kept mass crosses top_p a rounding difference moves the cut (measured on an H200: one of 17
    # streams went its own way after 9 bytes; with the main model's step as a kernel too, one stream
    # after 8, the first byte after that step; temperature-only draws above agree over 70 bytes).
    top_p = {
        graphs: generate(model, b"hi", 40, cuda_graphs=graphs, decoder_kernels=True, **{**kw, "top_p": 0.9})
        for graphs in (True, False)
    }
    assert top_p[True].outputs == top_p[False].outputs
    if batch == 1:
        eager_top_p = generate(model, b"hi", 40, cuda_graphs=False, whole_patches=False, **{**kw, "top_p": 0.9})
        assert top_p[True].outputs[0][:4] == eager_top_p.outputs[0][:4]


@pytest.mark.cuda  # on a GPU host, the refusal of whole_patches=False is checked on the GPU
def test_decoder_kernels_where_they_cannot_run_are_refused_in_one_line():
    model = tiny_model(patch_size=4)
    with pytest.raises(HaedError, match="decoder kernels cannot run here: CUDA only|Triton is not installed"):
        generate(model, b"hi", 8, decoder_kernels=True)
    with pytest.raises(HaedError, match="which whole_patches=False turns off"):
        generate(model.to(torch.device("cuda" if CUDA else "cpu")), b"hi", 8, decoder_kernels=True, whole_patches=False)
    with pytest.raises(HaedError, match="a flat model has no byte decoder"):
        generate(tiny_model(arch="flat"), b"hi", 8, decoder_kernels=True)
    assert not generate(model, b"hi", 8).decoder_kernels  # off unless asked for
