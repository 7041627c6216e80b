"""Cached hierarchical generation against the uncached forward pass; streams, device-side sampling, chunks."""

import pytest
import torch
from _tiny import random_bytes, tiny_model

from haed.generate import generate
from haed.samplers import HierarchicalSampler, make_sampler
from haed.sampling import SamplingOptions, StreamNoise, mix32, sample_bytes


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("conditioning", ["add", "prefix"])
@pytest.mark.parametrize("prompt_len", [0, 1, 4, 6, 11])
def test_cached_distributions_equal_uncached_forward(conditioning, prompt_len, batch):
    """Every next-byte distribution of the cached sampler equals the full forward's, prompt mid-patch too,
    for every stream of a batch (each stream teacher-forced through its own bytes)."""
    model = tiny_model(patch_size=4, conditioning=conditioning)
    x = random_bytes(batch, 48, seed=prompt_len)
    with torch.no_grad():
        reference = torch.log_softmax(model(x).double(), -1)
    sampler = make_sampler(model, context_bytes=64, batch=batch)
    logits = sampler.start(x[:, :prompt_len])
    for i in range(prompt_len, 48):
        torch.testing.assert_close(torch.log_softmax(logits.double(), -1), reference[:, i], rtol=0, atol=1e-5)
        logits = sampler.feed(x[:, i])


@pytest.mark.parametrize("batch", [1, 3])
def test_flat_cached_distributions_equal_uncached_forward(batch):
    model = tiny_model(arch="flat")
    x = random_bytes(batch, 40)
    with torch.no_grad():
        reference = torch.log_softmax(model(x).double(), -1)
    sampler = make_sampler(model, context_bytes=64, batch=batch)
    logits = sampler.start(x[:, :7])
    for i in range(7, 40):
        torch.testing.assert_close(torch.log_softmax(logits.double(), -1), reference[:, i], rtol=0, atol=1e-5)
        logits = sampler.feed(x[:, i])


def test_shared_prompt_prefill_equals_per_stream_prefill():
    """A prompt shared by the streams is prefilled once and copied to every row: the same distributions
    as giving each stream the prompt itself."""
    model = tiny_model(patch_size=4)
    prompt = random_bytes(10, seed=1)
    shared, own = make_sampler(model, 64, batch=3), make_sampler(model, 64, batch=3)
    a, b = shared.start(prompt), own.start(prompt.expand(3, -1))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for byte in random_bytes(3, 9, seed=2).t():
        torch.testing.assert_close(shared.feed(byte), own.feed(byte), rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("prompt", [b"", b"hello wor", b"abcdefgh"])
@pytest.mark.parametrize("options", [(1.0, 0, 1.0), (0.8, 5, 0.9), (0.0, 0, 1.0)])
def test_whole_patch_steps_draw_the_bytes_of_byte_steps(options, prompt, batch):
    """A whole patch as one step (decoder steps with sampling on the device, then the main step) draws exactly
    the bytes of byte-by-byte steps: prompts mid-patch, context resets (32 bytes), a length that is not a
    multiple of K, every stream of a batch, and the same chunks delivered."""
    model = tiny_model(patch_size=4)
    temperature, top_k, top_p = options
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=11, context_bytes=32, num_samples=batch)
    chunks = {True: [], False: []}
    runs = {
        whole: generate(model, prompt, 101, whole_patches=whole, on_chunk=chunks[whole].append, chunk_bytes=3, **kw)
        for whole in (True, False)
    }
    assert runs[True].outputs == runs[False].outputs
    assert all(len(o) == 101 for o in runs[True].outputs)
    assert chunks[True] == chunks[False] and b"".join(c[0] for c in chunks[True]) == runs[True].outputs[0]


