"""Training, evaluation and sampling commands: argument parsing and printing only."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from haed_cli.common import TrainingDisplay, console, err_console, user_errors

RECIPE_HELP = "Recipe name (tiny, enwik8, speech) or path to a .toml file."
CHECKPOINT_HELP = "Which weights: best (the best validation point; the last if none), last, or step-N."
SET_HELP = "Override any recipe field, e.g. --set main.layers=8 --set iem.lr=3e-4 (repeatable)."
UNVERIFIED_HELP = "Use a checkpoint that cannot be verified (no manifest, no weights digest), with a warning."


def _recipe_values(
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
    no_compile: bool,
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
            compile=False if no_compile else None,
            on_event=display,
            wait_for_parent=wait_for_parent,
        )
    _print_train_result(result, objective)
    if result.interrupted:
        raise typer.Exit(130 if result.interrupted == "SIGINT" else 143)
    return result


RESUME_HELP = (
    "Continue the run in --out from its newest intact checkpoint, with the run's own recipe, dataset and "
    "seed (recipe options that differ are refused unless --allow-changes)."
)
ALLOW_HELP = "With --resume: accept recipe options that differ from the run's (e.g. a longer --time-budget)."
BUDGET_HELP = (
    "Seconds of training (validation, checkpoints and compilation not counted): the schedule runs over the budget and "
    "the run ends when it is spent."
)


def train_iem(
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help=RECIPE_HELP + " Default: tiny."),
    dataset: Optional[Path] = typer.Option(
        None, "--dataset", "-d", help="Dataset directory (default: the recipe's data.dataset)."
    ),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/RECIPE-OBJECTIVE)."),
    objective: str = typer.Option(
        "iem", "--objective", help="iem (default), or full: end-to-end byte cross-entropy (same as train-full)."
    ),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (overrides the recipe)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help=BUDGET_HELP),
    batch_size: Optional[int] = typer.Option(None, help="Windows per micro-batch (overrides the recipe)."),
    seq_len: Optional[int] = typer.Option(None, help="Window length in bytes (overrides the recipe)."),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    allow_changes: bool = typer.Option(False, "--allow-changes", help=ALLOW_HELP),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    no_compile: bool = typer.Option(False, "--no-compile", help="Do not torch.compile the model (CUDA)."),
):
    """Train the encoder and main model with IEM (sampled softmax over patches; no byte decoder).

    Example: haed train-iem --recipe tiny --dataset data/stdlib --out runs/tiny
    """
    if objective not in ("iem", "full"):
        raise typer.BadParameter("--objective is iem or full")
    values = _recipe_values(dataset, steps, batch_size, seq_len, time_budget, objective)
    _train(objective, recipe, overrides, values, out, resume, allow_changes, device, no_compile)


def train_full(
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help=RECIPE_HELP + " Default: tiny."),
    dataset: Optional[Path] = typer.Option(
        None, "--dataset", "-d", help="Dataset directory (default: the recipe's data.dataset)."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Run directory (default: runs/RECIPE-full or runs/RECIPE-flat)."
    ),
    arch: str = typer.Option(
        "haed",
        help="haed: the hierarchy end to end; flat: a byte-level transformer (the recipe's main stack over bytes).",
    ),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (overrides the recipe's [full] section)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help=BUDGET_HELP),
    batch_size: Optional[int] = typer.Option(None, help="Windows per micro-batch."),
    seq_len: Optional[int] = typer.Option(None, help="Window length in bytes."),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    allow_changes: bool = typer.Option(False, "--allow-changes", help=ALLOW_HELP),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    no_compile: bool = typer.Option(False, "--no-compile", help="Do not torch.compile the model (CUDA)."),
):
    """Baseline: train encoder, main model and decoder end to end on byte cross-entropy (or --arch flat).

    Example: haed train-full --recipe tiny --dataset data/stdlib --out runs/tiny-full
    """
    if arch not in ("haed", "flat"):
        raise typer.BadParameter("--arch is haed or flat")
    objective = "flat" if arch == "flat" else "full"
    values = _recipe_values(dataset, steps, batch_size, seq_len, time_budget, "full")
    if not resume or recipe is not None or overrides or values:
        values["model.arch"] = arch
    _train(objective, recipe, overrides, values, out, resume, allow_changes, device, no_compile)


def train_decoder(
    run: Path = typer.Option(..., "--run", help="The IEM run whose encoder and main model are frozen."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: RUN/decoder)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (overrides the recipe's [decoder] section)."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help=BUDGET_HELP),
    batch_size: Optional[int] = typer.Option(None, help="Windows per micro-batch."),
    overrides: List[str] = typer.Option([], "--set", help="Override decoder-phase fields, e.g. --set decoder.lr=3e-4."),
    resume: bool = typer.Option(False, "--resume", help=RESUME_HELP),
    allow_changes: bool = typer.Option(False, "--allow-changes", help=ALLOW_HELP),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    no_compile: bool = typer.Option(False, "--no-compile", help="Do not torch.compile the decoder (CUDA)."),
    wait: bool = typer.Option(False, "--wait", help="If the IEM run is still training, wait for it to finish."),
):
    """Decoder phase: freeze an IEM run's encoder and main model (its best checkpoint), train the byte decoder.

    Example: haed train-decoder --run runs/tiny
    """
    from haed.runs import decoder_phase_recipe

    values = _recipe_values(None, steps, batch_size, None, time_budget, "decoder")
    recipe = None if resume and not (overrides or values) else decoder_phase_recipe(run, overrides, values)
    _train(
        "decoder",
        None,
        [],
        {},
        out or Path(run) / "decoder",
        resume,
        allow_changes,
        device,
        no_compile,
        init_from=None if resume else run,
        recipe=recipe,
        wait_for_parent=wait,
    )


def evaluate(
    run: Path = typer.Option(..., "--run", help="A decoder-phase, full or flat run (an IEM run uses its RUN/decoder)."),
    split: str = typer.Option("test", help="test, valid or train."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    max_bytes: Optional[int] = typer.Option(None, help="Evaluate only the first N bytes of the split."),
    seq_len: Optional[int] = typer.Option(None, help="Window length (default: the training window)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON."),
    checkpoint: str = typer.Option("best", "--checkpoint", help=CHECKPOINT_HELP),
    data: Optional[Path] = typer.Option(
        None,
        "--data",
        help="Evaluate other bytes: a file (raw bytes; a WAV/FLAC for audio runs) or a dataset directory (its "
        "--split).",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    allow_unverified: bool = typer.Option(False, "--allow-unverified", help=UNVERIFIED_HELP),
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


def generate(
    run: Path = typer.Option(..., "--run", help="A decoder-phase, full or flat run (an IEM run uses its RUN/decoder)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text prompt."),
    prompt_file: Optional[Path] = typer.Option(
        None, help="Read the prompt bytes from a file (text runs) or a WAV/FLAC (audio runs)."
    ),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        "-o",
        help="One stream: the output file (text: prompt + sample; audio: a WAV). "
        "Several: a folder of sample-000.txt / sample-000.wav ... Default: stdout for text; "
        "sample.wav (or sample-000.wav ...) here for audio.",
    ),
    max_bytes: Optional[int] = typer.Option(None, help="Bytes (audio: samples) to generate per stream."),
    seconds: Optional[float] = typer.Option(
        None, help="Audio: seconds to generate per stream (instead of --max-bytes)."
    ),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature (0: greedy)."),
    top_k: Optional[int] = typer.Option(None, help="Keep the k most likely bytes (0: off)."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass, in (0, 1] (1: off)."),
    seed: Optional[int] = typer.Option(
        None, help="Random seed: the same seed gives the same output; stream i uses seed + i."
    ),
    num_samples: int = typer.Option(
        1,
        "--num-samples",
        "-n",
        help="Independent continuations generated in one batch; stream i equals a single run with --seed SEED+i.",
    ),
    stream: bool = typer.Option(
        False,
        "--stream",
        help="Text: write to stdout as it is generated, one patch at a time. "
        "(WAV files are always written as they are generated, valid at every moment.)",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    cuda_graphs: bool = typer.Option(
        True,
        "--cuda-graphs/--no-cuda-graphs",
        help="On CUDA, replay each step as a CUDA graph (captured during the prefill); off: the same steps eagerly.",
    ),
    compile: bool = typer.Option(
        False,
        "--compile/--no-compile",
        help="torch.compile the whole-patch step of a hierarchical model before it is captured (fused "
        "kernels; the compilation is counted in the prefill).",
    ),
    decoder_kernels: bool = typer.Option(
        False,
        "--decoder-kernels",
        help="Run the byte decoder's steps as one Triton kernel per patch (CUDA) in the whole-patch step, and for "
        "one stream the encoder and main model's step as another where the model's widths are powers of two. With "
        "--compile the fastest mode for one stream; for many streams --compile alone is faster (docs/performance.md).",
    ),
    checkpoint: str = typer.Option("best", "--checkpoint", help=CHECKPOINT_HELP),
    allow_unverified: bool = typer.Option(False, "--allow-unverified", help=UNVERIFIED_HELP),
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


def compare(
    recipe: str = typer.Option("tiny", "--recipe", "-r", help=RECIPE_HELP),
    dataset: Optional[Path] = typer.Option(
        None, "--dataset", "-d", help="Dataset directory (default: the recipe's data.dataset)."
    ),
    budget: float = typer.Option(
        ...,
        "--time-budget",
        "--budget",
        help="Seconds of training for each system (IEM + decoder phase together get the same).",
    ),
    out: Path = typer.Option(
        Path("runs/compare"), "--out", "-o", help="Where the runs, compare.json and compare.png go."
    ),
    systems: Optional[str] = typer.Option(
        None,
        help="Comma-separated: iem (IEM + decoder phase), full, flat, megabyte (MEGABYTE-pytorch, the peer) "
        "\\[default: all; megabyte where its package is installed].",
        metavar="LIST",
        show_default=False,
    ),
    decoder_fraction: Optional[float] = typer.Option(
        None,
        help="Share of the IEM system's budget given to the decoder phase (default: the recipe's "
        "compare.decoder_fraction).",
    ),
    evals: int = typer.Option(10, help="Validation points per phase (evenly spaced in training seconds)."),
    eval_data: List[Path] = typer.Option(
        [], "--eval-data", help="Also score this file or dataset directory (repeatable)."
    ),
    eval_bytes: Optional[int] = typer.Option(None, help="Score only the first N bytes of each test split or file."),
    seq_len: Optional[int] = typer.Option(None, help="Window length in bytes (overrides the recipe)."),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
    flat_overrides: List[str] = typer.Option(
        [],
        "--flat-set",
        help="Override the flat baseline's recipe, e.g. --flat-set main.layers=6 (default: depth matched to the "
        "hierarchy's parameter count).",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    compile: bool = typer.Option(
        False,
        "--compile/--no-compile",
        help="torch.compile the stacks and IEM's softmax (CUDA) for every system, before its clock starts.",
    ),
    memory_cap: Optional[float] = typer.Option(
        None,
        "--memory-cap",
        help="Train every system under this cap on GPU memory, enforced, each at the fastest micro-batch "
        "(same global batch) and recomputation of its own that fits, probed before the clock starts.",
        metavar="GIB",
        show_default=False,
    ),
):
    """Which objective should I train? IEM + decoder phase, full, flat and MEGABYTE-pytorch for the same seconds.

    Every system trains for the same seconds on the same device and is scored by exact test bits per byte.

    Example: haed compare --recipe tiny --dataset data/stdlib --time-budget 120 --out runs/compare
    """
    from haed.compare import compare as run_compare
    from haed.runs import recipe_for_run

    r = recipe_for_run(None, recipe, overrides, _recipe_values(dataset, None, None, seq_len, None, "iem"))
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
    workdir: Path = typer.Option(Path("."), "--workdir", "-w", help="Where data/stdlib and runs/RECIPE go."),
    recipe: str = typer.Option("tiny", "--recipe", "-r", help=RECIPE_HELP),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
    prompt: str = typer.Option("def ", "--prompt", "-p", help="Prompt of the final sample."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
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
        ("train-iem", train_iem),
        ("train-decoder", train_decoder),
        ("train-full", train_full),
        ("evaluate", evaluate),
        ("generate", generate),
        ("compare", compare),
        ("quickstart", quickstart),
    ):
        app.command(name)(user_errors(fn))
