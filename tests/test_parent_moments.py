"""`decoder.carry_moments`: the decoder phase's AdamW starts from the IEM phase's moments of the parameters
it trains, each matched to its parameter (checked against torch's own loading of the IEM optimizer)."""

import shutil

import pytest
import torch
from _tiny import make_text_dataset

from haed.checkpoint import latest_checkpoint, load_optimizer_state
from haed.errors import HaedError
from haed.model import build_model
from haed.objectives import DECODER, IEM
from haed.parent_moments import carry_parent_moments, raise_second_moments
from haed.recipe import debug_recipe
from haed.runs import read_metrics
from haed.steps import make_optimizer, set_trainable
from haed.train import train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_text_dataset(tmp_path_factory.mktemp("data") / "words")


def _iem_run(recipe, run_dir):
    recipe.iem.steps, recipe.iem.ckpt_every = 4, 100
    train(recipe, "iem", run_dir)
    return run_dir


def _iem_moments(recipe, run_dir):
    """The IEM run's last moments per parameter name, as torch itself maps its optimizer.pt."""
    model = build_model(recipe.model)
    optimizer = make_optimizer(set_trainable(model, IEM, recipe.iem), recipe.iem, CPU)
    optimizer.load_state_dict(load_optimizer_state(latest_checkpoint(run_dir), CPU))
    return model, {n: optimizer.state[p] for n, p in model.named_parameters() if p in optimizer.state}


@pytest.mark.parametrize("main_layers", [0, 1])
def test_the_decoder_phase_starts_from_the_iem_phases_moments(dataset, tmp_path, main_layers):
    recipe = debug_recipe(str(dataset))
    recipe.iem.byte_loss_fraction = 0.25  # the byte loss trains the decoder in the IEM phase: it has moments
    recipe.decoder.main_layers = main_layers
    run = _iem_run(recipe, tmp_path / "iem")
    _, expected = _iem_moments(recipe, run)

    model = build_model(recipe.model)
    params = set_trainable(model, DECODER, recipe.decoder)
    optimizer = make_optimizer(params, recipe.decoder, CPU)
    checkpoint, carried, trained = carry_parent_moments(model, optimizer, run)
    assert checkpoint == latest_checkpoint(run) and carried == trained == len(params)
    names = {p: n for n, p in model.named_parameters()}
    assert any(names[p].startswith("main.blocks.") for p in params) == bool(main_layers)
    for p in params:
        state = optimizer.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], expected[names[p]][key]), names[p]
            assert state[key].shape == p.shape
        assert float(state["step"]) == float(expected[names[p]]["step"]) == 4


def test_without_a_byte_loss_the_decoder_starts_at_zero_moments(dataset, tmp_path):
    recipe = debug_recipe(str(dataset))
    recipe.iem.byte_loss_fraction = 0.0
    recipe.decoder.main_layers = 1
    run = _iem_run(recipe, tmp_path / "iem")
    model = build_model(recipe.model)
    params = set_trainable(model, DECODER, recipe.decoder)
    optimizer = make_optimizer(params, recipe.decoder, CPU)
    _, carried, trained = carry_parent_moments(model, optimizer, run)
    names = {p: n for n, p in model.named_parameters()}
    with_moments = {names[p] for p in optimizer.state}
    assert carried == len(with_moments) < trained
    assert with_moments and all(n.startswith(("main.blocks.", "main.norm.")) for n in with_moments)


def test_raised_second_moments_bound_the_first_update_by_the_rate():
    """A carried second moment below its gradient's mean square (bias-corrected) is scaled up to it, tensor
    by tensor; one at or above it, or one never trained (zero), is left alone. Adam's first update is
    then within about `lr` per element instead of several times it."""
    small, large, fresh = (torch.nn.Parameter(torch.zeros(50)) for _ in range(3))
    optimizer = torch.optim.AdamW([small, large, fresh], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.randn(50, generator=torch.Generator().manual_seed(0))
    for p, v_rms in ((small, 0.1), (large, 3.0)):  # carried: 100 steps at these gradient sizes
        optimizer.state[p] = {
            "step": torch.tensor(100.0),
            "exp_avg": torch.zeros(50),
            "exp_avg_sq": torch.full((50,), v_rms**2 * (1 - 0.95**100)),
        }
    optimizer.state[fresh] = {"step": torch.tensor(100.0), "exp_avg": torch.zeros(50), "exp_avg_sq": torch.zeros(50)}
    for p in (small, large, fresh):
        p.grad = g.clone()
    before = {p: optimizer.state[p]["exp_avg_sq"].clone() for p in (small, large, fresh)}
    factors = raise_second_moments(optimizer)
    assert factors == pytest.approx([g.pow(2).mean().sqrt().item() / 0.1])  # only `small` was raised
    corrected = optimizer.state[small]["exp_avg_sq"].mean() / (1 - 0.95**100)
    assert corrected.item() == pytest.approx(g.pow(2).mean().item(), rel=1e-5)
    assert torch.equal(optimizer.state[large]["exp_avg_sq"], before[large])
    assert torch.equal(optimizer.state[fresh]["exp_avg_sq"], before[fresh])
    optimizer.step()
    assert small.detach().abs().pow(2).mean().sqrt() < 1.1e-3  # about lr; unraised, it would be about 10x


def test_a_decoder_phase_with_carried_moments_trains_and_says_so(dataset, tmp_path):
    recipe = debug_recipe(str(dataset))
    recipe.iem.byte_loss_fraction = 0.25
    recipe.decoder.carry_moments, recipe.decoder.warmup_steps = True, 0
    run = _iem_run(recipe, tmp_path / "iem")
    said = []
    recipe.decoder.match_moments = True
    matched = train(
        recipe, "decoder", run / "matched", init_from=run, on_event=lambda e: said.append(e.get("text") or "")
    )
    assert matched.step == recipe.decoder.steps
    raised = [i for i, t in enumerate(said) if "raised the carried second moments of" in t]
    started = [i for i, t in enumerate(said) if "AdamW starts from the moments in" in t]
    assert len(raised) == 1 and started < raised  # once, at the first step (the byte loss's clipped share)
    recipe.decoder.match_moments = False
    said = []
    result = train(
        recipe, "decoder", run / "decoder", init_from=run, on_event=lambda e: said.append(e.get("text") or "")
    )
    assert result.step == recipe.decoder.steps
    assert any("AdamW starts from the moments in" in t and "step-000004" in t for t in said), said
    losses = [r["loss"] for r in read_metrics(run / "decoder" / "metrics.jsonl") if r["split"] == "train"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_carry_moments_is_refused_where_it_cannot_be_done(dataset, tmp_path):
    recipe = debug_recipe(str(dataset))
    recipe.iem.carry_moments = True
    with pytest.raises(HaedError, match="iem.carry_moments: only a phase that starts from another run"):
        recipe.validate()
    recipe.iem.carry_moments = False
    recipe.decoder.match_moments = True
    with pytest.raises(
        HaedError, match="decoder.match_moments adjusts carried moments: it needs decoder.carry_moments"
    ):
        recipe.validate()
    recipe.decoder.match_moments = False
    run = _iem_run(recipe, tmp_path / "iem")
    for step in run.glob("step-*"):  # only best/ left: no optimizer state to carry
        shutil.rmtree(step)
    recipe.decoder.carry_moments = True
    with pytest.raises(HaedError, match="keeps no step checkpoint with an optimizer state"):
        train(recipe, "decoder", run / "decoder", init_from=run)
    assert not (run / "decoder").exists()