def test_whole_patch_sampler_state_equals_fed_bytes():
    """After `sample_patch` the sampler is where `feed` of the same bytes leaves it: the same next logits."""
    model = tiny_model(patch_size=4)
    options = SamplingOptions(1.0, 0, 1.0)
    noise = StreamNoise([4, 5], "cpu")
    a, b = make_sampler(model, 64, batch=2), make_sampler(model, 64, batch=2)
    a.start(random_bytes(8, seed=1))
    b.start(random_bytes(8, seed=1))
    a.set_sampling(options, noise)
    for position in (0, 4, 8):
        patch = a.sample_patch(position).clone()
        for byte in patch:
            b.feed(byte)
        torch.testing.assert_close(a.current_logits(), b.current_logits(), rtol=0, atol=0)
    assert [h.tolist() for h in a.history] == [h.tolist() for h in b.history]


def test_generation_is_seeded_and_runs_past_the_context():
    model = tiny_model(patch_size=4)
    a = generate(model, b"hello wor", 100, seed=7, context_bytes=32)
    b = generate(model, b"hello wor", 100, seed=7, context_bytes=32)
    c = generate(model, b"hello wor", 100, seed=8, context_bytes=32)
    assert len(a.output) == 100 and a.output == b.output and a.output != c.output
    assert a.bytes_per_second > 0 and a.seeds == [7]


@pytest.mark.parametrize(
    "arch, options",
    [
        ("haed", dict(temperature=1.0, top_k=0, top_p=1.0)),
        ("haed", dict(temperature=0.8, top_k=0, top_p=0.95)),
        ("haed", dict(temperature=1.3, top_k=20, top_p=1.0)),
        ("haed", dict(temperature=0.0, top_k=0, top_p=1.0)),
        ("flat", dict(temperature=0.9, top_k=40, top_p=0.9)),
    ],
)
def test_batched_streams_equal_single_runs(arch, options):
    """Stream i of a batch of 5 (seed 11 + i) gives the bytes of a single run with seed 11 + i: through a
    prompt that ends mid-patch and past the context (so the streams' histories are re-prefilled)."""
    model = tiny_model(patch_size=4, arch=arch)
    batch = generate(model, b"the cat", 90, seed=11, context_bytes=32, num_samples=5, **options)
    assert batch.seeds == [11, 12, 13, 14, 15] and [len(o) for o in batch.outputs] == [90] * 5
    for i, seed in enumerate(batch.seeds):
        assert generate(model, b"the cat", 90, seed=seed, context_bytes=32, **options).output == batch.outputs[i]
    if options["temperature"] > 0:
        assert len(set(batch.outputs)) == 5  # the streams are independent draws
    else:
        assert len(set(batch.outputs)) == 1  # greedy: every stream the same


def test_chunks_arrive_in_order_and_add_up_to_the_output():
    model = tiny_model(patch_size=4)
    chunks = []
    g = generate(model, b"ab", 23, seed=3, context_bytes=32, num_samples=2, on_chunk=chunks.append, chunk_bytes=5)
    assert [len(c[0]) for c in chunks] == [5, 5, 5, 5, 3] and all(len(c) == 2 for c in chunks)
    assert [b"".join(c[i] for c in chunks) for i in range(2)] == g.outputs
    per_patch = []
    generate(model, b"ab", 10, seed=3, context_bytes=32, on_chunk=per_patch.append)  # default: one patch
    assert [len(c[0]) for c in per_patch] == [4, 4, 2]


