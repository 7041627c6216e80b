"""The patch step's Triton kernels alone: microseconds per patch, by program count and stream count.

`haed.kernels.decoder.decoder_kernel` runs a whole patch of the byte decoder in one launch. Its programs meet
at a grid-wide sync between stages (13 per byte at `speech`), and the program count sets both the work
per program and the cost of each sync. This sweeps that count for the recipes' decoder architectures
(random weights), without the encoder or the main model and without torch.compile. So each
configuration costs one Triton compilation (seconds), not an inductor compile (minutes):

    python3 benchmarks/decoder_kernel.py                                   # speech and enwik8, N = 1 and 64
    python3 benchmarks/decoder_kernel.py --recipe speech --streams 1 --programs 16,32,48,64,96,128 --out runs/dk

Per recipe, stream count N and program count: one patch is captured in a CUDA graph (the counter's
reset and the launch) after a warm-up. `--patches` replays are then timed with CUDA synchronisation,
`--repeats` times, and the median is reported in us per patch and per byte. `--stages` also times
the same kernel launched stage by stage (one launch per stage: 13 per byte at `speech`), which does
the same arithmetic without the syncs. `--warps 4,8` sets the warps per program (default: the
kernel's own choice). Sampling is temperature 1 (the kernel draws the bytes).
`--main` also times the rest of a one-stream patch step, the encoder and the main model's step as one
kernel (`haed.kernels.MainKernels`), by `--main-programs` and `--warps`, at position `--position` of a
main-model cache of 1,025 slots (a context of 8,192 bytes); its attention reads positions up to it.
With `--out`, a JSON of every number and the command.

Without CUDA, `TRITON_INTERPRET=1` runs a smoke check of the code path (stage by stage, tiny patch
count; the times mean nothing, and above one stream neither do the bytes: the interpreter's bf16
`tl.dot`, which the kernel uses for blocks of 16 streams, gives wrong numbers):

    TRITON_INTERPRET=1 python3 benchmarks/decoder_kernel.py --recipe speech --streams 1 --programs 2,5 \
        --patches 1 --repeats 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from haed.atomic import write_text_atomic  # noqa: E402
from haed.model import build_model  # noqa: E402
from haed.recipe import load_recipe  # noqa: E402
from haed.samplers import linear_weights_in  # noqa: E402
from haed.sampling import SamplingOptions, StreamNoise  # noqa: E402


def ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of whole numbers, not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"positive whole numbers, not {text!r}")
    return values


def time_patches(run, patches: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds per patch of `run` (one patch), `repeats` times over `patches` patches."""
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(patches):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - start) / patches)
    return out


def graphed(step, device: torch.device):
    """`step` after a first run (which compiles), on CUDA as the replay of its CUDA graph."""
    step()
    if device.type != "cuda":
        return step
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    return graph.replay


