"""Generation speed: samples/s for one stream and for batches of streams, with and without CUDA graphs.

Models are the recipes' architectures with random weights (speed does not depend on the values),
`--recipe NAME` (default: tiny, enwik8 and speech), and/or `--model NAME=PATH`, where PATH is a run
directory (`haed train-*` output, its best checkpoint) or a run's config.json alone (random weights of
that run's architecture).

    python3 benchmarks/generation_speed.py                          # on CUDA: every recipe, N = 1, 8, 64
    python3 benchmarks/generation_speed.py --device cpu --recipe tiny --bytes 64 --repeats 1   # smoke run
    python3 benchmarks/generation_speed.py --model audio=runs/speech --out generation --wav audio

Per model, mode and stream count N: a warm-up generation (which captures the graphs for that batch
shape), then `--bytes` bytes per stream timed
with CUDA synchronisation, `--repeats` times; the median aggregate samples/s (all streams) and per
stream. Sampling is the library's (`haed.generate.generate`): temperature 1, no top-k / top-p.
Modes (`--modes`): `patch-kernels`, the decoder's steps as Triton kernels (`haed.kernels`) and the
encoder and main model's step as one too for one stream where `MainKernels` supports the model (else
through torch.compile), one CUDA graph per patch (`haed generate --compile --decoder-kernels`);
`patch-compiled`, the whole patch step through torch.compile, then one CUDA graph per patch (`haed
generate --compile`); `patch-graphs`, one CUDA graph per patch with the sampling inside (the default
of `haed generate`); `byte-graphs`, one graph per decoder step with the sampling between replays;
`eager`, the same steps without graphs (all a CPU has).
With `--out`, a JSON of every number, and a sample per model (`--wav NAME`: a WAV at its rate).
With `--count-ops`, the operators one whole-patch step dispatches (aten operators other than views, as
dispatched on `--device`: on CUDA nearly one kernel each, on a CPU some are split up, e.g. RMSNorm
into five), counted without graphs: a proxy for kernel launches that runs on any machine:

    python3 benchmarks/generation_speed.py --device cpu --recipe speech --recipe enwik8 --count-ops

With `--profile`, also a `torch.profiler` table per model and mode of one stream generating 4 patches
in its steady state, after the prefill, the graph modes' steps launched without their graphs so that
every kernel is seen (`--out`/profile-NAME-MODE.txt; the top
rows are printed), with the kernels and device time per patch on CUDA: where a patch's time goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from haed.atomic import write_text_atomic  # noqa: E402
from haed.generate import generate  # noqa: E402
from haed.model import build_model  # noqa: E402
from haed.recipe import load_recipe, recipe_from_dict  # noqa: E402
from haed.runs import load_run, resolve_sampling_run  # noqa: E402

TEXT_PROMPT = b"<page>\n    <title>"


def load(path: Path, device):
    """(model, recipe, config, what the weights are)."""
    if path.is_file():
        config = json.loads(path.read_text())
        recipe = recipe_from_dict(config["recipe"])
        torch.manual_seed(0)
        return build_model(recipe.model).to(device).eval(), recipe, config, "random weights of the run's architecture"
    model, recipe, config = load_run(resolve_sampling_run(path), device)
    return model, recipe, config, f"trained weights ({config['checkpoint']})"


def load_recipe_model(name: str, device):
    """Random weights of a recipe's architecture; audio when the recipe is `speech`."""
    recipe = load_recipe(name)
    torch.manual_seed(0)
    kind = "audio" if name == "speech" else "text"
    config = {"recipe": recipe.to_dict(), "dataset": {"kind": kind, "sample_rate": 8000 if kind == "audio" else None}}
    return build_model(recipe.model).to(device).eval(), recipe, config, f"random weights of the {name} recipe"


MODES = {  # (graphs, whole patches, compiled patch step, the decoder as Triton kernels)
    "patch-kernels": (True, True, True, True),
    "patch-compiled": (True, True, True, False),
    "patch-graphs": (True, True, False, False),
    "byte-graphs": (True, False, False, False),
    "eager": (False, None, False, False),
}


def warmed_up(model, prompt: bytes, mode: str, streams: int, context: int, cuda_graphs: bool | None = None) -> dict:
    """The `generate` options of a mode (temperature 1, no top-k / top-p), after a warm-up generation
    with them (which captures the graphs for that batch shape). `cuda_graphs=False`: the mode's steps
    without their graphs."""
    graphs, whole, compiled, kernels = MODES[mode]
    graphs = graphs if cuda_graphs is None else cuda_graphs
    options = dict(
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        context_bytes=context,
        cuda_graphs=graphs,
        num_samples=streams,
        whole_patches=whole,
        compile=compiled,
        decoder_kernels=kernels,
    )
    generate(model, prompt, 3 * getattr(model, "patch_size", 1) + 3, seed=0, **options)
    return options