def test_mix32_is_murmur3_finalizer():
    def fmix32(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    values = [0, 1, 2, 255, 12345, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF]
    assert mix32(torch.tensor(values)).tolist() == [fmix32(v) for v in values]


def test_noise_depends_on_seed_position_and_byte_only():
    """A stream's noise is the same whatever the other streams and however positions are grouped."""
    batch = StreamNoise([5, 6, 7], "cpu")
    alone = StreamNoise([6], "cpu")
    assert torch.equal(batch.uniform(10, 20)[1], alone.uniform(0, 40)[0, 10:30])
    assert torch.equal(batch.gumbel(3, 1)[2], StreamNoise([7], "cpu").gumbel(3, 1)[0])
    u = StreamNoise(range(64), "cpu").uniform(0, 64)  # 64 x 64 x 256 values
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.002 and abs(float(u.var()) - 1 / 12) < 0.001
    # neighbouring seeds, positions and bytes are uncorrelated
    for a, b in ((u[:-1], u[1:]), (u[:, :-1], u[:, 1:]), (u[..., :-1], u[..., 1:])):
        assert abs(float(torch.corrcoef(torch.stack((a.flatten(), b.flatten())))[0, 1])) < 0.01


def test_device_sampling_follows_the_filtered_distribution():
    """Gumbel-max draws over many streams have the frequencies of the tempered, top-k / top-p filtered
    distribution (within 5 standard errors)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5] + [-4.0] * 250)
    cases = [
        (SamplingOptions(1.0, 0, 1.0), torch.softmax(logits, -1)),
        (SamplingOptions(0.5, 0, 1.0), torch.softmax(logits / 0.5, -1)),
        (SamplingOptions(1.0, 3, 1.0), torch.softmax(torch.cat((logits[:3], torch.full((253,), float("-inf")))), -1)),
    ]
    p = torch.softmax(logits, -1)
    keep = int((p.cumsum(-1) - p <= 0.7).sum())  # the smallest set of top bytes reaching 0.7
    cases.append(
        (SamplingOptions(1.0, 0, 0.7), torch.softmax(logits.masked_fill(torch.arange(256) >= keep, float("-inf")), -1))
    )
    n = 20000
    noise = StreamNoise(range(n), "cpu").gumbel(0, 1)[:, 0]  # one draw from each of n streams
    for options, expected in cases:
        freq = torch.bincount(sample_bytes(logits.expand(n, -1), options, noise), minlength=256).double() / n
        bound = 5 * (expected.double() * (1 - expected.double()) / n).sqrt() + 1e-12
        assert ((freq - expected.double()).abs() <= bound).all(), options
        assert (freq[expected == 0] == 0).all(), options


def test_sampling_filters():
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0] + [-30.0] * 252).expand(200, -1)
    noise = StreamNoise(range(200), "cpu").gumbel(0, 1)[:, 0]
    assert set(sample_bytes(logits, SamplingOptions(0.0, 0, 1.0), None).tolist()) == {0}  # greedy
    assert set(sample_bytes(logits, SamplingOptions(1.0, 2, 1.0), noise).tolist()) == {0, 1}  # top-k = 2
    assert set(sample_bytes(logits, SamplingOptions(1.0, 0, 0.5), noise).tolist()) == {
        0
    }  # byte 0 alone holds over half the mass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA (run on the device)")
@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_cached_distributions_equal_uncached_forward(graphs):
    """On the GPU too (float32), the cached sampler's distributions, byte steps eager or replayed as CUDA
    graphs, are the uncached forward pass's: a prompt mid-patch, three streams. The tests below compare
    the other GPU paths (whole patches, the compiled step, the Triton kernels) with these eager steps."""
    model = tiny_model(patch_size=4).cuda()
    x = random_bytes(3, 48, seed=6).cuda()
    with torch.no_grad():
        reference = torch.log_softmax(model(x).double(), -1)
    sampler = make_sampler(model, context_bytes=64, cuda_graphs=graphs, batch=3)
    logits = sampler.start(x[:, :6])
    for i in range(6, 48):
        torch.testing.assert_close(torch.log_softmax(logits.double(), -1), reference[:, i], rtol=0, atol=1e-5)
        logits = sampler.feed(x[:, i])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_steps_equal_eager_steps(dtype, batch):
    """Replayed CUDA graphs give the eager steps' distributions over whole patches and re-prefills, for a
    batch of streams too, and bf16 autocast sampling the same bytes."""
    model = tiny_model(patch_size=4).cuda()
    x = random_bytes(batch, 48, seed=3).cuda()
    got = {}
    for graphs in (True, False):
        sampler = make_sampler(
            model, context_bytes=24, cuda_graphs=graphs, batch=batch
        )  # 6 patches: re-prefills on the way
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            rows = [sampler.start(x[:, :6])]
            rows += [sampler.feed(x[:, i]) for i in range(6, 48)]
        got[graphs] = torch.stack([r.float() for r in rows])
    torch.testing.assert_close(got[True], got[False], rtol=0, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = generate(model, b"hello", 60, seed=5, context_bytes=24, cuda_graphs=True, num_samples=batch)
        b = generate(model, b"hello", 60, seed=5, context_bytes=24, cuda_graphs=False, num_samples=batch)
    assert a.outputs == b.outputs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("options", [(1.0, 0, 1.0), (0.8, 0, 0.95), (0.0, 0, 1.0)])
def test_cuda_whole_patch_graphs_equal_eager_bytes(options, batch):
    """One CUDA graph per patch (K decoder steps with sampling on the device, encoder, main step) draws the
    bytes of the eager steps, byte by byte and patch by patch, through re-prefills (context 24 bytes)."""
    model = tiny_model(patch_size=4).cuda()
    temperature, top_k, top_p = options
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=3, context_bytes=24, num_samples=batch)
    runs = {
        (graphs, whole): generate(model, b"hello", 70, cuda_graphs=graphs, whole_patches=whole, **kw).outputs
        for graphs in (True, False)
        for whole in (True, False)
    }
    assert len(set(map(tuple, runs.values()))) == 1


def test_linear_weights_in_converts_only_a_copys_linear_layers():
    from haed.samplers import linear_weights_in

    model = tiny_model(patch_size=4)
    copy = linear_weights_in(model, torch.float64)
    linear = {n for n, m in copy.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, param in copy.named_parameters():
        owner = name.rsplit(".", 1)[0]
        assert param.dtype == (torch.float64 if owner in linear else torch.float32), name
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the original is untouched
    assert linear and len(list(copy.parameters())) == len(list(model.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast (run on the device)")
@pytest.mark.parametrize("graphs", [True, False])
def test_cuda_bf16_linear_weights_give_exactly_what_autocast_computes(graphs):
    """A sampler made under autocast uses bf16 Linear weights: its distributions are bit for bit those of
    the float32 model under autocast."""
    model = tiny_model(patch_size=4).cuda()
    x = random_bytes(2, 40, seed=4).cuda()
    plain = make_sampler(model, context_bytes=24, cuda_graphs=graphs, batch=2)  # float32 weights
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cast = make_sampler(model, context_bytes=24, cuda_graphs=graphs, batch=2)
        assert cast.model.decoder.head.weight.dtype == torch.bfloat16
        got = []
        for sampler in (plain, cast):
            rows = [sampler.start(x[:, :6])] + [sampler.feed(x[:, i]) for i in range(6, 40)]
            got.append(torch.stack([r.float() for r in rows]))
    torch.testing.assert_close(got[0], got[1], rtol=0, atol=0)


# On a GPU host this runs on CUDA, captured as CUDA graphs: the compiled step's one compilation there
# (inductor's C++ compile of the CPU variant took 57-70 s on top of it; H100, 2026-12-07, suite runs 2 and 3).
@pytest.mark.cuda
def test_compiled_patch_step_draws_the_eager_bytes():
    """The whole-patch step through torch.compile draws the bytes of the eager byte-by-byte steps, through
    a prompt mid-patch (the step is compiled during the prefill, which must leave the patch's decoder
    cache as it was) and re-prefills (context 18 bytes), for two streams."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model(patch_size=3).to(device)  # the prompt leaves 2 bytes of its last patch to the byte steps
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, seed=3, context_bytes=18, num_samples=2)
    progress = RecordingProgress()
    graphs = device == "cuda"
    compiled = generate(
        model, b"hey!", 40, whole_patches=True, compile=True, cuda_graphs=graphs, progress=progress, **kw
    )
    eager = generate(model, b"hey!", 40, whole_patches=False, cuda_graphs=False, **kw)
    assert compiled.outputs == eager.outputs
    assert progress.events[0] == ("add", "prefill, compiling the patch step", None)  # minutes on a GPU


