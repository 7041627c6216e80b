"""The whole pipeline in one call: prepare, IEM, decoder phase, exact evaluation, a sample.

`haed quickstart` runs it on the offline default corpus (the Python standard library's sources)
with the `tiny` recipe, so a first run needs no download and no GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from haed.data import is_haed_dataset
from haed.distributed import refuse_under_torchrun
from haed.evaluate import evaluate_run
from haed.generate import Generation, generate, load_for_sampling
from haed.objectives import DECODER, IEM
from haed.prepare import prepare_stdlib
from haed.recipe import Recipe, load_recipe
from haed.train import finish_phase


@dataclass
class PipelineResult:
    dataset: Path
    run_dir: Path
    evaluation: dict
    sample: Generation


def quickstart(
    workdir: Path = Path("."),
    recipe: Recipe | str = "tiny",
    overrides: list[str] | None = None,
    prompt: bytes = b"def ",
    device: str = "auto",
    console=None,
    on_event=None,
) -> PipelineResult:
    """Prepare the stdlib corpus (unless present), train IEM then the decoder, evaluate test, sample.

    Paths are `workdir/data/stdlib` and `workdir/runs/<recipe>`; finished steps are not redone, so
    the call can be repeated after an interruption (training resumes from its last checkpoint).
    `on_event` receives the trainer's progress events (see `haed.train.train`).
    """
    refuse_under_torchrun("haed quickstart")
    workdir = Path(workdir)
    say = console.print if console is not None else (lambda *a, **k: None)
    if isinstance(recipe, str):
        recipe = load_recipe(recipe, overrides)
    dataset = workdir / "data" / "stdlib"
    recipe.data.dataset = str(dataset)
    if is_haed_dataset(dataset):
        say(f"[bold]1/5 prepare[/]: {dataset} is already there")
    else:
        say(f"[bold]1/5 prepare[/]: the Python standard library's sources into {dataset}")
        prepare_stdlib(dataset)

    run_dir = workdir / "runs" / recipe.name
    for number, objective, init_from in ((2, IEM, None), (3, DECODER, run_dir)):
        out = run_dir / objective.subfolder  # the decoder phase inside the IEM run
        cfg = getattr(recipe, objective.section)
        length = f"{cfg.time_budget:g} s" if cfg.time_budget else f"{cfg.steps} steps"
        say(f"[bold]{number}/5 {objective.name}[/]: {length} into {out}")
        if finish_phase(recipe, objective, out, init_from=init_from, device=device, on_event=on_event) is None:
            say(f"{out} already finished")

    say("[bold]4/5 evaluate[/]: exact bits per byte of the test split")
    evaluation = evaluate_run(run_dir, "test", device=device)
    say("[bold]5/5 generate[/]: a sample with the cached hierarchical sampler")
    model, recipe_run, _, _ = load_for_sampling(run_dir, device)
    g = recipe_run.generate
    sample = generate(model, prompt, g.max_bytes, g.temperature, g.top_k, g.top_p, g.seed, recipe_run.data.seq_len)
    return PipelineResult(dataset=dataset, run_dir=run_dir, evaluation=evaluation, sample=sample)
