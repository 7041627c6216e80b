"""The trainer: exact resume, the decoder phase's frozen weights, checkpoints that load without code."""

import json

import pytest
import torch
from _tiny import make_text_dataset
from safetensors.torch import load_file

from haed.checkpoint import latest_checkpoint
from haed.errors import HaedError
from haed.model import build_model
from haed.recipe import debug_recipe
from haed.runs import load_run, read_metrics
from haed.steps import lr_at
from haed.train import train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_text_dataset(tmp_path_factory.mktemp("data") / "words")


@pytest.mark.parametrize("objective", ["iem", "full", "flat"])
def test_resume_continues_exactly(dataset, tmp_path, objective):
    recipe = debug_recipe(str(dataset), arch="flat" if objective == "flat" else "haed")
    cfg = recipe.full if objective == "flat" else getattr(recipe, objective)
    cfg.steps, cfg.ckpt_every, cfg.grad_accum = 6, 100, 2
    recipe.model.main.dropout = 0.1  # resume must also restore the dropout generator
    straight = train(recipe, objective, tmp_path / "straight")
    half = train(recipe, objective, tmp_path / "resumed", stop_after=3)
    assert half.step == 3
    resumed = train(recipe, objective, tmp_path / "resumed", resume=True)
    assert resumed.step == straight.step == 6
    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "resumed") / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name

    def losses(run):
        return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]

    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


def test_seeded_runs_are_reproducible_and_seed_matters(dataset, tmp_path):
    recipe = debug_recipe(str(dataset))
    train(recipe, "iem", tmp_path / "a")
    train(recipe, "iem", tmp_path / "b")
    recipe.iem.seed = 1
    train(recipe, "iem", tmp_path / "c")
    w = {k: load_file(str(latest_checkpoint(tmp_path / k) / "model.safetensors")) for k in "abc"}
    assert all(torch.equal(w["a"][n], w["b"][n]) for n in w["a"])
    assert not all(torch.equal(w["a"][n], w["c"][n]) for n in w["a"])


def test_decoder_phase_leaves_encoder_and_main_bit_identical(dataset, tmp_path):
    recipe = debug_recipe(str(dataset))
    train(recipe, "iem", tmp_path / "iem")
    train(recipe, "decoder", tmp_path / "iem" / "decoder", init_from=tmp_path / "iem")
    before = load_file(str(latest_checkpoint(tmp_path / "iem") / "model.safetensors"))
    after = load_file(str(latest_checkpoint(tmp_path / "iem" / "decoder") / "model.safetensors"))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("decoder.") for n in changed), changed
    assert any(n.startswith("decoder.") for n in changed)
    # IEM never trained the decoder: in the IEM run it is still at its seeded initialisation.
    torch.manual_seed(recipe.iem.seed)
    fresh = build_model(recipe.model).state_dict()
    assert all(torch.equal(before[n], fresh[n]) for n in before if n.startswith("decoder."))
    assert not all(torch.equal(before[n], fresh[n]) for n in before if n.startswith("main."))
    model, _, config = load_run(tmp_path / "iem" / "decoder")
    assert config["objective"] == "decoder" and config["parent_run"].endswith("iem")


def test_run_directory_layout_and_refusals(dataset, tmp_path):
    recipe = debug_recipe(str(dataset))
    train(recipe, "iem", tmp_path / "run")
    run = tmp_path / "run"
    step = latest_checkpoint(run)
    assert step.name == "step-000004"
    assert {p.name for p in step.iterdir()} == {
        "model.safetensors",
        "optimizer.pt",
        "rng.pt",
        "state.json",
        "config.json",
        "manifest.json",
    }
    assert json.loads((step / "state.json").read_text())["step"] == 4
    recipe.iem.compile = True  # asked for, but a CPU runs eager, and the run's config says so
    train(recipe, "iem", tmp_path / "cpu")
    assert json.loads((tmp_path / "cpu" / "config.json").read_text())["compiled"] is False
    torch.load(step / "optimizer.pt", weights_only=True)
    assert (run / "metrics.png").stat().st_size > 0
    records = read_metrics(run / "metrics.jsonl")
    assert {"train", "valid"} <= {r["split"] for r in records}
    assert all("patch_accuracy" in r for r in records)
    assert not list(run.glob(".*.tmp"))
    with pytest.raises(HaedError, match="already holds a run"):
        train(recipe, "iem", run)
    with pytest.raises(HaedError, match="trained with iem"):
        train(recipe, "full", run, resume=True)