class RecordingProgress:
    """What `generate` tells a rich-like progress display, in order."""

    def __init__(self):
        self.events: list[tuple] = []

    def add_task(self, description, total=None):
        self.events.append(("add", description, total))
        return len(self.events)

    def remove_task(self, task):
        self.events.append(("remove", task))

    def update(self, task, completed=None):
        self.events.append(("update", task, completed))


def test_generate_shows_the_prefill_then_the_bytes():
    progress = RecordingProgress()
    generate(tiny_model(patch_size=4), b"hi", 70, progress=progress)
    kinds = [e[0] for e in progress.events]
    assert progress.events[:3] == [("add", "prefill", None), ("remove", 1), ("add", "generate", 70)]
    assert kinds[3:] == ["update"] * (len(kinds) - 3) and progress.events[-1] == ("update", 3, 70)


def test_compiled_patch_step_is_one_graph():
    """torch.compile traces the whole-patch step (K decoder steps with their draws, the encoder, the main
    model's step) as one graph: a graph break would split it into pieces with Python between them, and
    the fusion it is compiled for would be lost."""
    import torch._dynamo

    model = tiny_model(patch_size=3)
    sampler = make_sampler(model, 18, cuda_graphs=False, batch=2)
    sampler.set_sampling(SamplingOptions(1.0, 0, 0.9), StreamNoise([0, 1], "cpu"))
    sampler.start(random_bytes(2, 6, seed=1))
    with torch.no_grad():
        explained = torch._dynamo.explain(HierarchicalSampler._patch_step)(sampler)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def _prompt_patch_then_whole_patch(model, x, **sampler_options):
    """Distributions of a prompt that ends one byte into a patch, the rest of that patch fed, then one whole
    patch drawn, and the distribution after it."""
    options, noise = SamplingOptions(1.0, 0, 1.0), StreamNoise([3, 4], x.device)
    sampler = make_sampler(model, 18, batch=2, **sampler_options)
    sampler.set_sampling(options, noise)
    with torch.no_grad():
        rows = [sampler.start(x[:, :4])] + [sampler.feed(x[:, i]) for i in (4, 5)]
        rows.append(sampler.sample_patch(6).clone().float())
        rows.append(sampler.current_logits())
    return [r.float() for r in rows]


