"""Training, evaluation and sampling commands: argument parsing and printing only."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from haed_cli.common import console, err_console, user_errors

RECIPE_HELP = "Recipe name (tiny, enwik8, speech) or path to a .toml file."
SET_HELP = "Override any recipe field, e.g. --set main.layers=8 --set iem.lr=3e-4 (repeatable)."


def _recipe(recipe: str, overrides: list[str], dataset: Optional[Path], steps: Optional[int], batch_size: Optional[int],
            seq_len: Optional[int], section: str, extra: Optional[dict] = None):
    from haed.config import load_recipe

    # Typed options are set as values, after --set: never re-parsed, so any path works.
    values = {"data.dataset": None if dataset is None else str(dataset), "data.seq_len": seq_len,
              f"{section}.steps": steps, f"{section}.batch_size": batch_size}
    values = {key: value for key, value in values.items() if value is not None}
    return load_recipe(recipe, list(overrides or []), {**values, **(extra or {})})


def _print_parameters(config_parameters: dict) -> None:
    console.print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in config_parameters.items()))


def _print_train_result(result, objective: str) -> None:
    m = result.last_metrics
    line = f"[green]done[/] {objective}: step {result.step}, run {result.run_dir}"
    if m:
        line += f", train loss {m.get('loss', float('nan')):.4f}, {m.get('bytes_per_second', 0) / 1e3:.1f} kB/s"
    console.print(line)
    if result.last_eval:
        console.print("valid: " + ", ".join(f"{k} {v:.4f}" for k, v in result.last_eval.items() if k not in ("step", "split", "candidates")))


def _train(objective: str, recipe, out: Optional[Path], resume: bool, device: str, no_compile: bool, init_from=None):
    from haed.model import build_model, count_parameters
    from haed.train import train

    if no_compile:
        getattr(recipe, "full" if objective == "flat" else objective).compile = False
    run_dir = out or Path("runs") / f"{recipe.name}-{objective}"
    console.print(f"[bold]{objective}[/] training of recipe [bold]{recipe.name}[/] into {run_dir}")
    _print_parameters(count_parameters(build_model(recipe.model)))
    result = train(recipe, objective, run_dir, resume=resume, device=device, init_from=init_from)
    _print_train_result(result, objective)
    return result


def train_iem(
    recipe: str = typer.Option("tiny", "--recipe", "-r", help=RECIPE_HELP),
    dataset: Optional[Path] = typer.Option(None, "--dataset", "-d", help="Dataset directory (default: the recipe's data.dataset)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/RECIPE-OBJECTIVE)."),
    objective: str = typer.Option("iem", "--objective", help="iem (default), or full: end-to-end byte cross-entropy (same as train-full)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (overrides the recipe)."),
    batch_size: Optional[int] = typer.Option(None, help="Windows per micro-batch (overrides the recipe)."),
    seq_len: Optional[int] = typer.Option(None, help="Window length in bytes (overrides the recipe)."),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    no_compile: bool = typer.Option(False, "--no-compile", help="Do not torch.compile the model (CUDA)."),
):
    """Train the encoder and main model with IEM (sampled softmax over patches; no byte decoder).

    Example: haed train-iem --recipe tiny --dataset data/stdlib --out runs/tiny
    """
    if objective not in ("iem", "full"):
        raise typer.BadParameter("--objective is iem or full")
    r = _recipe(recipe, overrides, dataset, steps, batch_size, seq_len, objective)
    _train(objective, r, out, resume, device, no_compile)


def train_full(
    recipe: str = typer.Option("tiny", "--recipe", "-r", help=RECIPE_HELP),
    dataset: Optional[Path] = typer.Option(None, "--dataset", "-d", help="Dataset directory (default: the recipe's data.dataset)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/RECIPE-full or runs/RECIPE-flat)."),
    arch: str = typer.Option("haed", help="haed: the hierarchy end to end; flat: a byte-level transformer (the recipe's main stack over bytes)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (overrides the recipe's [full] section)."),
    batch_size: Optional[int] = typer.Option(None, help="Windows per micro-batch."),
    seq_len: Optional[int] = typer.Option(None, help="Window length in bytes."),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    no_compile: bool = typer.Option(False, "--no-compile", help="Do not torch.compile the model (CUDA)."),
):
    """Baseline: train encoder, main model and decoder end to end on byte cross-entropy (or --arch flat).

    Example: haed train-full --recipe tiny --dataset data/stdlib --out runs/tiny-full
    """
    if arch not in ("haed", "flat"):
        raise typer.BadParameter("--arch is haed or flat")
    objective = "flat" if arch == "flat" else "full"
    r = _recipe(recipe, overrides, dataset, steps, batch_size, seq_len, "full", {"model.arch": arch})
    _train(objective, r, out, resume, device, no_compile)


def train_decoder(
    run: Path = typer.Option(..., "--run", help="The IEM run whose encoder and main model are frozen."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: RUN/decoder)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (overrides the recipe's [decoder] section)."),
    batch_size: Optional[int] = typer.Option(None, help="Windows per micro-batch."),
    overrides: List[str] = typer.Option([], "--set", help="Override decoder-phase fields, e.g. --set decoder.lr=3e-4."),
    resume: bool = typer.Option(False, "--resume", help="Continue the decoder phase in --out from its latest checkpoint."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    no_compile: bool = typer.Option(False, "--no-compile", help="Do not torch.compile the decoder (CUDA)."),
):
    """Decoder phase: freeze an IEM run's encoder and main model, train the byte decoder.

    Example: haed train-decoder --run runs/tiny
    """
    from haed.checkpoint import read_run_config
    from haed.config import apply_overrides, apply_values, recipe_from_dict

    parent = read_run_config(run)
    if parent.get("objective") != "iem":
        from haed.errors import HaedError

        raise HaedError(f"{run} is a {parent.get('objective')} run: the decoder phase starts from an IEM run")
    values = parent["recipe"]
    apply_overrides(values, list(overrides))
    apply_values(values, {key: value for key, value in (("decoder.steps", steps), ("decoder.batch_size", batch_size))
                          if value is not None})
    recipe = recipe_from_dict(values)
    _train("decoder", recipe, out or Path(run) / "decoder", resume, device, no_compile, init_from=None if resume else run)


def evaluate(
    run: Path = typer.Option(..., "--run", help="A decoder-phase, full or flat run (an IEM run uses its RUN/decoder)."),
    split: str = typer.Option("test", help="test, valid or train."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    max_bytes: Optional[int] = typer.Option(None, help="Evaluate only the first N bytes of the split."),
    seq_len: Optional[int] = typer.Option(None, help="Window length (default: the training window)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
):
    """Exact bits per byte of a split (every byte through the decoder; bits per sample for audio).

    Example: haed evaluate --run runs/tiny --split test
    """
    from rich.progress import Progress

    from haed.checkpoint import write_text_atomic
    from haed.evaluate import evaluate_run

    with Progress(console=console, transient=True) as progress:
        result = evaluate_run(run, split, batch_size, device, max_bytes, seq_len, progress)
    table = Table(title=f"exact evaluation: {result['split']} split")
    table.add_column("run")
    table.add_column(result["unit"], justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("windowing")
    table.add_row(result["run"], f"{result['bits_per_byte']:.4f}", f"{result['bytes']:,}", result["windowing"])
    console.print(table)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(result, indent=2))


def generate(
    run: Path = typer.Option(..., "--run", help="A decoder-phase, full or flat run (an IEM run uses its RUN/decoder)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Text prompt."),
    prompt_file: Optional[Path] = typer.Option(None, help="Read the prompt bytes from a file (text runs) or a WAV/FLAC (audio runs)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the output here (text: prompt + sample; audio: a WAV). Default: stdout for text, sample.wav for audio."),
    max_bytes: Optional[int] = typer.Option(None, help="Bytes (audio: samples) to generate."),
    seconds: Optional[float] = typer.Option(None, help="Audio: seconds to generate (instead of --max-bytes)."),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature (0: greedy)."),
    top_k: Optional[int] = typer.Option(None, help="Keep the k most likely bytes (0: off)."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass (1: off)."),
    seed: Optional[int] = typer.Option(None, help="Random seed: the same seed gives the same output."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    cuda_graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs", help="On CUDA, replay each step as a CUDA graph (captured during the prefill); off: the same steps eagerly."),
):
    """Sample with cached hierarchical generation (main-model and decoder key/value caches).

    Example: haed generate --run runs/tiny --prompt "def main(" --max-bytes 300
    """
    from rich.progress import Progress

    from haed.errors import HaedError
    from haed.generate import audio_prompt_bytes, generate as run_generation, load_for_sampling

    model, recipe, config, run_dir = load_for_sampling(run, device)
    g = recipe.generate
    kind = config["dataset"]["kind"]
    sample_rate = config["dataset"].get("sample_rate")
    if prompt is not None and prompt_file is not None:
        raise HaedError("give --prompt or --prompt-file, not both")
    if kind == "audio":
        if prompt is not None:
            raise HaedError("this is an audio run: give the prompt as --prompt-file a.wav")
        prompt_bytes = audio_prompt_bytes(prompt_file, sample_rate) if prompt_file is not None else b""
        n = int(seconds * sample_rate) if seconds is not None else (max_bytes or g.max_bytes)
    else:
        if prompt_file is not None:
            if not prompt_file.is_file():
                raise HaedError(f"prompt file {prompt_file} does not exist")
            prompt_bytes = prompt_file.read_bytes()
        else:
            prompt_bytes = (prompt or "").encode("utf-8")
        n = max_bytes or g.max_bytes
    with Progress(console=err_console, transient=True) as progress:
        result = run_generation(
            model, prompt_bytes, n,
            temperature=g.temperature if temperature is None else temperature,
            top_k=g.top_k if top_k is None else top_k,
            top_p=g.top_p if top_p is None else top_p,
            seed=g.seed if seed is None else seed,
            context_bytes=recipe.data.seq_len,
            progress=progress,
            cuda_graphs=cuda_graphs,
        )
    unit = "samples" if kind == "audio" else "bytes"
    if kind == "audio":
        from haed.audio import write_wav

        path = write_wav(out or Path("sample.wav"), list(result.prompt + result.output), sample_rate)
        err_console.print(f"wrote {path} ({len(result.prompt + result.output) / sample_rate:.2f} s at {sample_rate} Hz, "
                      f"{len(result.output) / sample_rate:.2f} s generated)")
    elif out is not None:
        from haed.checkpoint import write_text_atomic

        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_bytes(result.prompt + result.output)
        tmp.replace(out)
        err_console.print(f"wrote {out}")
    else:
        sys.stdout.write((result.prompt + result.output).decode("utf-8", errors="replace") + "\n")
        sys.stdout.flush()
    err_console.print(f"[dim]{len(result.output):,} {unit} in {result.seconds:.2f} s: "
                  f"{result.bytes_per_second:,.0f} {unit}/s (prefill {result.prefill_seconds * 1e3:.0f} ms, {model_device(model)}"
                  f"{', CUDA graphs' if cuda_graphs and model_device(model).startswith('cuda') else ''})[/]",
                  highlight=False)


def quickstart(
    workdir: Path = typer.Option(Path("."), "--workdir", "-w", help="Where data/stdlib and runs/RECIPE go."),
    recipe: str = typer.Option("tiny", "--recipe", "-r", help=RECIPE_HELP),
    overrides: List[str] = typer.Option([], "--set", help=SET_HELP),
    prompt: str = typer.Option("def ", "--prompt", "-p", help="Prompt of the final sample."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
):
    """The whole pipeline on the offline corpus: prepare, IEM, decoder phase, evaluate, generate.

    Example: haed quickstart   (about 4 minutes on a 2-core CPU, no download)
    """
    from haed.pipeline import quickstart as run_pipeline

    result = run_pipeline(workdir, recipe, overrides, prompt.encode("utf-8"), device, console=console)
    ev = result.evaluation
    console.rule("sample")
    sys.stdout.write((result.sample.prompt + result.sample.output).decode("utf-8", errors="replace") + "\n")
    sys.stdout.flush()
    console.rule()
    console.print(f"[dim]{len(result.sample.output)} bytes at {result.sample.bytes_per_second:,.0f} bytes/s[/]")
    console.print(f"[bold green]test bits per byte: {ev['bits_per_byte']:.4f}[/] over {ev['bytes']:,} bytes "
                  f"({ev['windowing']}); run: {result.run_dir}")


def model_device(model) -> str:
    return str(next(model.parameters()).device)


def register(app: typer.Typer) -> None:
    for name, fn in (("train-iem", train_iem), ("train-decoder", train_decoder), ("train-full", train_full),
                     ("evaluate", evaluate), ("generate", generate), ("quickstart", quickstart)):
        app.command(name)(user_errors(fn))