def test_learning_rate_schedule():
    recipe = debug_recipe()
    cfg = recipe.iem
    cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio = 100, 10, 1.0, 0.1
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_training_reduces_loss(dataset, tmp_path):
    recipe = debug_recipe(str(dataset))
    recipe.full.steps, recipe.full.eval_every = 40, 0
    train(recipe, "full", tmp_path / "full")
    losses = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["split"] == "train"]
    assert losses[-1] < losses[0] - 1.0


def test_decoder_phase_runs_its_frozen_parts_as_at_inference(dataset, tmp_path, monkeypatch):
    """Dropout in the frozen encoder and main model would make h_t noisy: the trainer keeps them in eval
    mode through every step and after every validation, and trains the decoder in train mode."""
    import dataclasses

    from haed.objectives import OBJECTIVES

    recipe = debug_recipe(str(dataset))
    recipe.model.main.dropout = recipe.model.decoder.dropout = 0.3
    train(recipe, "iem", tmp_path / "iem")
    record, modes = OBJECTIVES["decoder"], []

    def watching(model, x, cfg, generator=None):
        modes.append((model.encoder.training, model.main.training, model.decoder.training))
        return record.loss(model, x, cfg, generator)

    monkeypatch.setitem(OBJECTIVES, "decoder", dataclasses.replace(record, loss=watching))
    train(recipe, "decoder", tmp_path / "iem" / "decoder", init_from=tmp_path / "iem")
    training_calls = [m for m in modes if m[2]]
    assert len(training_calls) == recipe.decoder.steps and set(training_calls) == {(False, False, True)}
    assert set(m for m in modes if not m[2]) == {(False, False, False)}  # validation: all in eval mode


@pytest.mark.parametrize("override", [None, False])
def test_compile_override_reaches_every_compiled_part(dataset, tmp_path, monkeypatch, override):
    """`compile=False` (haed compare's eager default) turns off the loss's own compiled parts as well (IEM's
    chunked softmax), so that an eager run pays no compilation inside its time budget."""
    import dataclasses

    from haed.objectives import OBJECTIVES

    record, seen = OBJECTIVES["iem"], []

    def recording(model, x, cfg, generator=None):
        seen.append(cfg.compile)
        return record.loss(model, x, cfg, generator)

    monkeypatch.setitem(OBJECTIVES, "iem", dataclasses.replace(record, loss=recording))
    recipe = debug_recipe(str(dataset))
    recipe.iem.steps, recipe.iem.compile = 2, True
    train(recipe, "iem", tmp_path / "run", compile=override)
    assert seen and set(seen) == {override is None}


@pytest.mark.parametrize("objective", ["iem", "full"])
def test_warm_up_changes_nothing_of_the_run(objective):
    """The warm-up pass before a time budget's clock starts (torch.compile compiles in it) leaves no trace:
    the next optimizer step (with dropout, which draws from the global generator) is bit for bit the one
    taken without it."""
    from haed.objectives import OBJECTIVES
    from haed.steps import make_optimizer, torch_generator, train_step, warm_up

    recipe = debug_recipe()
    recipe.model.main.dropout = recipe.model.decoder.dropout = 0.2
    cfg = getattr(recipe, objective)
    x = torch.randint(0, 256, (2, recipe.data.seq_len), dtype=torch.uint8)
    loss_fn, device = OBJECTIVES[objective], torch.device("cpu")
    after = []
    for warm in (False, True):
        torch.manual_seed(0)
        model = build_model(recipe.model).train()
        params = [p for p in model.parameters()]
        optimizer = make_optimizer(params, cfg, device)
        torch.manual_seed(1)
        if warm:
            assert warm_up(model, loss_fn, cfg, x, torch_generator(0, 0, 0), device) > 0
            assert all(p.grad is None for p in params)
        sums, _ = train_step(model, optimizer, params, loss_fn, cfg, [(x, torch_generator(0, 0, 0))], device)
        after.append((float(sums["loss"]), [p.detach().clone() for p in params]))
    assert after[0][0] == after[1][0]
    assert all(torch.equal(a, b) for a, b in zip(after[0][1], after[1][1]))


