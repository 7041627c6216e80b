"""`haed profile-memory`: argument parsing and printing only (the work is in haed/profile/).

The lead registers it with `register(app)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.table import Table

from haed_cli.common import Command, TaskDisplay, console, user_errors
from haed_cli.training import RECIPE_HELP

SET_HELP = "Override any recipe field, e.g. --set main.layers=12 --set iem.num_negatives=8192 (repeatable)."
COMPARE = ("iem", "decoder", "full")


def parse_int_list(text: str, option: str) -> list[int]:
    from haed.errors import HaedError

    try:
        values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise HaedError(f"{option} expects comma-separated whole numbers, e.g. 2048,4096; got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise HaedError(f"{option} expects positive whole numbers, got {text!r}")
    return values


def choose_objectives(compare_full: bool, objectives: Optional[str]) -> list[str]:
    """--compare-full: iem, decoder, full (plus any other --objectives, e.g. flat); else --objectives or iem."""
    from haed.errors import HaedError
    from haed.objectives import OBJECTIVES

    given = [o.strip() for o in (objectives or "").split(",") if o.strip()]
    unknown = [o for o in given if o not in OBJECTIVES]
    if unknown:
        raise HaedError(f"unknown objective {unknown[0]!r}: --objectives takes {', '.join(OBJECTIVES)}")
    if compare_full:
        return list(dict.fromkeys([*COMPARE, *given]))
    return list(dict.fromkeys(given)) or ["iem"]


def _num(value, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def cells_table(result: dict, title: str | None = None) -> Table:
    """One row per cell: objective, seq, batch, peak memory, median step, bytes/s, candidates, TFLOP/s."""
    env = result.get("environment", {})
    measured = env.get("memory_measured", True)
    na = "n/m" if not measured else "-"
    where = env.get("gpu") or "CPU"
    table = Table(
        title=title
        or f"profile-memory: {result.get('recipe', {}).get('name', '')} on {where} "
        f"({env.get('dtype', '')}, {result.get('data', '')})"
    )
    table.add_column("objective", no_wrap=True)
    for name in (
        "seq",
        "batch",
        "peak alloc GiB",
        "peak reserved GiB",
        "median step ms",
        "bytes/s (M)",
        "candidates",
        "TFLOP/s",
        "% peak",
    ):
        table.add_column(name, justify="right")
    for c in result["cells"]:
        if c["status"] != "ok":
            table.add_row(
                c["objective"],
                f"{c['seq_len']:,}",
                str(c["batch_size"]),
                f"[red]{c['status']}[/]",
                "",
                "",
                "",
                "",
                "",
                "",
            )
            continue
        fraction = c.get("fraction_of_peak")
        table.add_row(
            c["objective"],
            f"{c['seq_len']:,}",
            str(c["batch_size"]),
            _num(c.get("peak_allocated_gib"), ".2f", na),
            _num(c.get("peak_reserved_gib"), ".2f", na),
            _num(c.get("median_step_ms"), ".1f"),
            _num(None if c.get("bytes_per_second") is None else c["bytes_per_second"] / 1e6, ".3f"),
            _num(c.get("candidates_mean"), ",.0f"),
            _num(c.get("achieved_tflops"), ".1f" if (c.get("achieved_tflops") or 0) >= 1 else ".2g"),
            _num(None if fraction is None else 100 * fraction, ".1f"),
        )
    return table


def ratios_table(result: dict) -> Table | None:
    ratios = result.get("ratios") or []
    if not ratios:
        return None
    table = Table(title="ratios (numerator / denominator, same seq and batch)")
    table.add_column("ratio", no_wrap=True)
    for name in ("seq", "batch", "peak alloc", "peak reserved", "bytes/s", "step time"):
        table.add_column(name, justify="right")
    for r in ratios:
        table.add_row(
            f"{r['numerator']} / {r['denominator']}",
            f"{r['seq_len']:,}",
            str(r["batch_size"]),
            _num(r.get("peak_allocated"), ".3f"),
            _num(r.get("peak_reserved"), ".3f"),
            _num(r.get("bytes_per_second"), ".2f"),
            _num(r.get("median_step_ms"), ".2f"),
        )
    return table


def print_profile(result: dict) -> None:
    console.print(cells_table(result))
    env = result.get("environment", {})
    if not env.get("memory_measured", True):
        console.print(f"[dim]memory {env.get('memory_note') or 'not measured'}[/]")
    table = ratios_table(result)
    if table is not None:
        console.print(table)
    for c in result["cells"]:
        if c["status"] == "error":
            console.print(
                f"[red]error[/] in {c['objective']} seq {c['seq_len']} batch {c['batch_size']}: {c['error']}",
                highlight=False,
            )
    from haed.profile import describe_max_context, describe_measured

    for entry in result.get("max_context") or []:
        console.print(describe_max_context(entry), highlight=False)
    console.print(describe_measured(result), highlight=False)


WHAT, HOW, CONTEXT, OUTPUT = "What to profile", "How", "Longest context", "Output"  # help panels


def _print_plan(plan, objectives: list[str]) -> None:
    """The sweep about to run, and which of its settings are defaults chosen for this device."""
    from haed.profile import describe_defaults

    console.print(
        f"[bold]profile-memory[/] of recipe [bold]{plan.recipe.name}[/] on {plan.device}: {', '.join(objectives)}; "
        f"seq {','.join(map(str, plan.seq_lens))}; batch {','.join(map(str, plan.batch_sizes))}; "
        f"{plan.warmup} warm-up + {plan.steps} timed steps per cell",
        highlight=False,
    )
    note = describe_defaults(plan.defaults)
    if note:
        console.print(note, highlight=False)


Recipe = Annotated[
    Optional[str],
    typer.Option(
        "--recipe",
        "-r",
        metavar="NAME|FILE",
        help=RECIPE_HELP + " Default: enwik8 on CUDA (the README's headline configuration), tiny with --device cpu.",
        rich_help_panel=WHAT,
    ),
]
CompareFull = Annotated[
    bool,
    typer.Option(
        "--compare-full/--no-compare-full",
        help="Profile iem, decoder and full (plus any --objectives, e.g. flat).",
        rich_help_panel=WHAT,
    ),
]
Objectives = Annotated[
    Optional[str],
    typer.Option(
        "--objectives",
        metavar="LIST",
        help="Comma-separated: iem, decoder, full, flat, megabyte (the MEGABYTE-pytorch peer) (default: iem).",
        rich_help_panel=WHAT,
    ),
]
SeqLens = Annotated[
    Optional[str],
    typer.Option(
        "--seq-lens",
        metavar="N,N,...",
        help="Comma-separated window lengths in bytes (default: 2048,4096,8192,16384).",
        rich_help_panel=WHAT,
    ),
]
BatchSizes = Annotated[
    Optional[str],
    typer.Option(
        "--batch-sizes",
        metavar="N,N,...",
        help="Comma-separated batch sizes (default: 16 on CUDA, 4,8,16 with --device cpu).",
        rich_help_panel=WHAT,
    ),
]
Steps = Annotated[
    Optional[int],
    typer.Option(
        "--steps",
        metavar="N",
        help="Timed optimizer steps per cell, the median reported (default: 20 on CUDA, 5 with --device cpu).",
        rich_help_panel=HOW,
    ),
]
Warmup = Annotated[
    Optional[int],
    typer.Option(
        "--warmup",
        metavar="N",
        help="Untimed optimizer steps per cell first, compiling there (default: 20 on CUDA, 2 with --device cpu).",
        rich_help_panel=HOW,
    ),
]
Dataset = Annotated[
    Optional[Path],
    typer.Option(
        "--dataset",
        "-d",
        metavar="DIR",
        help="Dataset directory whose train split gives the windows (default: the recipe's, if it exists; else "
        "synthetic random bytes, said so in the output and JSON).",
        rich_help_panel=WHAT,
    ),
]
Overrides = Annotated[List[str], typer.Option("--set", metavar="FIELD=VALUE", help=SET_HELP, rich_help_panel=WHAT)]
JsonOut = Annotated[
    Path,
    typer.Option(
        "--json",
        metavar="FILE",
        help="Write every number and the environment here.",
        rich_help_panel=OUTPUT,
    ),
]
Plot = Annotated[
    Path,
    typer.Option(
        "--plot",
        metavar="FILE",
        help="Write the plot (memory and bytes/s against sequence length) here.",
        rich_help_panel=OUTPUT,
    ),
]
Device = Annotated[
    str,
    typer.Option(
        "--device",
        metavar="auto|cpu|cuda",
        help="auto or cuda (GPU memory measured), or cpu (timed only).",
        rich_help_panel=HOW,
    ),
]
Compile = Annotated[
    bool, typer.Option("--compile/--no-compile", help="torch.compile the model (CUDA).", rich_help_panel=HOW)
]
CompileScope = Annotated[
    str,
    typer.Option(
        "--compile-scope",
        metavar="objective|cell",
        help="objective: compile afresh per objective, letting torch.compile recompile (dynamic shapes) for its "
        "other cells (about 2 compilations per objective); cell: compile every cell afresh for its static shapes "
        "(30-80 s per cell at the enwik8 size).",
        rich_help_panel=HOW,
    ),
]
StopOnError = Annotated[
    bool,
    typer.Option(
        "--stop-on-error/--keep-going",
        help="Stop at a cell that fails other than by OOM, or record it as 'error' and go on.",
        rich_help_panel=HOW,
    ),
]
MaxContext = Annotated[
    bool,
    typer.Option(
        "--max-context/--no-max-context",
        help="Also find, per objective and batch size, the longest window that trains without OOM.",
        rich_help_panel=CONTEXT,
    ),
]
MaxSeqLen = Annotated[
    int,
    typer.Option(
        "--max-seq-len",
        metavar="BYTES",
        help="--max-context: stop doubling here (bytes).",
        rich_help_panel=CONTEXT,
    ),
]
RefineSteps = Annotated[
    int,
    typer.Option(
        "--refine-steps",
        metavar="N",
        help="--max-context: bisection steps between the last fit and the first OOM.",
        rich_help_panel=CONTEXT,
    ),
]
PeakTflops = Annotated[
    float,
    typer.Option(
        "--peak-tflops",
        metavar="TFLOPS",
        help="The GPU's bf16 matrix ceiling, for the '% peak' column.",
        rich_help_panel=OUTPUT,
    ),
]
Merge = Annotated[
    List[Path],
    typer.Option(
        "--merge",
        metavar="FILE",
        help="Add the cells of another profile JSON (e.g. benchmarks/megabyte_peer.py's) to the table, ratios and "
        "plot (repeatable).",
        rich_help_panel=OUTPUT,
    ),
]
Seed = Annotated[
    int, typer.Option("--seed", metavar="N", help="Seed of the windows and the models.", rich_help_panel=WHAT)
]


def profile_memory(
    recipe: Recipe = None,
    compare_full: CompareFull = False,
    objectives: Objectives = None,
    seq_lens: SeqLens = None,
    batch_sizes: BatchSizes = None,
    steps: Steps = None,
    warmup: Warmup = None,
    dataset: Dataset = None,
    overrides: Overrides = [],
    json_out: JsonOut = Path("profile-memory.json"),
    plot: Plot = Path("profile-memory.png"),
    device: Device = "auto",
    compile: Compile = True,
    compile_scope: CompileScope = "objective",
    stop_on_error: StopOnError = False,
    max_context: MaxContext = False,
    max_seq_len: MaxSeqLen = 1 << 22,
    refine_steps: RefineSteps = 4,
    peak_tflops: PeakTflops = 800.0,
    merge: Merge = [],
    seed: Seed = 0,
):
    """Peak GPU memory and speed of a few real training steps per objective, sequence length and batch size.

    With no --recipe, --seq-lens or --batch-sizes, on CUDA it measures the README's headline configuration
    (the enwik8 recipe, batch 16, seq 2048 to 16384: a few minutes); with --device cpu, the tiny recipe, CPU-timed.

    Example: haed profile-memory --compare-full --dataset data/enwik8
    """
    from haed.profile import (
        command_line,
        merge_profiles,
        plan_sweep,
        plot_profile,
        read_profile_json,
        write_profile_json,
    )
    from haed.profile import profile_memory as run_profile

    chosen = choose_objectives(compare_full, objectives)
    seqs = None if seq_lens is None else parse_int_list(seq_lens, "--seq-lens")
    batches = None if batch_sizes is None else parse_int_list(batch_sizes, "--batch-sizes")
    # the device first: no CUDA gives one line and a non-zero exit, before any work
    plan = plan_sweep(device, recipe, overrides, seqs, batches, warmup, steps)
    others = [read_profile_json(p) for p in merge]
    _print_plan(plan, chosen)
    with TaskDisplay() as display:
        result = run_profile(
            plan.recipe,
            chosen,
            plan.seq_lens,
            plan.batch_sizes,
            steps=plan.steps,
            warmup=plan.warmup,
            device=device,
            dataset=dataset,
            compile=compile,
            max_context_search=max_context,
            max_seq_len=max_seq_len,
            refine_steps=refine_steps,
            peak_tflops=peak_tflops,
            compile_scope=compile_scope,
            keep_going=not stop_on_error,
            seed=seed,
            on_event=display,
            defaults=plan.defaults,
        )
    result["command"] = command_line()
    if others:
        result = merge_profiles(result, *others)
    print_profile(result)
    write_profile_json(result, json_out)
    plot_profile(result, plot)
    console.print(f"wrote {json_out} and {plot}")


def register(app: typer.Typer) -> None:
    app.command("profile-memory", cls=Command)(user_errors(profile_memory))
