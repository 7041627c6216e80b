"""`haed compare`: argument parsing and printing only (the work is in haed/compare.py); commands.py
registers it beside evaluate, generate and quickstart."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from haed_cli.common import TrainingDisplay, console
from haed_cli.training import DEVICE, DEVICE_PANEL, RECIPE, RECIPE_HELP, SET_HELP, dataset_option, recipe_values

SYSTEMS, SCORING = "Systems and budget", "Scoring and output"  # compare's help panels


def compare(
    recipe: str = typer.Option("tiny", "--recipe", "-r", metavar="NAME|FILE", help=RECIPE_HELP, rich_help_panel=RECIPE),
    dataset: Optional[Path] = dataset_option(),
    budget: float = typer.Option(
        ...,
        "--time-budget",
        "--budget",
        metavar="SECONDS",
        help="Seconds of training for each system (IEM + decoder phase together get the same).",
        rich_help_panel=SYSTEMS,
    ),
    out: Path = typer.Option(
        Path("runs/compare"),
        "--out",
        "-o",
        metavar="DIR",
        help="Where the runs, compare.json and compare.png go.",
        rich_help_panel=SCORING,
    ),
    systems: Optional[str] = typer.Option(
        None,
        help="Comma-separated: iem (IEM + decoder phase), full, flat, megabyte (MEGABYTE-pytorch, the peer) "
        "\\[default: all; megabyte where its package is installed].",
        metavar="LIST",
        show_default=False,
        rich_help_panel=SYSTEMS,
    ),
    decoder_fraction: Optional[float] = typer.Option(
        None,
        metavar="FRACTION",
        help="Share of the IEM system's budget given to the decoder phase (default: the recipe's "
        "compare.decoder_fraction).",
        rich_help_panel=SYSTEMS,
    ),
    evals: int = typer.Option(
        10,
        metavar="N",
        help="Validation points per phase (evenly spaced in training seconds).",
        rich_help_panel=SCORING,
    ),
    eval_data: List[Path] = typer.Option(
        [],
        "--eval-data",
        metavar="PATH",
        help="Also score this file or dataset directory (repeatable).",
        rich_help_panel=SCORING,
    ),
    eval_bytes: Optional[int] = typer.Option(
        None, metavar="N", help="Score only the first N bytes of each test split or file.", rich_help_panel=SCORING
    ),
    seq_len: Optional[int] = typer.Option(
        None, metavar="BYTES", help="Window length in bytes (overrides the recipe).", rich_help_panel=RECIPE
    ),
    overrides: List[str] = typer.Option([], "--set", metavar="FIELD=VALUE", help=SET_HELP, rich_help_panel=RECIPE),
    flat_overrides: List[str] = typer.Option(
        [],
        "--flat-set",
        metavar="FIELD=VALUE",
        help="Override the flat baseline's recipe, e.g. --flat-set main.layers=6 (default: depth matched to the "
        "hierarchy's parameter count).",
        rich_help_panel=SYSTEMS,
    ),
    device: str = typer.Option("auto", metavar=DEVICE, help="auto, cpu or cuda.", rich_help_panel=DEVICE_PANEL),
    compile: bool = typer.Option(
        False,
        "--compile/--no-compile",
        help="torch.compile the stacks and IEM's softmax (CUDA) for every system, before its clock starts.",
        rich_help_panel=DEVICE_PANEL,
    ),
    memory_cap: Optional[float] = typer.Option(
        None,
        "--memory-cap",
        help="Train every system under this cap on GPU memory, enforced, each at the fastest micro-batch "
        "(same global batch), recomputation and IEM softmax chunk of its own that fits, probed before the clock "
        "starts.",
        metavar="GIB",
        show_default=False,
        rich_help_panel=SYSTEMS,
    ),
    merge: List[Path] = typer.Option(
        [],
        "--merge",
        metavar="FILE",
        help="Add the rows of an earlier compare.json (other systems of the same comparison, run in another job) "
        "to the table, JSON and plot (repeatable; its recipe, data, budget, cap and GPU must match).",
        rich_help_panel=SCORING,
    ),
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