@pytest.mark.parametrize("objective", ["iem", "full"])
def test_a_step_of_two_equal_micro_batches_is_a_step_of_one(objective):
    """Gradient accumulation averages: a step over the same micro-batch twice (each loss and metric halved, then
    summed) takes the optimizer step and reports the metrics of a step over it once (which divides nothing),
    bit for bit."""
    from haed.objectives import OBJECTIVES
    from haed.steps import make_optimizer, torch_generator, train_step

    recipe = debug_recipe()
    cfg = getattr(recipe, objective)
    x = torch.randint(0, 256, (2, recipe.data.seq_len), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    loss_fn, device = OBJECTIVES[objective], torch.device("cpu")
    after = []
    for micro in (1, 2):
        torch.manual_seed(0)
        model = build_model(recipe.model).train()
        params = list(model.parameters())
        optimizer = make_optimizer(params, cfg, device)
        sums, grad_norm = train_step(
            model, optimizer, params, loss_fn, cfg, [(x, torch_generator(0, 0, 0)) for _ in range(micro)], device
        )
        after.append(({k: float(v) for k, v in sums.items()}, float(grad_norm), [p.detach().clone() for p in params]))
    (one, norm_one, weights_one), (two, norm_two, weights_two) = after
    assert one == two and norm_one == norm_two and set(one) >= {"loss"}
    assert all(torch.equal(a, b) for a, b in zip(weights_one, weights_two))


def test_decoder_phase_trains_the_main_models_top_blocks_when_asked(dataset, tmp_path, monkeypatch):
    """`decoder.main_layers = 1`: the decoder phase trains the decoder, the main model's last block and final
    norm (in train mode, so with dropout); the encoder and the lower blocks stay bit for bit the IEM run's
    and run in eval mode."""
    import dataclasses

    from haed.objectives import OBJECTIVES

    recipe = debug_recipe(str(dataset))
    recipe.model.main.dropout = 0.3
    recipe.decoder.main_layers = 1
    layers = recipe.model.main.layers
    top = f"main.blocks.{layers - 1}."
    train(recipe, "iem", tmp_path / "iem")
    record, modes = OBJECTIVES["decoder"], []

    def watching(model, x, cfg, generator=None):
        blocks = model.main.blocks
        modes.append((model.encoder.training, blocks[0].training, blocks[-1].training, model.decoder.training))
        return record.loss(model, x, cfg, generator)

    monkeypatch.setitem(OBJECTIVES, "decoder", dataclasses.replace(record, loss=watching))
    train(recipe, "decoder", tmp_path / "iem" / "decoder", init_from=tmp_path / "iem")
    before = load_file(str(latest_checkpoint(tmp_path / "iem") / "model.safetensors"))
    after = load_file(str(latest_checkpoint(tmp_path / "iem" / "decoder") / "model.safetensors"))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert all(n.startswith(("decoder.", top, "main.norm.")) for n in changed), changed
    assert any(n.startswith(top) for n in changed) and any(n.startswith("main.norm.") for n in changed)
    assert any(n.startswith("decoder.") for n in changed)
    assert {m for m in modes if m[3]} == {(False, False, True, True)}


def test_decoder_main_layers_is_checked_against_the_main_model():
    recipe = debug_recipe()
    recipe.decoder.main_layers = recipe.model.main.layers + 1
    with pytest.raises(HaedError, match="decoder.main_layers"):
        recipe.validate()
    recipe.decoder.main_layers, recipe.iem.main_layers = 0, 1
    with pytest.raises(HaedError, match="only the decoder phase"):
        recipe.validate()


def test_compile_mode_reaches_the_stacks_and_is_checked(monkeypatch):
    """A phase's `compile_mode` is torch.compile's mode for the main model, the decoder and the encoder ("default":
    torch's own default; the encoder's input length changes every IEM step, padded to a few recurring lengths);
    a mode torch.compile does not have is one line naming the ones it has."""
    import haed.steps
    from haed.recipe import load_recipe

    model, modes = build_model(debug_recipe().model), []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw.get("mode")))
    haed.steps.compile_stacks(model, "default")
    haed.steps.compile_stacks(model, "reduce-overhead")
    assert modes == [None] * 3 + ["reduce-overhead"] * 3  # main model, decoder, encoder
    assert "score_vectors" in vars(model)  # IEM's score too, as an instance attribute: no new weights
    assert set(model.state_dict()) == set(build_model(debug_recipe().model).state_dict())
    seen = []
    monkeypatch.setattr(haed.steps, "compile_stacks", lambda model, mode: seen.append(mode))
    haed.steps.maybe_compile(model, True, torch.device("cpu"), "reduce-overhead")  # compiled on CUDA only
    haed.steps.maybe_compile(model, True, torch.device("cuda"), "reduce-overhead")
    assert seen == ["reduce-overhead"]
    with pytest.raises(HaedError) as e:
        load_recipe("tiny", ["iem.compile_mode=fast"])
    assert str(e.value) == (
        "iem.compile_mode must be one of default, reduce-overhead, max-autotune-no-cudagraphs, not 'fast'"
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")
@pytest.mark.slow_gpu
@pytest.mark.parametrize(
    "objective,micro,fixed_shapes",
    [
        ("iem", 1, False),
        ("full", 1, False),
        ("iem", 2, False),
        ("iem", 1, True),
        ("iem", 2, True),
        ("full", 1, True),
        ("decoder", 1, False),
        ("decoder", 1, True),
    ],
)
def test_cuda_graph_steps_follow_the_default_compiled_steps(objective, micro, fixed_shapes):
    """The stacks as CUDA graphs (`compile_mode = "reduce-overhead"`) replay the kernels the default mode
    launches one by one: five training steps give the same losses, with one micro-batch per step or two (whose
    gradients accumulate across two graph replays). With `fixed_shapes` the whole loss (IEM's, full training's,
    the decoder phase's) is one graph, whose outputs the next replay overwrites: the steps' metrics, read after
    all five, must be copies. Passed on an H100 on 2026-12-07 (IEM and full training without `fixed_shapes`);
    atomic additions in the backward pass make two runs of one mode differ in the last bits."""
    from haed.objectives import OBJECTIVES
    from haed.steps import make_optimizer, maybe_compile, torch_generator, train_step

    device, losses, loss_fn = torch.device("cuda"), {}, OBJECTIVES[objective]
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        recipe = debug_recipe()
        cfg = getattr(recipe, loss_fn.section)
        cfg.compile, cfg.compile_mode, cfg.fixed_shapes = True, mode, fixed_shapes
        torch.manual_seed(0)
        model = build_model(recipe.model).to(device).train()
        params = list(model.parameters())
        optimizer = make_optimizer(params, cfg, device)
        maybe_compile(model, True, device, mode)
        gen = torch.Generator().manual_seed(0)
        steps = []
        for i in range(5):
            x = torch.randint(0, 256, (2, recipe.data.seq_len), dtype=torch.uint8, generator=gen).to(device)
            batches = [(part, torch_generator(0, i, m)) for m, part in enumerate(x.chunk(micro))]
            sums, _ = train_step(model, optimizer, params, loss_fn, cfg, batches, device)
            steps.append(sums["loss"])
        losses[mode] = [float(loss) for loss in steps]
    assert losses["reduce-overhead"] == pytest.approx(losses["default"], rel=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")
@pytest.mark.slow_gpu
def test_cuda_graph_runs_train_validate_resume_and_hand_over_like_the_default_mode(dataset, tmp_path):
    """`haed train` end to end with the stacks as CUDA graphs: an IEM phase stopped after 3 of 6 steps and
    resumed (validation and checkpoints between its steps, two micro-batches a step), then the decoder phase
    from it. Its training and validation losses follow a straight run in the default compiled mode (bf16
    autocast: two runs of one mode differ in the last bits, which grow over steps)."""
    runs = {}
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        recipe = debug_recipe(str(dataset))
        recipe.iem.steps, recipe.iem.grad_accum = 6, 2
        for cfg in (recipe.iem, recipe.decoder):
            cfg.compile, cfg.compile_mode = True, mode
        run = tmp_path / mode
        if mode == "default":
            train(recipe, "iem", run, device="cuda")
        else:
            assert train(recipe, "iem", run, device="cuda", stop_after=3).step == 3
            assert train(recipe, "iem", run, device="cuda", resume=True).step == 6
        train(recipe, "decoder", run / "decoder", init_from=run, device="cuda")
        runs[mode] = [
            (r["split"], r["step"], r["loss"])
            for path in (run / "metrics.jsonl", run / "decoder" / "metrics.jsonl")
            for r in read_metrics(path)
            if r["split"] in ("train", "valid")
        ]
    default, graphs = runs["default"], runs["reduce-overhead"]
    assert [row[:2] for row in graphs] == [row[:2] for row in default]
    assert [row[2] for row in graphs] == pytest.approx([row[2] for row in default], rel=1e-2)