def test_compiled_patch_step_leaves_the_prompts_patch_and_distributions_as_eager():
    """Compiling the whole-patch step during the prefill runs it once for nothing: the prompt's unfinished
    patch must continue with exactly the eager sampler's distributions, and the patches after it too."""
    model = tiny_model(patch_size=3)
    x = random_bytes(2, 30, seed=8)
    compiled = _prompt_patch_then_whole_patch(model, x, compile_patch=True)
    for a, b in zip(compiled, _prompt_patch_then_whole_patch(model, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")
def test_cuda_patch_graph_capture_leaves_the_prompts_patch_as_eager():
    """Capturing the whole-patch graph during the prefill runs the step once for nothing: the prompt's
    unfinished patch continues with the eager steps' distributions (float32)."""
    model = tiny_model(patch_size=3).cuda()
    x = random_bytes(2, 30, seed=8).cuda()
    graphs = _prompt_patch_then_whole_patch(model, x, cuda_graphs=True)
    for a, b in zip(graphs, _prompt_patch_then_whole_patch(model, x, cuda_graphs=False)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")
# The default run's compiled CUDA step is test_compiled_patch_step_draws_the_eager_bytes (2 streams); these
# compile again for 1 and 3 streams
@pytest.mark.slow_gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_compiled_patch_graphs_equal_eager_bytes(batch):
    """The compiled whole-patch step, captured as one CUDA graph per patch, draws the bytes of eager steps."""
    model = tiny_model(patch_size=4).cuda()
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, seed=3, context_bytes=24, num_samples=batch)
    compiled = generate(model, b"hello", 70, cuda_graphs=True, whole_patches=True, compile=True, **kw)
    eager = generate(model, b"hello", 70, cuda_graphs=False, whole_patches=False, **kw)
    assert compiled.outputs == eager.outputs