def time_generation(model, prompt: bytes, n: int, streams: int, mode: str, repeats: int, context: int) -> dict:
    options = warmed_up(model, prompt, mode, streams, context)
    runs = [generate(model, prompt, n, seed=1000 * r, **options) for r in range(repeats)]
    rates = [g.bytes_per_second for g in runs]
    median = statistics.median(rates)
    return {
        "streams": streams,
        "bytes_per_stream": n,
        "samples_per_second": rates,
        "median_samples_per_second": median,
        "median_per_stream": median / streams,
        "ms_per_step": 1e3 * streams / median,
        "prefill_seconds": [g.prefill_seconds for g in runs],
        "main_kernels": runs[0].main_kernels,  # the encoder and main model's step as one Triton kernel
    }


def profile_generation(model, prompt: bytes, mode: str, context: int, rows: int = 60) -> str:
    """The profiler table (by device time on CUDA, else host time) of one stream's steady state: 4 patches
    after the prefill and 2 more patches (each delivered chunk of one patch is one profiler step).

    A graph mode is profiled with the same steps launched without their CUDA graphs: the profiler does
    not reliably see the kernels inside a replay (on an H200 it listed none for some graphs), while the
    kernels and their device times are the ones a replay runs. What a replay saves, the launches, is in
    the timing, not here."""
    from torch.profiler import ProfilerActivity, profile, schedule

    graphs = MODES[mode][0]
    options = warmed_up(model, prompt, mode, 1, context, cuda_graphs=False)
    cuda = next(model.parameters()).device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    K = getattr(model, "patch_size", 1)
    with profile(activities=activities, schedule=schedule(wait=2, warmup=1, active=4)) as prof:
        generate(model, prompt, 8 * K, seed=1, on_chunk=lambda parts: prof.step(), chunk_bytes=K, **options)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    summary = ""
    if cuda:
        from torch.autograd import DeviceType

        # Kernels only: the profiler also puts each step's annotation (ProfilerStep*) on the device's
        # timeline, which spans the whole step (the table's "Self CUDA time total" leaves it out too).
        kernels = [
            e
            for e in averages
            if e.device_type == DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)
            and not e.key.startswith("ProfilerStep")
        ]
        busy_us = sum(e.self_device_time_total for e in kernels) / 4
        summary = f"per patch: {sum(e.count for e in kernels) / 4:.0f} kernels, {busy_us:.0f} us of device time"
        summary += " (the same steps without their CUDA graphs)\n" if graphs else "\n"
    return summary + averages.table(sort_by=key, row_limit=rows, max_name_column_width=70)


# Operators that only reinterpret memory (no kernel on any device).
VIEW_OPERATORS = frozenset(
    "view _unsafe_view reshape expand permute transpose t select slice unsqueeze squeeze alias detach "
    "as_strided split chunk unbind split_with_sizes _reshape_alias lift_fresh unfold flatten".split()
)


