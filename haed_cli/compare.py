"""`haed compare`: argument parsing and printing only (the work is in haed/compare.py); commands.py
registers it beside evaluate, generate and quickstart."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.table import Table

from haed_cli.common import TrainingDisplay, console
from haed_cli.training import DEVICE_PANEL, RECIPE, RECIPE_HELP, Dataset, Device, Overrides, SeqLen, recipe_values

SYSTEMS, SCORING = "Systems and budget", "Scoring and output"  # compare's help panels


Recipe = Annotated[str, typer.Option("--recipe", "-r", metavar="NAME|FILE", help=RECIPE_HELP, rich_help_panel=RECIPE)]
Budget = Annotated[
    float,
    typer.Option(
        "--time-budget",
        "--budget",
        metavar="SECONDS",
        help="Seconds of training for each system (IEM + decoder phase together get the same).",
        rich_help_panel=SYSTEMS,
    ),
]
Out = Annotated[
    Path,
    typer.Option(
        "--out",
        "-o",
        metavar="DIR",
        help="Where the runs, compare.json and compare.png go.",
        rich_help_panel=SCORING,
    ),
]
Systems = Annotated[
    Optional[str],
    typer.Option(
        help="Comma-separated: iem (IEM + decoder phase), full, flat, megabyte (MEGABYTE-pytorch, the peer) "
        "\\[default: all; megabyte where its package is installed].",
        metavar="LIST",
        show_default=False,
        rich_help_panel=SYSTEMS,
    ),
]
DecoderFraction = Annotated[
    Optional[float],
    typer.Option(
        metavar="FRACTION",
        help="Share of the IEM system's budget given to the decoder phase (default: the recipe's "
        "compare.decoder_fraction).",
        rich_help_panel=SYSTEMS,
    ),
]
Evals = Annotated[
    int,
    typer.Option(
        metavar="N",
        help="Validation points per phase (evenly spaced in training seconds).",
        rich_help_panel=SCORING,
    ),
]
EvalData = Annotated[
    List[Path],
    typer.Option(
        "--eval-data",
        metavar="PATH",
        help="Also score this file or dataset directory (repeatable).",
        rich_help_panel=SCORING,
    ),
]
EvalBytes = Annotated[
    Optional[int],
    typer.Option(metavar="N", help="Score only the first N bytes of each test split or file.", rich_help_panel=SCORING),
]
FlatOverrides = Annotated[
    List[str],
    typer.Option(
        "--flat-set",
        metavar="FIELD=VALUE",
        help="Override the flat baseline's recipe, e.g. --flat-set main.layers=6 (default: depth matched to the "
        "hierarchy's parameter count).",
        rich_help_panel=SYSTEMS,
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile/--no-compile",
        help="torch.compile the stacks and IEM's softmax (CUDA) for every system, before its clock starts.",
        rich_help_panel=DEVICE_PANEL,
    ),
]
MemoryCap = Annotated[
    Optional[float],
    typer.Option(
        "--memory-cap",
        help="Train every system under this cap on GPU memory, enforced, each at the fastest micro-batch "
        "(same global batch), recomputation and IEM softmax chunk of its own that fits, probed before the clock "
        "starts.",
        metavar="GIB",
        show_default=False,
        rich_help_panel=SYSTEMS,
    ),
]
Merge = Annotated[
    List[Path],
    typer.Option(
        "--merge",
        metavar="FILE",
        help="Add the rows of an earlier compare.json (other systems of the same comparison, run in another job) "
        "to the table, JSON and plot (repeatable; its recipe, data, budget, cap and GPU must match).",
        rich_help_panel=SCORING,
    ),
]


def compare(
    recipe: Recipe = "tiny",
    dataset: Dataset = None,
    budget: Budget = ...,
    out: Out = Path("runs/compare"),
    systems: Systems = None,
    decoder_fraction: DecoderFraction = None,
    evals: Evals = 10,
    eval_data: EvalData = [],
    eval_bytes: EvalBytes = None,
    seq_len: SeqLen = None,
    overrides: Overrides = [],
    flat_overrides: FlatOverrides = [],
    device: Device = "auto",
    compile: Compile = False,
    memory_cap: MemoryCap = None,
    merge: Merge = [],
):
    """Which objective should I train? IEM + decoder phase, full, flat and MEGABYTE-pytorch for the same seconds.

    Every system trains for the same seconds on the same device and is scored by exact test bits per byte.

    Example: haed compare --recipe tiny --dataset data/stdlib --time-budget 120 --out runs/compare
    """
    from haed.compare import compare as run_compare
    from haed.runs import recipe_for_run

    r = recipe_for_run(None, recipe, overrides, recipe_values(dataset, None, None, seq_len, None, "iem"))
    with TrainingDisplay() as display:
        result = run_compare(
            r,
            out,
            budget,
            systems=tuple(s.strip() for s in systems.split(",") if s.strip()) if systems is not None else None,
            decoder_fraction=decoder_fraction,
            evals=evals,
            flat_overrides=flat_overrides,
            eval_data=eval_data,
            eval_bytes=eval_bytes,
            device=device,
            compile=compile,
            memory_cap_gib=memory_cap,
            merge=merge,
            on_event=display,
        )
    console.print(compare_table(result))
    if result["iem_vs_full"] is not None:
        console.print(f"IEM + decoder phase / full: {result['iem_vs_full']:.3f}")
    if result["best_haed_vs_megabyte"] is not None:
        console.print(f"best haed system / MEGABYTE-pytorch: {result['best_haed_vs_megabyte']:.3f}")
    console.print(f"written: {Path(out) / 'compare.json'}, {Path(out) / 'compare.png'} ({result['windowing']})")


def compare_table(result: dict) -> Table:
    """`haed compare`'s table: per system its size, seconds, steps and speed, what it ran at (micro-batch x
    accumulation, recomputation: what a memory cap chose; how it was compiled), its peak GPU memory and its
    scores."""
    from haed.compare_report import describe_configuration, describe_phase_ends, describe_phases

    cap = result.get("memory_cap_gib")
    title = (
        f"{result['recipe']}: {result['budget_seconds']:g} s of training each, {result.get('gpu') or result['device']}"
    )
    table = Table(title=title + (f", under a {cap:g} GiB cap" if cap else ""))
    columns = (
        "system",
        "parameters",
        "train s",
        "steps, training MB/s",
        "micro-batch x accum, recompute, compiled",
        "peak GiB",
        "valid at phase ends",
        f"test {result['unit']}",
    )
    for column in (*columns, *result["rows"][0]["other_data"]):
        table.add_column(column, justify="left" if column == "system" else "right")
    for row in result["rows"]:
        table.add_row(
            row["label"],
            f"{row['parameters'] / 1e6:.2f}M",
            f"{row['train_seconds']:.1f}",
            describe_phases(row),
            describe_configuration(row),
            f"{row['peak_memory_gib']:.2f}" if row.get("peak_memory_gib") else "-",
            describe_phase_ends(row),
            f"{row['test_bits_per_byte']:.4f}",
            *(f"{v:.4f}" for v in row["other_data"].values()),
        )
    return table
