"""`haed generate` as a job: every option checked against the run before anything is loaded, the prompt
read (text, or a WAV/FLAC made mu-law), and the outputs written as they are generated (text to stdout
or files, WAVs valid at every moment).
"""

from __future__ import annotations

import codecs
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from haed.atomic import check_writable, remove_quietly, write_bytes_atomic
from haed.checkpoint import read_run_config, select_checkpoint
from haed.device import resolve_device
from haed.errors import HaedError, write_error
from haed.generate import Generation, audio_prompt_bytes, check_counts, generate
from haed.model import HAED
from haed.recipe import Recipe, recipe_from_dict
from haed.runs import load_run, resolve_sampling_run
from haed.sampling import SamplingOptions, check_sampling, stream_seeds

AUDIO_SUFFIXES = (".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".m4a")
TEXT_SUFFIXES = (".txt", ".text", ".md", ".bin")
AUDIO_CHUNK_SECONDS = 0.1  # how often a streamed WAV grows (and its header is rewritten)


def looks_like_audio(path: Path) -> bool:
    """A WAV/FLAC/Ogg/... file, by its name or by its first bytes."""
    if path.suffix.lower() in AUDIO_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(12)
    return (head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE") or head[:4] in (
        b"fLaC",
        b"OggS",
        b"FORM",
    )


def sample_file_names(num_samples: int, suffix: str) -> list[str]:
    """sample-000.wav, sample-001.wav, ... (at least three digits; more when there are over 1,000 streams)."""
    width = max(3, len(str(num_samples - 1)))
    return [f"sample-{i:0{width}d}{suffix}" for i in range(num_samples)]


@dataclass
class GenerationPlan:
    """What `haed generate` will do, every option checked: made by `plan_generation`."""

    kind: str  # "text" or "audio"
    prompt: bytes
    max_bytes: int  # per stream
    sampling: SamplingOptions
    seed: int
    num_samples: int
    stream: bool  # text: write to stdout as it is generated
    outputs: list[Path] | None  # one file per stream; None: text to stdout
    sample_rate: int | None = None
    context_bytes: int = 8192
    run_dir: Path | None = None  # set by prepare_generation
    checkpoint: Path | None = None  # the weights to sample with (set by prepare_generation)
    device: str = "cpu"
    decoder_kernels: bool = False  # the decoder's steps as Triton kernels (`haed.kernels`; CUDA)
    length_option: str = "--max-bytes"  # the option (or recipe field) that set max_bytes

    @property
    def seeds(self) -> list[int]:
        return stream_seeds(self.seed, self.num_samples)

    @property
    def chunk_bytes(self) -> int | None:
        """Bytes per host copy: one patch when streaming text, about 0.1 s of audio, else all at the end."""
        if self.kind == "audio":
            return max(1, int(self.sample_rate * AUDIO_CHUNK_SECONDS))
        return None


def plan_generation(
    recipe: Recipe,
    dataset: dict,
    prompt: str | None = None,
    prompt_file: Path | None = None,
    out: Path | None = None,
    max_bytes: int | None = None,
    seconds: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    num_samples: int = 1,
    stream: bool = False,
) -> GenerationPlan:
    """Check every option of `haed generate` against the run (a HaedError names the first bad one) and
    read the prompt. Options left as None take the recipe's [generate] values, which are checked too."""
    g = recipe.generate
    kind = dataset.get("kind", "text")
    sample_rate = dataset.get("sample_rate")

    def pick(value, option, field_name):
        return (
            (value, option)
            if value is not None
            else (getattr(g, field_name), f"generate.{field_name} of the run's recipe")
        )

    temperature, t_name = pick(temperature, "--temperature", "temperature")
    top_k, k_name = pick(top_k, "--top-k", "top_k")
    top_p, p_name = pick(top_p, "--top-p", "top_p")
    sampling = check_sampling(temperature, top_k, top_p, {"temperature": t_name, "top_k": k_name, "top_p": p_name})
    if prompt is not None and prompt_file is not None:
        raise HaedError("give --prompt or --prompt-file, not both")
    if seconds is not None and max_bytes is not None:
        raise HaedError("give --seconds or --max-bytes, not both")
    if seconds is not None:
        if kind != "audio":
            raise HaedError("--seconds is for audio runs: this is a text run, give --max-bytes")
        if not math.isfinite(seconds) or seconds <= 0:
            raise HaedError(f"--seconds must be positive, got {seconds}")
        n, n_name = int(seconds * sample_rate), "--seconds"
        if n < 1:
            raise HaedError(f"--seconds {seconds} is less than one sample at {sample_rate} Hz")
    else:
        n, n_name = pick(max_bytes, "--max-bytes", "max_bytes")
    check_counts(n, num_samples, {"max_bytes": n_name, "num_samples": "--num-samples"})
    outputs = _output_paths(kind, out, num_samples, stream)

    if kind == "audio":
        if prompt is not None:
            raise HaedError("this is an audio run: give the prompt as --prompt-file a.wav")
        prompt_bytes = audio_prompt_bytes(prompt_file, sample_rate) if prompt_file is not None else b""
    elif prompt_file is not None:
        prompt_file = Path(prompt_file)
        if prompt_file.is_dir():
            raise HaedError(f"prompt file {prompt_file} is a folder, not a file")
        if not prompt_file.is_file():
            raise HaedError(f"prompt file {prompt_file} does not exist")
        if looks_like_audio(prompt_file):
            raise HaedError(f"{prompt_file} is an audio file, but this is a text run: audio prompts are for audio runs")
        prompt_bytes = prompt_file.read_bytes()
    else:
        prompt_bytes = (prompt or "").encode("utf-8")
    s, s_name = pick(seed, "--seed", "seed")
    if isinstance(s, bool) or not isinstance(s, int):
        raise HaedError(f"{s_name} must be an integer, got {s!r}")
    return GenerationPlan(
        kind=kind,
        prompt=prompt_bytes,
        max_bytes=n,
        sampling=sampling,
        seed=s,
        num_samples=num_samples,
        stream=stream,
        outputs=outputs,
        sample_rate=sample_rate,
        context_bytes=recipe.data.seq_len,
        length_option=n_name,
    )


def _output_paths(kind: str, out: Path | None, num_samples: int, stream: bool) -> list[Path] | None:
    """One file per stream. One stream: `out` is the file (audio default sample.wav; text default
    stdout). Several: `out` is a folder (audio default: the current one) of sample-000.EXT ..."""
    suffix = ".wav" if kind == "audio" else ".txt"
    if kind == "text" and stream:
        if out is not None:
            raise HaedError("--stream writes the text to stdout: leave out --out")
        if num_samples > 1:
            raise HaedError("--stream writes one stream to stdout: use --num-samples 1, or --out DIR for many")
    if out is None and kind == "text":
        return None
    if num_samples == 1:
        path = Path(out) if out is not None else Path("sample.wav")
        if path.is_dir():
            raise HaedError(
                f"--out {path} is a folder: one sample is written to a file (a folder is for --num-samples > 1)"
            )
        return [path]
    folder = Path(out) if out is not None else Path(".")
    if folder.exists() and not folder.is_dir():
        raise HaedError(
            f"with --num-samples {num_samples}, --out names a folder for {sample_file_names(1, suffix)[0]} ...: "
            f"{folder} is a file"
        )
    if not folder.exists() and folder.suffix.lower() in AUDIO_SUFFIXES + TEXT_SUFFIXES:
        raise HaedError(
            f"with --num-samples {num_samples}, --out names a folder for {sample_file_names(1, suffix)[0]} ..., "
            f"not a file name like {folder}"
        )
    return [folder / name for name in sample_file_names(num_samples, suffix)]


def text_blocks(prompt: bytes, outputs: list[bytes], seeds: list[int]) -> str:
    """Prompt + sample as text, one block per stream; several streams each under a header line
    `--- sample I (seed S) ---`, blocks separated by a blank line."""
    texts = [(prompt + output).decode("utf-8", errors="replace") + "\n" for output in outputs]
    if len(texts) == 1:
        return texts[0]
    return "\n".join(f"--- sample {i} (seed {s}) ---\n{text}" for i, (s, text) in enumerate(zip(seeds, texts)))


@dataclass
class RunGeneration:
    plan: GenerationPlan
    result: Generation
    cuda_graphs: bool  # whether CUDA graphs were used
    compiled: bool = False  # whether the whole-patch step was compiled (hierarchical models only)
    decoder_kernels: bool = False  # whether the decoder ran as Triton kernels (`haed.kernels`)
    files: list[Path] = field(default_factory=list)

    @property
    def real_time_factor(self) -> float | None:
        """Audio: seconds of audio generated per wall-clock second, per stream."""
        if self.plan.kind != "audio":
            return None
        return self.result.bytes_per_second_per_stream / self.plan.sample_rate


def prepare_generation(
    run: Path,
    device: str = "auto",
    checkpoint: str = "best",
    decoder_kernels: bool = False,
    allow_unverified: bool = False,
    **options,
) -> GenerationPlan:
    """`haed generate`, part 1: find the run and its checkpoint ("best", "last" or "step-N"), check every
    option against it (`plan_generation`) and the device, read the prompt. Nothing is loaded or written
    yet, so bad input fails at once, cleanly: a length the device cannot hold, outputs that cannot be
    written or do not fit on the disk. `decoder_kernels=True` where the Triton decoder kernels cannot run
    (`haed.kernels`) is refused here, with the reason. `allow_unverified`: sample from a checkpoint that
    cannot be verified (no manifest, no digest), with a warning, instead of refusing it."""
    run_dir = resolve_sampling_run(Path(run))
    config = read_run_config(run_dir)
    chosen = select_checkpoint(run_dir, checkpoint, allow_unverified)
    recipe = recipe_from_dict(config["recipe"])
    if recipe.model.arch == "megabyte":
        raise HaedError(
            f"{run_dir} is a MEGABYTE-pytorch run (a comparison's peer): haed samples its own models; "
            "use that package's own generate"
        )
    plan = plan_generation(recipe, config["dataset"], **options)
    plan.run_dir, plan.checkpoint, plan.device = run_dir, chosen, str(resolve_device(device))
    check_room(plan)
    if decoder_kernels:
        from haed.kernels import config_unsupported_reason  # imports Triton where it is installed

        reason = config_unsupported_reason(recipe.model, torch.device(plan.device))
        if reason is not None:
            raise HaedError(f"--decoder-kernels: the Triton decoder kernels cannot run here: {reason}")
    plan.decoder_kernels = decoder_kernels
    return plan


def _available_memory(device: torch.device) -> int:
    """Bytes that `device` can still give: free GPU memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_room(plan: GenerationPlan) -> None:
    """Refuse, before anything loads, a length that the device cannot hold and outputs that cannot be
    written: a folder that refuses files, or a disk without room for them."""
    streams, per_stream = plan.num_samples, len(plan.prompt) + plan.max_bytes
    device = torch.device(plan.device)
    need = plan.max_bytes * streams + (0 if device.type == "cuda" else 3 * per_stream * streams)
    if need > _available_memory(device):
        raise HaedError(
            f"{plan.length_option} {plan.max_bytes:,} for {streams} stream{'s' * (streams > 1)} needs about "
            f"{need / 1e9:,.1f} GB of memory; {device} has {_available_memory(device) / 1e9:,.1f} GB available: "
            "generate less"
        )
    if plan.outputs:
        size = (44 + 2 * per_stream) if plan.kind == "audio" else per_stream
        check_writable(plan.outputs[0], size * streams, "output")


def _open_wavs(plan: GenerationPlan) -> list:
    """One streamed WAV per output, each holding the prompt; none is left if one cannot be written."""
    from haed.audio import WavWriter

    writers = []
    try:
        for path in plan.outputs:
            writers.append(WavWriter(path, plan.sample_rate))
            writers[-1].write(np.frombuffer(plan.prompt, dtype=np.uint8))
    except Exception:
        for writer in writers:
            writer.abort()
        raise
    return writers


def _write_texts(plan: GenerationPlan, outputs: list[bytes]) -> list[Path]:
    """Prompt + sample into each output file, atomically: all the streams' files, or none."""
    written = []
    try:
        for path, output in zip(plan.outputs, outputs):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, plan.prompt + output)
            written.append(path)
    except (OSError, HaedError) as e:
        for path in written:
            remove_quietly(path)
        raise write_error(path.parent, e) if isinstance(e, OSError) else e from None
    return list(plan.outputs)