def count_patch_operators(model, context: int) -> dict:
    """The operators of one steady-state whole-patch step (one stream, the benchmark's rule: temperature
    1, no top-k or top-p), by name, views left out."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from haed.device import autocast
    from haed.samplers import make_sampler
    from haed.sampling import SamplingOptions, StreamNoise

    class Counting(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in VIEW_OPERATORS:
                self.counts[name] += 1
            return func(*args, **(kwargs or {}))

    device = next(model.parameters()).device
    K = model.patch_size
    with autocast(device), torch.no_grad():
        sampler = make_sampler(model, context, cuda_graphs=False, batch=1)
        sampler.set_sampling(SamplingOptions(1.0, 0, 1.0), StreamNoise([0], device))
        sampler.start(torch.zeros(4 * K, dtype=torch.uint8))
        sampler.sample_patch(4 * K)  # one patch first: the step counted is a steady-state one
        with Counting() as counting:
            sampler._patch_step()
    total = sum(counting.counts.values())
    return {"per_patch": total, "per_byte": total / K, "by_name": dict(counting.counts.most_common())}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--recipe", action="append", default=[], help="a recipe whose architecture to time, random weights (repeatable)"
    )
    p.add_argument(
        "--model", action="append", default=[], help="NAME=PATH: a run directory or a run's config.json (repeatable)"
    )
    p.add_argument("--streams", default="1,8,64", help="stream counts N, comma-separated")
    p.add_argument("--bytes", type=int, default=2000, help="bytes (samples) per stream, with CUDA graphs")
    p.add_argument(
        "--eager-bytes", type=int, default=None, help="bytes per stream without graphs (default: --bytes / 4)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--out", type=Path, default=None, help="folder for generation.json and samples")
    p.add_argument("--wav", action="append", default=[], help="NAME of a model to write a WAV sample of (with --out)")
    p.add_argument("--wav-seconds", type=float, default=3.0)
    p.add_argument(
        "--wav-budget-s", type=float, default=40.0, help="shorten the WAV to what this many seconds generate"
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile", action="store_true", help="also a profiler table per model and mode (see above)")
    p.add_argument(
        "--count-ops", action="store_true", help="only count the operators of one patch step per model (see above)"
    )
    return p.parse_args(argv)


def prompt_for(entry: dict) -> bytes:
    """What generation starts from: nothing for audio, TEXT_PROMPT for text."""
    return b"" if entry["kind"] == "audio" else TEXT_PROMPT


def time_model(name: str, model, recipe, entry: dict, a, modes: list[str], streams: list[int], device) -> None:
    """Every mode at every stream count: one printed line and one row of `entry["runs"]` each."""
    prompt = prompt_for(entry)
    for mode in modes:
        graphs, whole, compiled, kernels = MODES[mode]
        # Without graphs on CUDA a step is much slower: time fewer bytes (on a CPU eager is all there is).
        n = (
            a.bytes
            if graphs or device.type != "cuda"
            else (a.eager_bytes or max(4 * recipe.model.patch_size, a.bytes // 4))
        )
        for N in streams:
            row = {
                "mode": mode,
                "cuda_graphs": graphs,
                "whole_patches": whole,
                "compiled": compiled,
                "decoder_kernels": kernels,
                **time_generation(model, prompt, n, N, mode, a.repeats, entry["context_bytes"]),
            }
            entry["runs"].append(row)
            print(
                f"{name:<10} {mode:<14} {N:>4} "
                f"{row['median_samples_per_second']:>12,.0f} "
                f"{row['median_per_stream']:>11,.0f} {row['ms_per_step']:>8.3f}",
                flush=True,
            )


def write_sample(name: str, model, config: dict, entry: dict, a, streams: list[int]) -> None:
    """Into `--out`: a WAV of an audio model named by `--wav` (as long as its speed allows within the budget),
    or 600 bytes of a text model's continuation of the prompt."""
    context = entry["context_bytes"]
    if entry["kind"] == "text":
        g = generate(model, TEXT_PROMPT, 600, seed=1, temperature=0.8, top_p=0.95, context_bytes=context)
        (a.out / f"{name}-sample.bin").write_bytes(g.prompt + g.output)
        return
    if name not in a.wav:
        return
    from haed.audio import write_wav

    sample_rate = config["dataset"].get("sample_rate")
    rate = max(r["median_per_stream"] for r in entry["runs"] if r["streams"] == 1) if 1 in streams else 1000.0
    seconds = min(a.wav_seconds, max(2.0, rate * a.wav_budget_s / sample_rate))  # at least 2 s, else within the budget
    g = generate(model, b"", int(seconds * sample_rate), seed=1, temperature=1.0, top_p=1.0, context_bytes=context)
    write_wav(a.out / f"{name}-sample.wav", list(g.output), sample_rate)
    entry["wav"] = {
        "file": f"{name}-sample.wav",
        "seconds_of_audio": len(g.output) / sample_rate,
        "samples_per_second": g.bytes_per_second,
    }


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here (use --device cpu for a smoke run)")
    streams = [int(s) for s in a.streams.split(",") if s.strip()]
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        sys.exit(f"error: unknown mode {unknown[0]!r}: one of {', '.join(MODES)}")
    if device.type != "cuda":
        modes = ["eager"]  # CUDA graphs exist only on CUDA: the eager steps are all there is
    sources = [(name, "recipe", name) for name in a.recipe] + [
        (*spec.split("=", 1)[:1], "path", spec.split("=", 1)[1]) for spec in a.model
    ]
    if not sources:
        sources = [(name, "recipe", name) for name in ("tiny", "enwik8", "speech")]
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": " ".join(sys.argv if argv is None else ["benchmarks/generation_speed.py", *argv]),
        "models": {},
    }
    print(f"device: {results['device']}, torch {torch.__version__}")
    if not a.count_ops:
        print(f"{'model':<10} {'mode':<14} {'N':>4} {'samples/s':>12} {'per stream':>11} {'ms/byte':>8}")
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
    for name, how, what in sources:
        model, recipe, config, weights = (
            load_recipe_model(what, device) if how == "recipe" else load(Path(what), device)
        )
        context = recipe.data.seq_len
        if a.count_ops:
            if not hasattr(model, "patch_size"):
                sys.exit(f"error: --count-ops counts a HAED model's patch step; {name} is flat")
            counted = count_patch_operators(model, context)
            results["models"][name] = {"source": what, "operators": counted}
            top = ", ".join(f"{k} {v}" for k, v in list(counted["by_name"].items())[:8])
            per_patch, per_byte = counted["per_patch"], counted["per_byte"]
            print(f"{name}: {per_patch} operators per patch, {per_byte:.1f} per byte ({top}, ...)")
            continue
        entry = {
            "source": what,
            "weights": weights,
            "kind": "audio" if config["dataset"].get("kind") == "audio" else "text",
            "patch_size": recipe.model.patch_size,
            "context_bytes": context,
            "model": config["recipe"]["model"],
            "runs": [],
        }
        time_model(name, model, recipe, entry, a, modes, streams, device)
        if a.profile:
            for mode in modes:
                table = profile_generation(model, prompt_for(entry), mode, context)
                print(f"-- profile: {name}, {mode}, 1 stream, 4 patches\n" + "\n".join(table.splitlines()[:14]))
                if a.out is not None:
                    write_text_atomic(a.out / f"profile-{name}-{mode}.txt", table)
        if a.out is not None:
            write_sample(name, model, config, entry, a, streams)
        results["models"][name] = entry
        del model
    if a.out is not None:
        write_text_atomic(a.out / "generation.json", json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
