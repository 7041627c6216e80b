"""The training commands (train-iem, train-full, train-decoder): argument parsing and printing only; and the
recipe options that `haed compare` shares with them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from haed.errors import stop_exit_status
from haed.recipe import builtin_recipes
from haed_cli.common import Command, TrainingDisplay, console, user_errors

RECIPE_HELP = f"Recipe name ({', '.join(builtin_recipes())}) or path to a .toml file."
SET_HELP = "Override any recipe field, e.g. --set main.layers=8 --set iem.lr=3e-4 (repeatable)."
DEVICE = "auto|cpu|cuda"
RECIPE, RUN, DEVICE_PANEL = "Recipe and data", "Run directory", "Device"  # help panels


# `--dataset DIR`, as every training command and `haed compare` take it
Dataset = Annotated[
    Optional[Path],
    typer.Option(
        "--dataset",
        "-d",
        metavar="DIR",
        help="Dataset directory (default: the recipe's data.dataset).",
        rich_help_panel=RECIPE,
    ),
]


def recipe_values(
    dataset: Optional[Path],
    steps: Optional[int],
    batch_size: Optional[int],
    seq_len: Optional[int],
    time_budget: Optional[float],
    section: str,
) -> dict:
    """The typed recipe options given, as {"key.path": value}: set as values, never re-parsed, so any path works."""
    values = {
        "data.dataset": None if dataset is None else str(dataset),
        "data.seq_len": seq_len,
        f"{section}.steps": steps,
        f"{section}.batch_size": batch_size,
        f"{section}.time_budget": time_budget,
    }
    return {key: value for key, value in values.items() if value is not None}


def _print_train_result(result, objective: str) -> None:
    m = result.last_metrics
    line = (
        f"[green]done[/] {objective}: step {result.step}, {result.train_seconds:.1f} s of training, "
        f"run {result.run_dir}"
    )
    if m:
        line += f", train loss {m.get('loss', float('nan')):.4f}, {m.get('bytes_per_second', 0) / 1e3:.1f} kB/s"
    console.print(line)
    if result.last_eval:
        console.print(
            "valid: "
            + ", ".join(
                f"{k} {v:.4f}"
                for k, v in result.last_eval.items()
                if k not in ("step", "split", "candidates", "train_seconds")
            )
        )
    if result.best:
        console.print(
            f"best: {result.best['metric']} {result.best['value']:.4f} at step {result.best['step']} "
            f"({result.best['path']})"
        )


def _train(
    objective: str,
    recipe_name: Optional[str],
    overrides: list[str],
    values: dict,
    out: Optional[Path],
    resume: bool,
    allow_changes: bool,
    device: str,
    compile: Optional[bool],
    init_from=None,
    recipe=None,
    wait_for_parent: bool = False,
):
    from haed.train import train_command

    with TrainingDisplay() as display:
        result = train_command(
            objective,
            out,
            recipe_name=recipe_name,
            overrides=overrides,
            values=values,
            recipe=recipe,
            resume=resume,
            allow_changes=allow_changes,
            device=device,
            init_from=init_from,
            compile=compile,
            on_event=display,
            wait_for_parent=wait_for_parent,
        )
    _print_train_result(result, objective)
    if result.interrupted:
        raise typer.Exit(stop_exit_status(result.interrupted))
    return result


RESUME_HELP = (
    "Continue the run in --out from its newest intact checkpoint, with the run's own recipe, dataset and "
    "seed (recipe options that differ are refused unless --allow-changes)."
)
ALLOW_HELP = "With --resume: accept recipe options that differ from the run's (e.g. a longer --time-budget)."
COMPILE_HELP = "torch.compile the {part} on CUDA, or not (default: the recipe's compile)."
BUDGET_HELP = (
    "Seconds of training (validation, checkpoints and compilation not counted): the schedule runs over the budget and "
    "the run ends when it is spent."
)


Recipe = Annotated[
    Optional[str],
    typer.Option("--recipe", "-r", metavar="NAME|FILE", help=RECIPE_HELP + " Default: tiny.", rich_help_panel=RECIPE),
]
Out = Annotated[
    Optional[Path],
    typer.Option(
        "--out", "-o", metavar="DIR", help="Run directory (default: runs/RECIPE-OBJECTIVE).", rich_help_panel=RUN
    ),
]
Objective = Annotated[
    str,
    typer.Option(
        "--objective",
        metavar="iem|full",
        help="iem (default), or full: end-to-end byte cross-entropy (same as train-full).",
        rich_help_panel=RECIPE,
    ),
]
Steps = Annotated[
    Optional[int], typer.Option(metavar="N", help="Optimizer steps (overrides the recipe).", rich_help_panel=RECIPE)
]
TimeBudget = Annotated[
    Optional[float], typer.Option("--time-budget", metavar="SECONDS", help=BUDGET_HELP, rich_help_panel=RECIPE)
]
BatchSize = Annotated[
    Optional[int],
    typer.Option(metavar="N", help="Windows per micro-batch (overrides the recipe).", rich_help_panel=RECIPE),
]
SeqLen = Annotated[
    Optional[int],
    typer.Option(metavar="BYTES", help="Window length in bytes (overrides the recipe).", rich_help_panel=RECIPE),
]
Overrides = Annotated[List[str], typer.Option("--set", metavar="FIELD=VALUE", help=SET_HELP, rich_help_panel=RECIPE)]
Resume = Annotated[bool, typer.Option("--resume/--no-resume", help=RESUME_HELP, rich_help_panel=RUN)]
AllowChanges = Annotated[bool, typer.Option("--allow-changes/--no-allow-changes", help=ALLOW_HELP, rich_help_panel=RUN)]
Device = Annotated[str, typer.Option(metavar=DEVICE, help="auto, cpu or cuda.", rich_help_panel=DEVICE_PANEL)]
Compile = Annotated[
    Optional[bool],
    typer.Option("--compile/--no-compile", help=COMPILE_HELP.format(part="model"), rich_help_panel=DEVICE_PANEL),
]


def train_iem(
    recipe: Recipe = None,
    dataset: Dataset = None,
    out: Out = None,
    objective: Objective = "iem",
    steps: Steps = None,
    time_budget: TimeBudget = None,
    batch_size: BatchSize = None,
    seq_len: SeqLen = None,
    overrides: Overrides = [],
    resume: Resume = False,
    allow_changes: AllowChanges = False,
    device: Device = "auto",
    compile: Compile = None,
):
    """Train the encoder and main model with IEM (sampled softmax over patches; no byte decoder).

    Example: haed train-iem --recipe tiny --dataset data/stdlib --out runs/tiny
    """
    if objective not in ("iem", "full"):
        raise typer.BadParameter("--objective is iem or full")
    values = recipe_values(dataset, steps, batch_size, seq_len, time_budget, objective)
    _train(objective, recipe, overrides, values, out, resume, allow_changes, device, compile)


TrainFullOut = Annotated[
    Optional[Path],
    typer.Option(
        "--out",
        "-o",
        metavar="DIR",
        help="Run directory (default: runs/RECIPE-full or runs/RECIPE-flat).",
        rich_help_panel=RUN,
    ),
]
Arch = Annotated[
    str,
    typer.Option(
        metavar="haed|flat",
        help="haed: the hierarchy end to end; flat: a byte-level transformer (the recipe's main stack over bytes).",
        rich_help_panel=RECIPE,
    ),
]
TrainFullSteps = Annotated[
    Optional[int],
    typer.Option(metavar="N", help="Optimizer steps (overrides the recipe's [full] section).", rich_help_panel=RECIPE),
]
TrainFullBatchSize = Annotated[
    Optional[int], typer.Option(metavar="N", help="Windows per micro-batch.", rich_help_panel=RECIPE)
]
TrainFullSeqLen = Annotated[
    Optional[int], typer.Option(metavar="BYTES", help="Window length in bytes.", rich_help_panel=RECIPE)
]


def train_full(
    recipe: Recipe = None,
    dataset: Dataset = None,
    out: TrainFullOut = None,
    arch: Arch = "haed",
    steps: TrainFullSteps = None,
    time_budget: TimeBudget = None,
    batch_size: TrainFullBatchSize = None,
    seq_len: TrainFullSeqLen = None,
    overrides: Overrides = [],
    resume: Resume = False,
    allow_changes: AllowChanges = False,
    device: Device = "auto",
    compile: Compile = None,
):
    """Baseline: train encoder, main model and decoder end to end on byte cross-entropy (or --arch flat).

    Example: haed train-full --recipe tiny --dataset data/stdlib --out runs/tiny-full
    """
    if arch not in ("haed", "flat"):
        raise typer.BadParameter("--arch is haed or flat")
    objective = "flat" if arch == "flat" else "full"
    values = recipe_values(dataset, steps, batch_size, seq_len, time_budget, "full")
    if not resume or recipe is not None or overrides or values:
        values["model.arch"] = arch
    _train(objective, recipe, overrides, values, out, resume, allow_changes, device, compile)


Run = Annotated[
    Path,
    typer.Option(
        "--run", metavar="DIR", help="The IEM run whose encoder and main model are frozen.", rich_help_panel=RUN
    ),
]
TrainDecoderOut = Annotated[
    Optional[Path],
    typer.Option("--out", "-o", metavar="DIR", help="Run directory (default: RUN/decoder).", rich_help_panel=RUN),
]
TrainDecoderSteps = Annotated[
    Optional[int],
    typer.Option(
        metavar="N", help="Optimizer steps (overrides the recipe's [decoder] section).", rich_help_panel=RECIPE
    ),
]
TrainDecoderOverrides = Annotated[
    List[str],
    typer.Option(
        "--set",
        metavar="FIELD=VALUE",
        help="Override decoder-phase fields, e.g. --set decoder.lr=3e-4.",
        rich_help_panel=RECIPE,
    ),
]
TrainDecoderCompile = Annotated[
    Optional[bool],
    typer.Option("--compile/--no-compile", help=COMPILE_HELP.format(part="decoder"), rich_help_panel=DEVICE_PANEL),
]
Wait = Annotated[
    bool,
    typer.Option(
        "--wait/--no-wait", help="If the IEM run is still training, wait for it to finish.", rich_help_panel=RUN
    ),
]


def train_decoder(
    run: Run = ...,
    out: TrainDecoderOut = None,
    steps: TrainDecoderSteps = None,
    time_budget: TimeBudget = None,
    batch_size: TrainFullBatchSize = None,
    overrides: TrainDecoderOverrides = [],
    resume: Resume = False,
    allow_changes: AllowChanges = False,
    device: Device = "auto",
    compile: TrainDecoderCompile = None,
    wait: Wait = False,
):
    """Decoder phase: freeze an IEM run's encoder and main model (its best checkpoint), train the byte decoder.

    Example: haed train-decoder --run runs/tiny
    """
    from haed.objectives import DECODER
    from haed.runs import decoder_phase_recipe

    values = recipe_values(None, steps, batch_size, None, time_budget, "decoder")
    recipe = None if resume and not (overrides or values) else decoder_phase_recipe(run, overrides, values)
    _train(
        "decoder",
        None,
        [],
        {},
        out or Path(run) / DECODER.subfolder,
        resume,
        allow_changes,
        device,
        compile,
        init_from=None if resume else run,
        recipe=recipe,
        wait_for_parent=wait,
    )


def register(app: typer.Typer) -> None:
    for name, fn in (("train-iem", train_iem), ("train-decoder", train_decoder), ("train-full", train_full)):
        app.command(name, cls=Command)(user_errors(fn))