def measure_main(model, programs: int, warps: int, args, device) -> dict:
    """The encoder and main model's step as one kernel (`MainKernels`): us per patch."""
    from haed.kernels import MainKernels

    K = model.patch_size
    g = torch.Generator().manual_seed(0)
    cache = model.main.new_cache(1, 1025, device, torch.bfloat16)
    cache.k_layers.copy_(torch.randn(cache.k_layers.shape, generator=g))
    cache.v_layers.copy_(torch.randn(cache.v_layers.shape, generator=g))
    patch = torch.randint(0, 256, (1, 1, K), generator=g, dtype=torch.uint8).to(device)
    position = torch.tensor(args.position, device=device)
    width = model.decoder.token_embedding.embedding_dim
    cond = torch.zeros(1, model.decoder.condition.out_features // width, width, device=device, dtype=torch.bfloat16)
    kernels = MainKernels(model, cache, patch, position, cond, programs=programs, warps=warps)
    seconds = time_patches(graphed(kernels.step, device), args.patches, args.repeats, device)
    us = statistics.median(seconds) * 1e6
    return {
        "part": "encoder and main model",
        "programs": kernels.programs,
        "warps": warps,
        "splits": kernels.splits,
        "position": args.position,
        "us_per_patch": [t * 1e6 for t in seconds],
        "median_us_per_patch": us,
    }


def measure(decoder, batch: int, programs: int, persistent: bool, warps, args, device) -> dict:
    from haed.kernels import DecoderKernels  # imports Triton

    K, dim = decoder.patch_size, decoder.stack.cfg.dim
    g = torch.Generator().manual_seed(0)
    cond_len = K if decoder.conditioning == "add" else 1
    cond = torch.randn(batch, cond_len, dim, generator=g).to(device, torch.bfloat16)
    patch = torch.zeros(batch, 1, K, dtype=torch.uint8, device=device)
    cache = decoder.stack.new_cache(batch, K, device, torch.bfloat16)
    positions = torch.arange(K, device=device)
    noise = StreamNoise(list(range(batch)), device)
    options = SamplingOptions(1.0, 0, 1.0)
    kernels = DecoderKernels(decoder, cache, cond, patch, options, noise, positions, persistent, programs, warps)
    seconds = time_patches(graphed(kernels.patch, device), args.patches, args.repeats, device)
    us = statistics.median(seconds) * 1e6
    return {
        "streams": batch,
        "programs": kernels.programs,
        "persistent": persistent,
        "warps": kernels.warps,
        "us_per_patch": [s * 1e6 for s in seconds],
        "median_us_per_patch": us,
        "median_us_per_byte": us / K,
        "bytes_drawn": patch[0, 0].tolist(),  # a check that something was drawn
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", action="append", help="speech, enwik8 or tiny (repeatable; default speech and enwik8)")
    p.add_argument("--streams", type=ints, default=[1, 64], help="stream counts (default 1,64)")
    p.add_argument("--programs", type=ints, default=[64], help="program counts (default 64; capped at the SM count)")
    p.add_argument("--patches", type=int, default=200, help="patches per timing (default 200)")
    p.add_argument("--repeats", type=int, default=5, help="timings per configuration (default 5)")
    p.add_argument("--stages", action="store_true", help="also time the stage-by-stage launches")
    p.add_argument("--warps", type=ints, default=None, help="warps per program, e.g. 4,8 (default: the kernel's)")
    p.add_argument("--main", action="store_true", help="also time the encoder and main model's step (MainKernels)")
    p.add_argument("--main-programs", type=ints, default=[128], help="MainKernels program counts (default 128)")
    p.add_argument("--position", type=int, default=375, help="the main model's position for --main (default 375)")
    p.add_argument("--out", type=Path, help="write DIR/decoder-kernel.json")
    args = p.parse_args()
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("needs CUDA (or TRITON_INTERPRET=1 for a smoke check of the code path on the CPU)")
    if args.patches < 1 or args.repeats < 1:
        p.error("--patches and --repeats must be at least 1")
    if not 0 <= args.position < 1025:
        p.error("--position must be from 0 to 1024 (the main model's cache has 1,025 slots)")
    return args


def time_recipe(name: str, args: argparse.Namespace, device: torch.device, interpreted: bool) -> dict:
    """Every configuration of one recipe's decoder (and, with --main, its main model's step), printed as it goes."""
    from haed.kernels import config_unsupported_reason, main_unsupported_reason

    recipe = load_recipe(name)
    reason = config_unsupported_reason(recipe.model, device)
    if reason:
        sys.exit(f"{name}: the kernel cannot run this architecture: {reason}")
    torch.manual_seed(0)
    model = linear_weights_in(build_model(recipe.model), torch.bfloat16).to(device).eval()
    cfg = recipe.model.decoder
    runs = []
    modes = [False] if interpreted else [True]
    if args.stages and not interpreted:
        modes.append(False)
    with torch.no_grad():
        for batch in args.streams:
            for programs, warps, persistent in itertools.product(args.programs, args.warps or [None], modes):
                row = measure(model.decoder, batch, programs, persistent, warps, args, device)
                runs.append(row)
                launch = "one" if persistent else "per stage"
                print(
                    f"{name:<8} {batch:>4} {row['programs']:>8} {row['warps']:>5} {launch:<11} "
                    f"{row['median_us_per_patch']:>9.1f} {row['median_us_per_byte']:>8.2f}",
                    flush=True,
                )
        if args.main:
            reason = main_unsupported_reason(model, 1)
            for programs, warps in itertools.product(args.main_programs, args.warps or [4]):
                if reason:
                    print(f"{name:<8} main model: {reason}")
                    break
                row = measure_main(model, programs, warps, args, device)
                runs.append(row)
                print(
                    f"{name:<8} {1:>4} {row['programs']:>8} {warps:>5} {'main model':<11} "
                    f"{row['median_us_per_patch']:>9.1f}",
                    flush=True,
                )
    return {
        "decoder": {"dim": cfg.dim, "layers": cfg.layers, "heads": cfg.heads, "mlp_ratio": cfg.mlp_ratio},
        "patch_size": recipe.model.patch_size,
        "runs": runs,
    }


def main() -> None:
    args = parse_args()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton's interpreter)",
        "torch": torch.__version__,
        "command": " ".join(["benchmarks/decoder_kernel.py", *sys.argv[1:]]),
        "models": {},
    }
    print(f"device: {results['device']}, torch {torch.__version__}")
    print(f"{'recipe':<8} {'N':>4} {'programs':>8} {'warps':>5} {'launch':<11} {'us/patch':>9} {'us/byte':>8}")
    for name in args.recipe or ["speech", "enwik8"]:
        results["models"][name] = time_recipe(name, args, device, interpreted)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out / "decoder-kernel.json", json.dumps(results, indent=1))
        print(f"wrote {args.out / 'decoder-kernel.json'}")


if __name__ == "__main__":
    main()
