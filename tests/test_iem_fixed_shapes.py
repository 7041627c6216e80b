"""IEM without a host synchronisation (`iem.fixed_shapes`): the distinct patches found in shapes that do not
depend on the data, the same loss and gradients as through `torch.unique`."""

import math

import pytest
import torch
from _tiny import random_bytes, tiny_model

from haed.config import TrainConfig
from haed.iem_sampling import capped_slots
from haed.model import unique_patches, unique_patches_fixed
from haed.objectives import iem_loss


@pytest.mark.parametrize("k", [2, 4, 8])
def test_fixed_distinct_patches_match_torch_unique_then_zero_rows(k):
    patches = random_bytes(60, k) % 3  # few distinct values: many repeats
    uniq, inverse, counts = unique_patches(patches)
    distinct, inverse_fixed, counts_fixed = unique_patches_fixed(patches)
    u = uniq.shape[0]
    assert distinct.shape == (60, k) and counts_fixed.shape == (60,)
    assert torch.equal(distinct[:u], uniq) and torch.equal(counts_fixed[:u], counts)
    assert torch.equal(inverse_fixed, inverse)
    assert not distinct[u:].any() and not counts_fixed[u:].any()


def test_fixed_distinct_patches_need_no_count_on_the_host():
    """Every shape follows from the input's shape alone: the function runs on the meta device (shapes, no data),
    so on CUDA the host never waits to learn one. torch.unique's output shape needs the data: it cannot."""
    patches = torch.empty((40, 4), dtype=torch.uint8, device="meta")
    assert [tuple(t.shape) for t in unique_patches_fixed(patches)] == [(40, 4), (40,), (40,)]
    with pytest.raises(NotImplementedError):
        unique_patches(patches)


def _loss_and_grads(x, cfg, generator_seed=None):
    model = tiny_model(patch_size=4)
    model.train()
    generator = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    loss, metrics = iem_loss(model, x, cfg, generator=generator)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


@pytest.mark.parametrize("logq", [True, False])
@pytest.mark.parametrize("num_negatives", [0, 1000])  # no cap, and a cap above the distinct count
def test_fixed_shapes_give_the_same_loss_and_gradients(logq, num_negatives):
    x = random_bytes(3, 64, seed=2) % 4  # repeated patches
    x[1, :32] = x[0, :32]
    cfg = dict(logq=logq, num_negatives=num_negatives, byte_loss_fraction=0.0)
    loss, metrics, grads = _loss_and_grads(x, TrainConfig(**cfg))
    loss_fixed, metrics_fixed, grads_fixed = _loss_and_grads(x, TrainConfig(**cfg, fixed_shapes=True))
    torch.testing.assert_close(loss_fixed, loss, rtol=1e-5, atol=1e-6)
    assert int(metrics_fixed["candidates"]) == metrics["candidates"] == unique_patches(x.view(-1, 4))[0].shape[0]
    torch.testing.assert_close(metrics_fixed["patch_accuracy"], metrics["patch_accuracy"])
    assert grads_fixed.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_fixed[name], g, rtol=1e-4, atol=1e-6)


def test_capped_slots_draw_distinct_patches_uniformly_and_pad_only_when_short():
    counts = torch.tensor([3, 1, 2, 1, 1, 5, 0, 0, 0, 0])  # 6 distinct patches, then 4 padding rows
    generator = torch.Generator().manual_seed(0)
    seen = torch.zeros(10)
    for _ in range(3000):
        keep, log_rate = capped_slots(counts, 3, torch.rand(10, generator=generator))
        assert len(set(keep.tolist())) == 3 and (counts[keep] > 0).all()
        seen[keep] += 1
    torch.testing.assert_close(log_rate, torch.tensor(math.log(3 / 6)))
    assert not seen[6:].any()
    assert ((seen[:6] / 3000 - 0.5).abs() < 0.04).all()  # each distinct patch kept with probability 3/6
    # more slots than distinct patches: every one, then padding
    keep, log_rate = capped_slots(counts, 8, torch.rand(10, generator=generator))
    assert set(range(6)) <= set(keep.tolist()) and len(set(keep.tolist())) == 8
    assert float(log_rate) == 0.0


def test_fixed_shapes_under_a_cap_give_the_same_expected_loss():
    """Under a cap the two draw their candidates differently (a permutation on the host, random keys on the
    device): over 300 draws each, the same mean loss, within 4 standard errors."""
    model = tiny_model(patch_size=4)
    x = random_bytes(4, 64, seed=5) % 16  # about 60 distinct patches, 10 kept
    means = []
    with torch.no_grad():
        for fixed in (False, True):
            cfg = TrainConfig(num_negatives=10, fixed_shapes=fixed)
            draws = torch.tensor(
                [float(iem_loss(model, x, cfg, torch.Generator().manual_seed(s))[0]) for s in range(300)]
            )
            means.append((draws.mean(), draws.std() / 300**0.5))
    (a, sa), (b, sb) = means
    assert abs(a - b) < 4 * (sa**2 + sb**2) ** 0.5


@pytest.mark.parametrize("num_negatives", [0, 10])  # every distinct patch; a cap (random keys drawn first)
def test_the_loss_with_fixed_shapes_compiles_whole_as_eager(num_negatives):
    """With fixed shapes IEM's loss is one function of tensors (its random numbers drawn before it,
    `fixed_shape_draws`): torch.compile traces all of it as one graph (fullgraph), the encoder's and main
    model's recomputation and the byte loss inside, with eager's loss, metrics and gradients, and a second
    step with new bytes and new draws runs the same graph. (aot_eager: torch.compile's tracing and autograd,
    on the CPU.)"""
    import torch._dynamo

    from haed.iem_sampling import fixed_shape_draws
    from haed.objectives import _fixed_shape_iem_loss

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = TrainConfig(num_negatives=num_negatives, fixed_shapes=True, byte_loss_fraction=0.25)
    compiled = torch.compile(_fixed_shape_iem_loss, backend="aot_eager", fullgraph=True, dynamic=False)
    model = tiny_model(patch_size=4)
    model.train()
    model.encoder.recompute = model.main.recompute = True
    for step in range(2):
        x = random_bytes(4, 64, seed=step) % 16  # about 60 distinct patches of 64, repeats among them
        results = []
        for loss_fn in (_fixed_shape_iem_loss, compiled):
            model.zero_grad()
            draws = fixed_shape_draws(64, cfg, torch.Generator().manual_seed(step), x.device)
            loss, metrics = loss_fn(model, x, cfg, draws)
            loss.backward()
            results.append((loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters()}))
        (loss, metrics, grads), (loss_c, metrics_c, grads_c) = results
        torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
        assert (
            list(metrics_c)
            == list(metrics)
            == ["softmax_loss", "patch_accuracy", "candidates", "byte_bits_per_byte", "loss"]
        )
        torch.testing.assert_close(metrics_c, metrics, rtol=1e-6, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-7)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
