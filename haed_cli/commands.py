"""Evaluation, sampling, comparison and the quickstart: argument parsing and printing only (the training
commands are in training.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.table import Table

from haed_cli.common import Command, TrainingDisplay, console, err_console, user_errors
from haed_cli.compare import compare
from haed_cli.training import DEVICE, RECIPE_HELP, SET_HELP

CHECKPOINT_HELP = "Which weights: best (the best validation point; the last if none), last, or step-N."
UNVERIFIED_HELP = "Use a checkpoint that cannot be verified (no manifest, no weights digest), with a warning."
SCORED, HOW = "What to score", "How"  # evaluate's help panels


Run = Annotated[
    Path,
    typer.Option(
        "--run",
        metavar="DIR",
        help="A decoder-phase, full or flat run (an IEM run uses its RUN/decoder).",
        rich_help_panel=SCORED,
    ),
]
Split = Annotated[str, typer.Option(metavar="test|valid|train", help="test, valid or train.", rich_help_panel=SCORED)]
BatchSize = Annotated[int, typer.Option(metavar="N", help="Windows per forward pass.", rich_help_panel=HOW)]
MaxBytes = Annotated[
    Optional[int],
    typer.Option(metavar="N", help="Evaluate only the first N bytes of the split.", rich_help_panel=SCORED),
]
SeqLen = Annotated[
    Optional[int],
    typer.Option(metavar="BYTES", help="Window length (default: the training window).", rich_help_panel=HOW),
]
JsonOut = Annotated[
    Optional[Path], typer.Option("--json", metavar="FILE", help="Also write the result as JSON.", rich_help_panel=HOW)
]
Checkpoint = Annotated[
    str, typer.Option("--checkpoint", metavar="best|last|step-N", help=CHECKPOINT_HELP, rich_help_panel=SCORED)
]
Data = Annotated[
    Optional[Path],
    typer.Option(
        "--data",
        metavar="PATH",
        help="Evaluate other bytes: a file (raw bytes; a WAV/FLAC for audio runs) or a dataset directory (its "
        "--split).",
        rich_help_panel=SCORED,
    ),
]
Device = Annotated[str, typer.Option(metavar=DEVICE, help="auto, cpu or cuda.", rich_help_panel=HOW)]
AllowUnverified = Annotated[
    bool, typer.Option("--allow-unverified/--no-allow-unverified", help=UNVERIFIED_HELP, rich_help_panel=SCORED)
]


def evaluate(
    run: Run = ...,
    split: Split = "test",
    batch_size: BatchSize = 8,
    max_bytes: MaxBytes = None,
    seq_len: SeqLen = None,
    json_out: JsonOut = None,
    checkpoint: Checkpoint = "best",
    data: Data = None,
    device: Device = "auto",
    allow_unverified: AllowUnverified = False,
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


def _print_generation_summary(plan, done) -> None:
    """What `haed generate` wrote, then its bytes (samples) per second on one line."""
    result = done.result
    n = plan.num_samples
    if done.files:  # audio always writes WAV files; text only with --out
        where = (
            str(done.files[0])
            if n == 1
            else f"{n} files {done.files[0].name} .. {done.files[-1].name} in {done.files[0].parent}"
        )
        if plan.kind == "audio":
            sr = plan.sample_rate
            each = (
                f"{len(plan.prompt + result.output) / sr:.2f} s at {sr} Hz, {len(result.output) / sr:.2f} s generated"
            )
            where += f" ({'each ' if n > 1 else ''}{each})"
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


Workdir = Annotated[Path, typer.Option("--workdir", "-w", metavar="DIR", help="Where data/stdlib and runs/RECIPE go.")]
Recipe = Annotated[str, typer.Option("--recipe", "-r", metavar="NAME|FILE", help=RECIPE_HELP)]
Overrides = Annotated[List[str], typer.Option("--set", metavar="FIELD=VALUE", help=SET_HELP)]
QuickstartPrompt = Annotated[str, typer.Option("--prompt", "-p", metavar="TEXT", help="Prompt of the final sample.")]
QuickstartDevice = Annotated[str, typer.Option(metavar=DEVICE, help="auto, cpu or cuda.")]


GenerateRun = Annotated[
    Path,
    typer.Option(
        "--run",
        metavar="DIR",
        help="A decoder-phase, full or flat run (an IEM run uses its RUN/decoder).",
        rich_help_panel=INPUT,
    ),
]
Prompt = Annotated[
    Optional[str], typer.Option("--prompt", "-p", metavar="TEXT", help="Text prompt.", rich_help_panel=INPUT)
]
PromptFile = Annotated[
    Optional[Path],
    typer.Option(
        metavar="FILE",
        help="Read the prompt bytes from a file (text runs) or a WAV/FLAC (audio runs).",
        rich_help_panel=INPUT,
    ),
]
Out = Annotated[
    Optional[Path],
    typer.Option(
        "--out",
        "-o",
        metavar="PATH",
        help="One stream: the output file (text: prompt + sample; audio: a WAV). "
        "Several: a folder of sample-000.txt / sample-000.wav ... Default: stdout for text; "
        "sample.wav (or sample-000.wav ...) here for audio.",
        rich_help_panel=OUTPUT,
    ),
]
GenerateMaxBytes = Annotated[
    Optional[int],
    typer.Option(metavar="N", help="Bytes (audio: samples) to generate per stream.", rich_help_panel=SAMPLING),
]
Seconds = Annotated[
    Optional[float],
    typer.Option(
        "--seconds",  # named: typer 0.27 (click 8.5) took the metavar SECONDS for the flag's name
        metavar="SECONDS",
        help="Audio: seconds to generate per stream (instead of --max-bytes).",
        rich_help_panel=SAMPLING,
    ),
]
Temperature = Annotated[
    Optional[float], typer.Option(metavar="T", help="Sampling temperature, >= 0 (0: greedy).", rich_help_panel=SAMPLING)
]
TopK = Annotated[
    Optional[int], typer.Option(metavar="K", help="Keep the K most likely bytes (0: off).", rich_help_panel=SAMPLING)
]
TopP = Annotated[
    Optional[float],
    typer.Option(metavar="P", help="Nucleus sampling mass, in (0, 1] (1: off).", rich_help_panel=SAMPLING),
]
Seed = Annotated[
    Optional[int],
    typer.Option(
        metavar="N",
        help="Random seed: the same seed gives the same output; stream i uses seed + i.",
        rich_help_panel=SAMPLING,
    ),
]
NumSamples = Annotated[
    int,
    typer.Option(
        "--num-samples",
        "-n",
        metavar="N",
        help="Independent continuations generated in one batch; stream i equals a single run with --seed SEED+i.",
        rich_help_panel=SAMPLING,
    ),
]
Stream = Annotated[
    bool,
    typer.Option(
        "--stream/--no-stream",
        help="Text: write to stdout as it is generated, one patch at a time. "
        "(WAV files are always written as they are generated, valid at every moment.)",
        rich_help_panel=OUTPUT,
    ),
]
GenerateDevice = Annotated[str, typer.Option(metavar=DEVICE, help="auto, cpu or cuda.", rich_help_panel=SPEED)]
CudaGraphs = Annotated[
    bool,
    typer.Option(
        "--cuda-graphs/--no-cuda-graphs",
        help="On CUDA, replay each step as a CUDA graph (captured during the prefill); off: the same steps eagerly.",
        rich_help_panel=SPEED,
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile/--no-compile",
        help="torch.compile the whole-patch step of a hierarchical model before it is captured (fused "
        "kernels; the compilation is counted in the prefill).",
        rich_help_panel=SPEED,
    ),
]
DecoderKernels = Annotated[
    bool,
    typer.Option(
        "--decoder-kernels/--no-decoder-kernels",
        help="Run the byte decoder's steps as one Triton kernel per patch (CUDA) in the whole-patch step, and for "
        "one stream the encoder and main model's step as another where the model's widths are powers of two. With "
        "--compile the fastest mode for one stream; for many streams --compile alone is faster (docs/performance.md).",
        rich_help_panel=SPEED,
    ),
]
GenerateCheckpoint = Annotated[
    str, typer.Option("--checkpoint", metavar="best|last|step-N", help=CHECKPOINT_HELP, rich_help_panel=INPUT)
]
GenerateAllowUnverified = Annotated[
    bool, typer.Option("--allow-unverified/--no-allow-unverified", help=UNVERIFIED_HELP, rich_help_panel=INPUT)
]


def generate(
    run: GenerateRun = ...,
    prompt: Prompt = None,
    prompt_file: PromptFile = None,
    out: Out = None,
    max_bytes: GenerateMaxBytes = None,
    seconds: Seconds = None,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    seed: Seed = None,
    num_samples: NumSamples = 1,
    stream: Stream = False,
    device: GenerateDevice = "auto",
    cuda_graphs: CudaGraphs = True,
    compile: Compile = False,
    decoder_kernels: DecoderKernels = False,
    checkpoint: GenerateCheckpoint = "best",
    allow_unverified: GenerateAllowUnverified = False,
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
    _print_generation_summary(plan, done)


def quickstart(
    workdir: Workdir = Path("."),
    recipe: Recipe = "tiny",
    overrides: Overrides = [],
    prompt: QuickstartPrompt = "def ",
    device: QuickstartDevice = "auto",
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
