"""The IEM objective: sampled softmax over the batch's distinct patches."""

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from _tiny import random_bytes, tiny_model

from haed.config import TrainConfig
from haed.iem_sampling import capped_candidates, capped_slots
from haed.model import unique_patches, unique_patches_fixed
from haed.objectives import iem_loss
from haed.sampled_softmax import sampled_softmax_loss
from haed.steps import apply_recompute


def _queries(model, x, tau):
    B, N = x.shape
    K = model.patch_size
    targets = x.view(B, N // K, K)
    vectors = model.encoder(targets.reshape(-1, K)).view(B, N // K, -1)
    h = model.main(model.main_inputs(vectors[:, :-1]))
    return model.score_proj(h).reshape(-1, h.shape[-1]) / tau, targets.reshape(-1, K)


def test_iem_with_every_patch_as_candidate_equals_exact_softmax():
    """K = 2: all 65,536 patches as candidates, log-Q off: the loss is the exact softmax cross-entropy."""
    torch.manual_seed(0)
    model = tiny_model(patch_size=2)
    x = random_bytes(2, 16)
    every = (
        torch.stack(torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij"), -1)
        .reshape(-1, 2)
        .to(torch.uint8)
    )
    cfg = TrainConfig(logq=False, tau=0.5, logits_chunk=5)
    with torch.no_grad():
        loss, metrics = iem_loss(model, x, cfg, candidates=every)
        q, targets = _queries(model, x, cfg.tau)
        logits = q @ model.encoder(every).T
        target_ids = targets[:, 0].long() * 256 + targets[:, 1].long()
        exact = F.cross_entropy(logits, target_ids)
        accuracy = (logits.argmax(-1) == target_ids).float().mean()
    assert metrics["candidates"] == 65536
    torch.testing.assert_close(loss, exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["patch_accuracy"], accuracy)


def test_chunked_and_unchunked_iem_agree_in_loss_and_gradients():
    x = random_bytes(3, 32, seed=1)
    x[1, :16] = x[0, :16]
    results = []
    for chunk in (1, 7, 100000):
        model = tiny_model(patch_size=4)
        model.train()
        loss, _ = iem_loss(model, x, TrainConfig(logits_chunk=chunk))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(g, results[0][1][name], rtol=1e-4, atol=1e-6)
    assert not any(n.startswith("decoder.") for n in results[0][1]), "IEM must not touch the decoder"


def test_sampled_softmax_gradients_match_autograd():
    torch.manual_seed(0)
    q = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    cand = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    target_col = torch.tensor([0, 1, 2, 3, 4, 0, -1, 2, -1])
    pos = torch.randn(9, 6, dtype=torch.float64)
    present = target_col >= 0
    pos[present] = cand.detach()[target_col[present]]
    pos.requires_grad_(True)
    logq_cand, logq_pos = torch.rand(5, dtype=torch.float64), torch.rand(9, dtype=torch.float64)
    loss, correct = sampled_softmax_loss(q, cand, pos, target_col, logq_cand, logq_pos, chunk=4)
    grads = torch.autograd.grad(loss, (q, cand, pos))

    logits = (q @ cand.T - logq_cand).masked_fill(torch.arange(5)[None] == target_col[:, None], -math.inf)
    pos_logit = (q * pos).sum(-1) - logq_pos
    ref = (torch.logsumexp(torch.cat((pos_logit[:, None], logits), 1), 1) - pos_logit).mean()
    ref_grads = torch.autograd.grad(ref, (q, cand, pos))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)
    assert torch.equal(correct, pos_logit > logits.max(-1).values)


def test_duplicate_patches_are_one_candidate_and_logq_uses_their_count():
    model = tiny_model(patch_size=4)
    x = torch.tensor([list(b"abcdabcdabcdwxyz" * 2), list(b"abcdqqqqabcdwxyz" * 2)], dtype=torch.uint8)
    with torch.no_grad():
        loss_off, m = iem_loss(model, x, TrainConfig(logq=False))
        loss_on, _ = iem_loss(model, x, TrainConfig(logq=True))
        assert m["candidates"] == 3  # abcd, wxyz, qqqq
        q, targets = _queries(model, x, 1.0)
        distinct = [b"abcd", b"qqqq", b"wxyz"]
        cand = torch.tensor([list(p) for p in distinct], dtype=torch.uint8)
        counts = torch.tensor([sum(bytes(t.tolist()) == p for t in targets) for p in distinct], dtype=torch.float32)
        target_ids = torch.tensor([distinct.index(bytes(t.tolist())) for t in targets])
        logits = q @ model.encoder(cand).T
    torch.testing.assert_close(loss_off, F.cross_entropy(logits, target_ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_on, F.cross_entropy(logits - counts.log(), target_ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(loss_on, loss_off)


@pytest.mark.parametrize("fixed_shapes", [False, True])
def test_capped_candidates_keep_every_rows_positive(fixed_shapes):
    """Under a cap each row scores its positive against the kept patches, drawn on the host (a permutation) or,
    with `iem.fixed_shapes`, on the device (`capped_slots`)."""
    model = tiny_model(patch_size=4)
    x = random_bytes(2, 64, seed=5)  # 32 distinct patches (random bytes)
    cfg = TrainConfig(num_negatives=5, logq=False, fixed_shapes=fixed_shapes)
    with torch.no_grad():
        loss, metrics = iem_loss(model, x, cfg, generator=torch.Generator().manual_seed(3))
        assert int(metrics["candidates"]) == 5
        # Reference: each row scores its positive against the 5 kept patches (its own excluded).
        q, targets = _queries(model, x, 1.0)
        if fixed_shapes:
            distinct, _, counts = unique_patches_fixed(targets)
            noise = torch.rand(len(counts), generator=torch.Generator().manual_seed(3))
            kept = distinct[capped_slots(counts, 5, noise)[0]]
        else:
            uniq, _, _ = unique_patches(targets)
            kept = uniq[capped_candidates(uniq.shape[0], 5, torch.Generator().manual_seed(3))]
        pos_logit = (q * model.encoder(targets)).sum(-1)
        other = q @ model.encoder(kept).T
        is_self = (targets[:, None, :] == kept[None]).all(-1)
        other = other.masked_fill(is_self, -math.inf)
        ref = (torch.logsumexp(torch.cat((pos_logit[:, None], other), 1), 1) - pos_logit).mean()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("chunks", [4, 2])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(monkeypatch, chunks):
    import torch.utils.checkpoint as ckpt

    calls = []
    original = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda fn, *a, **k: calls.append(fn) or original(fn, *a, **k))
    x = random_bytes(2, 32, seed=4)
    results = []
    for checkpoint in (False, True):
        model = tiny_model(patch_size=4)
        apply_recompute(model, TrainConfig(recompute="main,encoder" if checkpoint else "", encoder_chunks=chunks))
        assert (model.main.recompute, model.encoder.recompute, model.decoder.stack.recompute) == (
            checkpoint,
            checkpoint,
            False,
        )
        model.train()
        loss, _ = iem_loss(model, x, TrainConfig())
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    # 2 main-model blocks, and the encoder whole in `encoder_chunks` chunks of its patches, recomputed in the backward
    # pass
    assert len(calls) == 2 + model.encoder.recompute_chunks == 2 + chunks
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-5, atol=1e-7)


def test_the_compiled_encoder_recomputes_its_chunks_like_eager_in_one_graph_for_every_row_count():
    """Training compiles the whole encoder (haed.steps.compile_stacks), its chunks' checkpoints inside, with its
    rows marked dynamic (HAED.encode_patches): vectors and gradients as eager's, for row counts that change
    every step, and one graph for all of them: multiples of the chunk count, as on CUDA, where they are padded to
    multiples of 512 (a new remainder would guard a new graph). (aot_eager: torch.compile's tracing and
    autograd, on the CPU.)"""
    import copy

    import torch._dynamo

    torch._dynamo.reset()
    model = tiny_model(patch_size=4)
    model.train()
    eager = copy.deepcopy(model.encoder)
    model.encoder.recompute = True
    model.encoder.compile(backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    for seed, rows in enumerate((40, 96, 132)):
        patches = random_bytes(rows, 4, seed=seed)
        results = []
        for encoder in (eager, model.encoder):
            encoder.zero_grad()
            torch._dynamo.maybe_mark_dynamic(patches, 0)
            vectors = encoder(patches)
            vectors.float().square().mean().backward()
            results.append((vectors.detach(), [p.grad.clone() for p in encoder.parameters()]))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
        for got, want in zip(results[1][1], results[0][1]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of the chunk softmax is used on CUDA only")
@pytest.mark.parametrize("autocast,chunk", [(False, 128), (True, 128), (True, 4096)])
def test_compiled_chunk_softmax_matches_eager(autocast, chunk):
    """The compiled chunk (its logits' matmul and gradient products included) gives eager's loss, correctness
    and gradients, in float32 and under training's bfloat16 autocast, in several chunks and in one."""
    torch.manual_seed(0)
    q = torch.randn(300, 32, device="cuda", requires_grad=True)
    cand = torch.randn(77, 32, device="cuda", requires_grad=True)
    pos = torch.randn(300, 32, device="cuda", requires_grad=True)
    target_col = torch.randint(-1, 77, (300,), device="cuda")
    logq = torch.rand(77, device="cuda")
    results = []
    for compiled in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss, correct = sampled_softmax_loss(q, cand, pos, target_col, logq, None, chunk=chunk, compiled=compiled)
        grads = torch.autograd.grad(loss, (q, cand, pos))
        results.append((loss, correct, grads))
    # bfloat16 logits may round differently where inductor orders a sum otherwise: allow one rounding
    rtol, atol = (2e-2, 1e-3) if autocast else (1e-5, 1e-6)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=rtol, atol=atol)
    assert (results[1][1] == results[0][1]).float().mean() >= (0.99 if autocast else 1.0)
    for a, b in zip(results[1][2], results[0][2]):
        torch.testing.assert_close(a, b, rtol=max(rtol, 1e-4), atol=atol)


@pytest.mark.cuda  # on the GPU where there is one (training compiles there), else on the CPU's inductor
@pytest.mark.parametrize("score", ["cosine", "dot"])
def test_compiled_score_gives_the_eager_loss_and_gradients(score):
    """`haed.steps.compile_score` (the score's projection, and the cosine's normalisations, compiled with
    dynamic shapes): IEM's loss and gradients as eager, for two batches with different row counts."""
    from haed.steps import compile_score

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TrainConfig(logits_chunk=64)
    results = []
    for compiled in (False, True):
        model = tiny_model(patch_size=4, score=score).to(device)
        if compiled:
            compile_score(model)
        per_batch = []
        for seed in (1, 2):
            x = random_bytes(2, 64 * seed, seed=seed).to(device)
            loss, metrics = iem_loss(model, x, cfg)
            grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
            per_batch.append((loss.detach(), metrics["candidates"], grads))
        results.append(per_batch)
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
        assert compiled[1] == eager[1]
        for a, b in zip(compiled[2], eager[2]):  # measured on the CPU: at most 9.5e-7 apart (fused sums)
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("logq", [True, False])
def test_padding_rows_change_neither_loss_nor_gradients(logq, monkeypatch):
    """The zero patches that pad the distinct-patch count (on CUDA) are inert candidates."""
    import haed.model

    x = random_bytes(2, 64, seed=9)
    results = []
    for multiple in (1, 48):
        monkeypatch.setattr(haed.model, "row_bucket", lambda device: multiple)
        model = tiny_model(patch_size=4)
        loss, metrics = iem_loss(model, x, TrainConfig(logq=logq, logits_chunk=5))
        loss.backward()
        results.append(
            (
                loss.detach(),
                metrics["candidates"],
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            )
        )
    (loss1, c1, g1), (loss48, c48, g48) = results
    assert c1 == c48 == len({bytes(p.tolist()) for p in x.view(-1, 4)})
    torch.testing.assert_close(loss48, loss1, rtol=1e-6, atol=1e-7)
    for name, g in g1.items():
        torch.testing.assert_close(g48[name], g, rtol=1e-5, atol=1e-7)


def test_cosine_score_starts_near_ln_candidates_and_learns_its_scale():
    """The normalised score: q and E(P) unit vectors times a learned scale; at initialisation every
    candidate scores about the same, so the loss is about ln(number of candidates)."""
    x = random_bytes(4, 256, seed=3)
    model = tiny_model(patch_size=4, score="cosine")
    model.train()
    cfg = TrainConfig(logq=False)
    loss, metrics = iem_loss(model, x, cfg)
    n = metrics["candidates"]
    assert n == 4 * 64  # random bytes: every patch distinct
    # logits ~ 10 * N(0, 1/dim): the log-sum-exp sits a little above ln n (by about 50 / dim).
    assert abs(float(loss.detach()) - math.log(n)) < 0.3 + 50 / model.cfg.main.dim
    loss.backward()
    assert model.score_log_scale.grad is not None and float(model.score_log_scale.grad) != 0.0
    assert "score_log_scale" in model.state_dict()
    # Its scores are exactly scale * cosine: compare with an explicit computation.
    with torch.no_grad():
        B, N = x.shape
        K = model.patch_size
        targets = x.view(B, N // K, K)
        vectors = model.encoder(targets.reshape(-1, K)).view(B, N // K, -1)
        h = model.main(model.main_inputs(vectors[:, :-1])).reshape(-1, vectors.shape[-1])
        q = F.normalize(model.score_proj(h), dim=-1) * model.score_log_scale.exp()
        logits = q @ F.normalize(vectors.reshape(-1, vectors.shape[-1]), dim=-1).T
        exact = F.cross_entropy(logits, torch.arange(logits.shape[0]))  # distinct patches: column r is row r's
    torch.testing.assert_close(loss.detach(), exact, rtol=1e-5, atol=1e-5)


def test_byte_loss_during_iem_is_the_decoders_loss_on_the_sampled_patches():
    from haed.objectives import LN2, full_loss, trainable_parameters

    x = random_bytes(2, 64, seed=4)
    model = tiny_model(patch_size=4)
    model.train()
    off = iem_loss(model, x, TrainConfig())[1]
    every = TrainConfig(byte_loss_fraction=1.0, byte_loss_weight=0.5)
    loss, metrics = iem_loss(model, x, every)
    full, _ = full_loss(model, x, every)
    # Over every patch the byte term is full training's loss, added with its weight.
    torch.testing.assert_close(metrics["byte_bits_per_byte"] * LN2, full.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), off["softmax_loss"] + 0.5 * full.detach(), rtol=1e-5, atol=1e-6)
    # A fraction: the decoder gets a gradient, from the sampled patches only, and is trained by IEM.
    quarter = TrainConfig(byte_loss_fraction=0.25)
    loss, _ = iem_loss(model, x, quarter, torch.Generator().manual_seed(0))
    loss.backward()
    assert model.decoder.head.weight.grad is not None and model.decoder.head.weight.grad.abs().sum() > 0
    names = {id(p) for p in trainable_parameters(model, "iem", quarter)}
    assert all(id(p) in names for p in model.decoder.parameters())
    assert not any(
        id(p) in {id(q) for q in trainable_parameters(model, "iem", TrainConfig())} for p in model.decoder.parameters()
    )


def test_byte_loss_on_leading_bytes_is_the_decoders_loss_on_those_positions():
    """With `byte_loss_bytes = m` the byte term is the full decoder's cross-entropy at positions 0..m-1 of
    every patch (the decoder is causal within a patch, so the shorter input gives the same logits)."""
    x = random_bytes(2, 64, seed=5)
    model = tiny_model(patch_size=4)
    model.eval()  # no dropout: the two computations must agree exactly
    _, metrics = iem_loss(model, x, TrainConfig(byte_loss_fraction=1.0, byte_loss_bytes=2))
    with torch.no_grad():
        logits = model(x).view(2, 16, 4, 256)[:, :, :2]
        exact = F.cross_entropy(logits.reshape(-1, 256), x.view(2, 16, 4)[:, :, :2].reshape(-1).long())
    torch.testing.assert_close(metrics["byte_bits_per_byte"] * math.log(2), exact, rtol=1e-5, atol=1e-6)
    # 0 and K both mean every byte of the patch.
    whole = iem_loss(model, x, TrainConfig(byte_loss_fraction=1.0))[1]["byte_bits_per_byte"]
    every = iem_loss(model, x, TrainConfig(byte_loss_fraction=1.0, byte_loss_bytes=4))[1]["byte_bits_per_byte"]
    torch.testing.assert_close(whole, every)
    assert not torch.isclose(whole, metrics["byte_bits_per_byte"])


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The most bytes that tensors made inside the block held at once (a storage counts while any tensor
    made on it lives)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.users: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                self._hold(t)
        return out

    def _hold(self, t):
        key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        if key not in self.users:
            self.live += size
            self.peak = max(self.peak, self.live)
        self.users[key] = self.users.get(key, 0) + 1
        weakref.finalize(t, self._release, key, size)

    def _release(self, key, size):
        self.users[key] -= 1
        if not self.users[key]:
            del self.users[key]
            self.live -= size


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_softmax_holds_a_few_chunks_of_logits_never_the_whole_matrix(dtype):
    """DESIGN: the `rows x candidates` logits must never dominate memory. Chunked, the softmax's working
    memory is a few `chunk x candidates` float32 blocks; in one chunk, about one and a half whole float32
    matrices (one float32 copy of the logits worked on in place, and the probabilities), not the 3.6
    (bfloat16) to 4.2 (float32) that the bfloat16 logits, out-of-place `logsumexp` and `exp(x - lse)` held."""
    R, C, D = 1024, 1000, 32
    g = torch.Generator().manual_seed(0)
    q, cand, pos = (torch.randn(n, D, generator=g, dtype=dtype, requires_grad=True) for n in (R, C, R))
    target_col = torch.randint(-1, C, (R,), generator=g)
    logq_cand, logq_pos = torch.randn(C, generator=g), torch.randn(R, generator=g)
    block = 128 * C * 4  # one float32 block of 128 rows' logits
    peaks = {}
    for chunk in (R, 128):
        with _LiveBytes() as tracker:
            sampled_softmax_loss(q, cand, pos, target_col, logq_cand, logq_pos, chunk=chunk)
        peaks[chunk] = tracker.peak
    assert peaks[128] < 6 * block + 8 * R * D * 4  # a few blocks, plus the gradients of q, pos and cand
    whole = R * C * 4
    assert whole < peaks[R] < 1.75 * whole
