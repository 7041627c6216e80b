"""Full training and the decoder phase with fixed shapes (`full.fixed_shapes`, `decoder.fixed_shapes`): the batch's
distinct patches found without a host synchronisation give the same loss and gradients as through `torch.unique`,
and each loss compiles whole. (IEM's: tests/test_iem_fixed_shapes.py.)"""

import pytest
import torch
from _tiny import random_bytes, tiny_model

from haed.config import TrainConfig
from haed.objectives import (
    DECODER,
    _fixed_shape_decoder_loss,
    _fixed_shape_full_loss,
    decoder_loss,
    full_loss,
)
from haed.steps import set_train_mode, set_trainable

# (name, the loss, its fixed-shape function, extra settings): full training with its encoder and main model
# recomputed or not; the decoder phase with the decoder alone or the main model's top block trained too.
CASES = [
    ("full", full_loss, _fixed_shape_full_loss, {"recompute": False}),
    ("full-recomputed", full_loss, _fixed_shape_full_loss, {"recompute": True}),
    ("decoder", decoder_loss, _fixed_shape_decoder_loss, {"main_layers": 0}),
    ("decoder-top-block", decoder_loss, _fixed_shape_decoder_loss, {"main_layers": 1}),
]


def _model_and_config(loss_fn, settings: dict, fixed_shapes: bool):
    """A tiny model as the phase trains it (the decoder phase: the encoder and lower main blocks frozen), and
    the phase's config."""
    model = tiny_model(patch_size=4)
    cfg = TrainConfig(main_layers=settings.get("main_layers", 0), fixed_shapes=fixed_shapes)
    if loss_fn is decoder_loss:
        set_trainable(model, DECODER, cfg)
        set_train_mode(model, DECODER, cfg)
    else:
        model.train()
        model.encoder.recompute = model.main.recompute = settings["recompute"]
    return model, cfg


def _loss_and_grads(model, loss_fn, x, cfg):
    model.zero_grad()
    loss, metrics = loss_fn(model, x, cfg)
    loss.backward()
    return loss.detach(), metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(result, expected):
    (loss, metrics, grads), (loss_e, metrics_e, grads_e) = result, expected
    torch.testing.assert_close(loss, loss_e, rtol=1e-6, atol=1e-6)
    assert list(metrics) == list(metrics_e) == ["loss", "bits_per_byte"]
    torch.testing.assert_close(metrics, metrics_e, rtol=1e-6, atol=1e-6)
    assert grads_e and set(grads) == set(grads_e)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,loss_fn,fixed_fn,settings", CASES, ids=[case[0] for case in CASES])
def test_fixed_shapes_give_the_same_loss_metrics_and_gradients(name, loss_fn, fixed_fn, settings):
    """Every patch row encoded (the repeats masked as zero patches) instead of the distinct ones: the same
    loss, metrics and gradients. The decoder phase trains the main model only where it is asked to."""
    model, cfg = _model_and_config(loss_fn, settings, fixed_shapes=False)
    _, fixed = _model_and_config(loss_fn, settings, fixed_shapes=True)
    x = random_bytes(4, 64) % 3  # many repeated patches
    assert torch.unique(x.view(-1, 4), dim=0).shape[0] < 48  # of 64
    expected = _loss_and_grads(model, loss_fn, x, cfg)
    _assert_same(_loss_and_grads(model, loss_fn, x, fixed), expected)
    if loss_fn is decoder_loss:
        assert any(n.startswith("main.") for n in expected[2]) == bool(settings["main_layers"])


@pytest.mark.parametrize("name,loss_fn,fixed_fn,settings", CASES, ids=[case[0] for case in CASES])
def test_the_loss_with_fixed_shapes_compiles_whole_as_eager(name, loss_fn, fixed_fn, settings):
    """torch.compile traces the loss with fixed shapes as one graph (fullgraph: no break; the decoder phase's
    frozen stacks run inside it without autograd), with eager's loss, metrics and gradients, and a second step
    with new bytes runs the same graph. (aot_eager: torch.compile's tracing and autograd, on the CPU.)"""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(fixed_fn, backend="aot_eager", fullgraph=True, dynamic=False)
    model, cfg = _model_and_config(loss_fn, settings, fixed_shapes=True)
    for step in range(2):
        x = random_bytes(4, 64, seed=step) % 4  # some repeated patches
        _assert_same(_loss_and_grads(model, compiled, x, cfg), _loss_and_grads(model, fixed_fn, x, cfg))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
