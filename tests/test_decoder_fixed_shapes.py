"""The decoder phase with fixed shapes (`decoder.fixed_shapes`): the frozen encoder's distinct patches found
without a host synchronisation give the same loss and gradients as through `torch.unique`, and the loss, the
frozen stacks' forward without autograd included, compiles whole."""

import pytest
import torch
from _tiny import random_bytes, tiny_model

from haed.config import TrainConfig
from haed.objectives import DECODER, _fixed_shape_decoder_loss, decoder_loss
from haed.steps import set_train_mode, set_trainable


def _decoder_phase_model(main_layers: int):
    """A tiny model as the decoder phase trains it: the encoder and the main model's lower blocks frozen."""
    model = tiny_model(patch_size=4)
    cfg = TrainConfig(main_layers=main_layers)
    set_trainable(model, DECODER, cfg)
    set_train_mode(model, DECODER, cfg)
    return model


def _loss_and_grads(model, loss_fn, x, cfg):
    model.zero_grad()
    loss, metrics = loss_fn(model, x, cfg)
    loss.backward()
    return loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("main_layers", [0, 1])
def test_fixed_shapes_give_the_decoder_phases_loss_metrics_and_gradients(main_layers):
    """Every patch row encoded (the repeats masked as zero patches) instead of the distinct ones: the same
    loss, metrics and gradients, for the decoder alone and with the main model's top block trained too."""
    model = _decoder_phase_model(main_layers)
    x = random_bytes(4, 64) % 3  # many repeated patches
    assert torch.unique(x.view(-1, 4), dim=0).shape[0] < 48  # of 64
    loss, metrics, grads = _loss_and_grads(model, decoder_loss, x, TrainConfig(main_layers=main_layers))
    fixed = TrainConfig(main_layers=main_layers, fixed_shapes=True)
    loss_f, metrics_f, grads_f = _loss_and_grads(model, decoder_loss, x, fixed)
    torch.testing.assert_close(loss_f, loss, rtol=1e-6, atol=1e-6)
    assert list(metrics_f) == list(metrics) == ["loss", "bits_per_byte"]
    torch.testing.assert_close(metrics_f, metrics, rtol=1e-6, atol=1e-6)
    assert grads and set(grads_f) == set(grads)
    assert any(name.startswith("main.") for name in grads) == bool(main_layers)
    for name, g in grads.items():
        torch.testing.assert_close(grads_f[name], g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("main_layers", [0, 1])
def test_the_decoder_phases_loss_with_fixed_shapes_compiles_whole_as_eager(main_layers):
    """torch.compile traces the decoder phase's loss with fixed shapes as one graph (fullgraph: no break), the
    frozen encoder and main blocks run without autograd inside it, with eager's loss, metrics and gradients, and
    a second step with new bytes runs the same graph. (aot_eager: torch.compile's tracing and autograd, on the
    CPU.)"""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = TrainConfig(main_layers=main_layers, fixed_shapes=True)
    compiled = torch.compile(_fixed_shape_decoder_loss, backend="aot_eager", fullgraph=True, dynamic=False)
    model = _decoder_phase_model(main_layers)
    for step in range(2):
        x = random_bytes(4, 64, seed=step) % 4  # some repeated patches
        loss, metrics, grads = _loss_and_grads(model, _fixed_shape_decoder_loss, x, cfg)
        loss_c, metrics_c, grads_c = _loss_and_grads(model, compiled, x, cfg)
        torch.testing.assert_close(loss_c, loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(metrics_c, metrics, rtol=1e-6, atol=1e-6)
        assert set(grads_c) == set(grads)
        for name, g in grads.items():
            torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-7)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
