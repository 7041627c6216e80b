"""Full training with fixed shapes (`full.fixed_shapes`): the batch's distinct patches found without a host
synchronisation give the same loss and gradients as through `torch.unique`, and the loss compiles whole."""

import pytest
import torch
from _tiny import random_bytes, tiny_model

from haed.config import TrainConfig
from haed.objectives import _fixed_shape_full_loss, full_loss


def _loss_and_grads(model, loss_fn, x, cfg):
    model.zero_grad()
    loss, metrics = loss_fn(model, x, cfg)
    loss.backward()
    return loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fixed_shapes_give_full_trainings_loss_metrics_and_gradients():
    """Every patch row encoded (the repeats masked as zero patches) instead of the distinct ones: the same
    loss, metrics and gradients."""
    model = tiny_model(patch_size=4)
    model.train()
    x = random_bytes(4, 64) % 3  # many repeated patches
    assert torch.unique(x.view(-1, 4), dim=0).shape[0] < 48  # of 64
    loss, metrics, grads = _loss_and_grads(model, full_loss, x, TrainConfig())
    loss_f, metrics_f, grads_f = _loss_and_grads(model, full_loss, x, TrainConfig(fixed_shapes=True))
    torch.testing.assert_close(loss_f, loss, rtol=1e-6, atol=1e-6)
    assert list(metrics_f) == list(metrics) == ["loss", "bits_per_byte"]
    torch.testing.assert_close(metrics_f, metrics, rtol=1e-6, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("recompute", [False, True])
def test_full_trainings_loss_with_fixed_shapes_compiles_whole_as_eager(recompute):
    """torch.compile traces full training's loss with fixed shapes as one graph (fullgraph: no break), with
    eager's loss, metrics and gradients, the encoder and main model recomputed or not, and a second step with
    new bytes runs the same graph. (aot_eager: torch.compile's tracing and autograd, on the CPU.)"""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = TrainConfig(fixed_shapes=True)
    compiled = torch.compile(_fixed_shape_full_loss, backend="aot_eager", fullgraph=True, dynamic=False)
    model = tiny_model(patch_size=4)
    model.train()
    model.encoder.recompute = model.main.recompute = recompute
    for step in range(2):
        x = random_bytes(4, 64, seed=step) % 4  # some repeated patches
        loss, metrics, grads = _loss_and_grads(model, _fixed_shape_full_loss, x, cfg)
        loss_c, metrics_c, grads_c = _loss_and_grads(model, compiled, x, cfg)
        torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(metrics_c, metrics, rtol=1e-6, atol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-7)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
