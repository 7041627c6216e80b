"""Evaluation, sampling, comparison and the quickstart: argument parsing and printing only (the training
commands are in training.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from haed_cli.common import Command, TrainingDisplay, console, err_console, user_errors
from haed_cli.training import DEVICE, DEVICE_PANEL, RECIPE, RECIPE_HELP, SET_HELP, recipe_values

CHECKPOINT_HELP = "Which weights: best (the best validation point; the last if none), last, or step-N."
UNVERIFIED_HELP = "Use a checkpoint that cannot be verified (no manifest, no weights digest), with a warning."
SCORED, HOW = "What to score", "How"  # evaluate's help panels


def evaluate(
    run: Path = typer.Option(
        ...,
        "--run",
        metavar="DIR",
        help="A decoder-phase, full or flat run (an IEM run uses its RUN/decoder).",
        rich_help_panel=SCORED,
    ),
    split: str = typer.Option("test", metavar="test|valid|train", help="test, valid or train.", rich_help_panel=SCORED),
    batch_size: int = typer.Option(8, metavar="N", help="Windows per forward pass.", rich_help_panel=HOW),
    max_bytes: Optional[int] = typer.Option(
        None, metavar="N", help="Evaluate only the first N bytes of the split.", rich_help_panel=SCORED
    ),
    seq_len: Optional[int] = typer.Option(
        None, metavar="BYTES", help="Window length (default: the training window).", rich_help_panel=HOW
    ),
    json_out: Optional[Path] = typer.Option(
        None, "--json", metavar="FILE", help="Also write the result as JSON.", rich_help_panel=HOW
    ),
    checkpoint: str = typer.Option(
        "best", "--checkpoint", metavar="best|last|step-N", help=CHECKPOINT_HELP, rich_help_panel=SCORED
    ),
    data: Optional[Path] = typer.Option(
        None,
        "--data",
        metavar="PATH",
        help="Evaluate other bytes: a file (raw bytes; a WAV/FLAC for audio runs) or a dataset directory (its "
        "--split).",
        rich_help_panel=SCORED,
    ),
    device: str = typer.Option("auto", metavar=DEVICE, help="auto, cpu or cuda.", rich_help_panel=HOW),
    allow_unverified: bool = typer.Option(
        False, "--allow-unverified/--no-allow-unverified", help=UNVERIFIED_HELP, rich_help_panel=SCORED
    ),
):
    """Exact bits per byte of a split or other data (every byte through the decoder; bits per sample for audio).

    Example: haed evaluate --run runs/tiny --split test
    """
    from rich.progress import Progress

    from haed.evaluate import evaluate_run

    with Progress(console=console, transient=True) as progress:
        result = evaluate_run(
            run, split, batch_size, device, max_bytes, seq_len, progress, checkpoint, data, json_out, allow_unverified
        )
    table = Table(title=f"exact evaluation: {result['data']}, checkpoint {Path(result['checkpoint']).name}")
    table.add_column("run")
    table.add_column(result["unit"], justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("windowing")
    table.add_row(result["run"], f"{result['bits_per_byte']:.4f}", f"{result['bytes']:,}", result["windowing"])
    console.print(table)


INPUT, SAMPLING, OUTPUT, SPEED = "Run and prompt", "Sampling", "Output", "Speed"  # generate's help panels


def generate(
    run: Path = typer.Option(
        ...,
        "--run",
        metavar="DIR",
        help="A decoder-phase, full or flat run (an IEM run uses its RUN/decoder).",
        rich_help_panel=INPUT,
    ),
    prompt: Optional[str] = typer.Option(
        None, "--prompt", "-p", metavar="TEXT", help="Text prompt.", rich_help_panel=INPUT
    ),
    prompt_file: Optional[Path] = typer.Option(
        None,
        metavar="FILE",
        help="Read the prompt bytes from a file (text runs) or a WAV/FLAC (audio runs).",
        rich_help_panel=INPUT,
    ),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        "-o",
        metavar="PATH",
        help="One stream: the output file (text: prompt + sample; audio: a WAV). "
        "Several: a folder of sample-000.txt / sample-000.wav ... Default: stdout for text; "
        "sample.wav (or sample-000.wav ...) here for audio.",
        rich_help_panel=OUTPUT,
    ),
    max_bytes: Optional[int] = typer.Option(
        None, metavar="N", help="Bytes (audio: samples) to generate per stream.", rich_help_panel=SAMPLING
    ),
    seconds: Optional[float] = typer.Option(
        None,
        metavar="SECONDS",
        help="Audio: seconds to generate per stream (instead of --max-bytes).",
        rich_help_panel=SAMPLING,
    ),
    temperature: Optional[float] = typer.Option(
        None, metavar="T", help="Sampling temperature, >= 0 (0: greedy).", rich_help_panel=SAMPLING
    ),
    top_k: Optional[int] = typer.Option(
        None, metavar="K", help="Keep the K most likely bytes (0: off).", rich_help_panel=SAMPLING
    ),
    top_p: Optional[float] = typer.Option(
        None, metavar="P", help="Nucleus sampling mass, in (0, 1] (1: off).", rich_help_panel=SAMPLING
    ),
    seed: Optional[int] = typer.Option(
        None,
        metavar="N",
        help="Random seed: the same seed gives the same output; stream i uses seed + i.",
        rich_help_panel=SAMPLING,
    ),
    num_samples: int = typer.Option(
        1,
        "--num-samples",
        "-n",
        metavar="N",
        help="Independent continuations generated in one batch; stream i equals a single run with --seed SEED+i.",
        rich_help_panel=SAMPLING,
    ),
    stream: bool = typer.Option(
        False,
        "--stream/--no-stream",
        help="Text: write to stdout as it is generated, one patch at a time. "
        "(WAV files are always written as they are generated, valid at every moment.)",
        rich_help_panel=OUTPUT,
    ),
    device: str = typer.Option("auto", metavar=DEVICE, help="auto, cpu or cuda.", rich_help_panel=SPEED),
    cuda_graphs: bool = typer.Option(
        True,
        "--cuda-graphs/--no-cuda-graphs",
        help="On CUDA, replay each step as a CUDA graph (captured during the prefill); off: the same steps eagerly.",
        rich_help_panel=SPEED,
    ),
    compile: bool = typer.Option(
        False,
        "--compile/--no-compile",
        help="torch.compile the whole-patch step of a hierarchical model before it is captured (fused "
        "kernels; the compilation is counted in the prefill).",
        rich_help_panel=SPEED,
    ),
    decoder_kernels: bool = typer.Option(
        False,
        "--decoder-kernels/--no-decoder-kernels",
        help="Run the byte decoder's steps as one Triton kernel per patch (CUDA) in the whole-patch step, and for "
        "one stream the encoder and main model's step as another where the model's widths are powers of two. With "
        "--compile the fastest mode for one stream; for many streams --compile alone is faster (docs/performance.md).",
        rich_help_panel=SPEED,
    ),
    checkpoint: str = typer.Option(
        "best", "--checkpoint", metavar="best|last|step-N", help=CHECKPOINT_HELP, rich_help_panel=INPUT
    ),
    allow_unverified: bool = typer.Option(
        False, "--allow-unverified/--no-allow-unverified", help=UNVERIFIED_HELP, rich_help_panel=INPUT
    ),
):
    """Sample with cached hierarchical generation (main-model and decoder key/value caches).

    Example: haed generate --run runs/tiny --prompt "def main(" --max-bytes 300
    """
    from contextlib import nullcontext

    from rich.progress import Progress

    from haed.generate_job import prepare_generation, run_generation

    plan = prepare_generation(
        run,
        device=device,
        checkpoint=checkpoint,
        prompt=prompt,
        prompt_file=prompt_file,
        out=out,
        max_bytes=max_bytes,
        seconds=seconds,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        num_samples=num_samples,
        stream=stream,
        decoder_kernels=decoder_kernels,
        allow_unverified=allow_unverified,
    )
    # Streamed text is its own progress display: a bar on stderr would tear it.
    show_bar = not (plan.kind == "text" and plan.stream)
    with Progress(console=err_console, transient=True) if show_bar else nullcontext() as progress:
        done = run_generation(plan, cuda_graphs=cuda_graphs, progress=progress, stdout=sys.stdout, compile=compile)
    result = done.result
    n = plan.num_samples
    if plan.kind == "audio":
        sr = plan.sample_rate
        each = f"{len(plan.prompt + result.output) / sr:.2f} s at {sr} Hz, {len(result.output) / sr:.2f} s generated"
        where = (
            str(done.files[0])
            if n == 1
            else f"{n} files {done.files[0].name} .. {done.files[-1].name} in {done.files[0].parent}"
        )
        err_console.print(f"wrote {where} ({'each ' if n > 1 else ''}{each})", highlight=False, soft_wrap=True)
    elif done.files:
        where = (
            str(done.files[0])
            if n == 1
            else f"{n} files {done.files[0].name} .. {done.files[-1].name} in {done.files[0].parent}"
        )
        err_console.print(f"wrote {where}", highlight=False, soft_wrap=True)
    unit = "samples" if plan.kind == "audio" else "bytes"
    rate = f"{result.bytes_per_second:,.0f} {unit}/s"
    if n > 1:
        rate += (
            f" aggregate over {n} streams ({result.bytes_per_second_per_stream:,.0f} per stream, "
            f"seeds {plan.seed}..{plan.seed + n - 1})"
        )
    if plan.kind == "audio":
        rtf = done.real_time_factor
        rate += f", real-time factor {rtf:.3f}" + (f" per stream ({rtf * n:.2f} for all {n})" if n > 1 else "")
    kernels = ""
    if done.decoder_kernels:
        kernels = ", Triton decoder and main model" if result.main_kernels else ", Triton decoder"
    err_console.print(
        f"[dim]{len(result.output) * n:,} {unit} in {result.seconds:.2f} s: {rate} "
        f"(prefill {result.prefill_seconds * 1e3:.0f} ms, {plan.device}{', CUDA graphs' if done.cuda_graphs else ''}"
        f"{', compiled' if done.compiled else ''}{kernels}; "
        f"weights {plan.checkpoint})[/]",
        highlight=False,
        soft_wrap=True,
    )


SYSTEMS, SCORING = "Systems and budget", "Scoring and output"  # compare's help panels


def compare(
    recipe: str = typer.Option("tiny", "--recipe", "-r", metavar="NAME|FILE", help=RECIPE_HELP, rich_help_panel=RECIPE),
    dataset: Optional[Path] = typer.Option(
        None,
        "--dataset",
        "-d",
        metavar="DIR",
        help="Dataset directory (default: the recipe's data.dataset).",
        rich_help_panel=RECIPE,
    ),
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
        "(same global batch) and recomputation of its own that fits, probed before the clock starts.",
        metavar="GIB",
        show_default=False,
        rich_help_panel=SYSTEMS,
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
    accumulation, recomputation: what a memory cap chose), its peak GPU memory and its scores."""
    from haed.compare import describe_configuration, describe_phase_ends, describe_phases

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
        "micro-batch x accum, recompute",
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