def run_generation(
    plan: GenerationPlan, cuda_graphs: bool = True, progress=None, stdout=None, compile: bool = False
) -> RunGeneration:
    """`haed generate`, part 2: load the run's model, sample, write the outputs.

    `compile`: torch.compile the whole-patch step (`haed.generate.generate`'s `compile`).

    Text goes to `stdout` (a text stream; with `plan.stream` one patch at a time, else all at the end,
    several streams as separated blocks) or to files written atomically at the end. WAV files are
    written as they are generated: valid at every moment, their header rewritten after each chunk.
    """
    dev = torch.device(plan.device)
    model, _, _ = load_run(plan.run_dir, dev, plan.checkpoint)
    files: list[Path] = []
    writers = []
    on_chunk = None
    if plan.kind == "audio":
        writers = _open_wavs(plan)
        files = list(plan.outputs)

        def on_chunk(parts: list[bytes]) -> None:
            for writer, part in zip(writers, parts):
                writer.write(np.frombuffer(part, dtype=np.uint8))
    elif plan.outputs is None and plan.stream:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stdout.write(decoder.decode(plan.prompt))
        stdout.flush()

        def on_chunk(parts: list[bytes]) -> None:
            stdout.write(decoder.decode(parts[0]))
            stdout.flush()

    failed = True
    try:
        result = generate(
            model,
            plan.prompt,
            plan.max_bytes,
            plan.sampling.temperature,
            plan.sampling.top_k,
            plan.sampling.top_p,
            plan.seed,
            plan.context_bytes,
            progress=progress,
            cuda_graphs=cuda_graphs,
            num_samples=plan.num_samples,
            on_chunk=on_chunk,
            chunk_bytes=plan.chunk_bytes,
            compile=compile,
            decoder_kernels=plan.decoder_kernels,
        )
        failed = False
    except KeyboardInterrupt:  # the WAVs hold what was generated so far, each one valid: kept
        failed = False
        raise
    finally:
        for writer in writers:
            writer.abort() if failed else writer.close()  # a failed write leaves no partial WAV
    if plan.kind == "text":
        if plan.outputs is not None:
            files = _write_texts(plan, result.outputs)
        elif plan.stream:
            stdout.write(decoder.decode(b"", final=True) + "\n")
            stdout.flush()
        else:
            stdout.write(text_blocks(plan.prompt, result.outputs, result.seeds))
            stdout.flush()
    return RunGeneration(
        plan=plan,
        result=result,
        cuda_graphs=cuda_graphs and dev.type == "cuda",
        compiled=compile and isinstance(model, HAED),
        decoder_kernels=result.decoder_kernels,
        files=files,
    )