def quickstart(
    workdir: Path = typer.Option(
        Path("."), "--workdir", "-w", metavar="DIR", help="Where data/stdlib and runs/RECIPE go."
    ),
    recipe: str = typer.Option("tiny", "--recipe", "-r", metavar="NAME|FILE", help=RECIPE_HELP),
    overrides: List[str] = typer.Option([], "--set", metavar="FIELD=VALUE", help=SET_HELP),
    prompt: str = typer.Option("def ", "--prompt", "-p", metavar="TEXT", help="Prompt of the final sample."),
    device: str = typer.Option("auto", metavar=DEVICE, help="auto, cpu or cuda."),
):
    """The whole pipeline on the offline corpus: prepare, IEM, decoder phase, evaluate, generate.

    Example: haed quickstart   (about 2 to 3 minutes on a 2-core CPU, no download)
    """
    from haed.pipeline import quickstart as run_pipeline

    with TrainingDisplay() as display:
        result = run_pipeline(
            workdir, recipe, overrides, prompt.encode("utf-8"), device, console=console, on_event=display
        )
    ev = result.evaluation
    console.rule("sample")
    sys.stdout.write((result.sample.prompt + result.sample.output).decode("utf-8", errors="replace") + "\n")
    sys.stdout.flush()
    console.rule()
    console.print(f"[dim]{len(result.sample.output)} bytes at {result.sample.bytes_per_second:,.0f} bytes/s[/]")
    console.print(
        f"[bold green]test bits per byte: {ev['bits_per_byte']:.4f}[/] over {ev['bytes']:,} bytes "
        f"({ev['windowing']}); run: {result.run_dir}"
    )


def register(app: typer.Typer) -> None:
    for name, fn in (
        ("evaluate", evaluate),
        ("generate", generate),
        ("compare", compare),
        ("quickstart", quickstart),
    ):
        app.command(name, cls=Command)(user_errors(fn))
