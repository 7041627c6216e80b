"""The peer measurement: lucidrains/MEGABYTE-pytorch (MEGABYTE-pytorch==0.3.6) trained like haed's cells.

Same windows (haed's WindowSource, same seed: step i of a cell sees the same bytes as haed's cell),
same per-cell measurement (haed.profile.measure_cell: peak memory reset per cell, warm-up steps
untimed, median of the timed steps between torch.cuda.synchronize() calls, OOM caught and
reported), bf16 autocast, fused AdamW, gradient clipping at 1.0, and the same JSON field names, with
objective "megabyte-peer", so that `haed profile-memory --merge` puts it beside haed's objectives.

Matched configuration (haed's enwik8 recipe): a 12-layer 768-wide global model over patches of 8
bytes and a 4-layer 256-wide local model (83.1M parameters), MEGABYTE's own defaults otherwise (8
heads of 64, feed-forward x4, flash_attn=True, no absolute position embeddings).

On a CUDA machine (see benchmarks/README.md):

    pip install MEGABYTE-pytorch==0.3.6
    python benchmarks/megabyte_peer.py --data data/enwik8 --seq-lens 2048,4096,8192,16384 \
        --batch-sizes 4,8,16 --json megabyte-peer.json

Needs `MEGABYTE-pytorch==0.3.6` and its dependencies (beartype, einops, packaging, tqdm).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing haed
    sys.path.insert(0, str(REPO))

from haed import peer  # noqa: E402
from haed.data import open_dataset  # noqa: E402
from haed.device import autocast  # noqa: E402
from haed.errors import HaedError  # noqa: E402
from haed.profile import (  # noqa: E402
    DEFAULT_PEAK_TFLOPS,
    SCHEMA,
    WindowSource,
    add_fraction_of_peak,
    command_line,
    describe_cell,
    environment,
    measure_cell,
    profile_device,
    write_profile_json,
)
from haed.steps import to_device  # noqa: E402

OBJECTIVE = "megabyte-peer"
PACKAGE, VERSION = peer.PACKAGE, peer.VERSION


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
    return values


def arguments(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="haed dataset directory (its train split) or a raw byte file such as enwik8 or train.bin; "
        "default: random bytes",
    )
    p.add_argument("--seq-lens", type=parse_ints, default=[8192], help="comma-separated window lengths in bytes")
    p.add_argument("--batch-sizes", type=parse_ints, default=[4, 8, 16], help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per cell (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps per cell first")
    p.add_argument("--device", default="auto", help="auto/cuda (memory measured) or cpu (timed only)")
    p.add_argument("--json", type=Path, default=Path("megabyte-peer.json"), help="where to write the results")
    p.add_argument("--global-dim", type=int, default=768)
    p.add_argument("--global-layers", type=int, default=12)
    p.add_argument("--local-dim", type=int, default=256)
    p.add_argument("--local-layers", type=int, default=4)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--heads", type=int, default=8, help="MEGABYTE's default")
    p.add_argument("--dim-head", type=int, default=64, help="MEGABYTE's default")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--no-flash", action="store_true", help="flash_attn=False (MEGABYTE's own einsum attention)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (off: the peer as published)")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--params-only", action="store_true", help="print the parameter count (built on the CPU) and exit")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    bad = [n for n in args.seq_lens if n % args.patch_size]
    if bad:
        p.error(f"sequence lengths must be multiples of --patch-size {args.patch_size}: {bad}")
    return args


def build(args, seq_len: int):
    MEGABYTE = peer.megabyte_class()
    patches = max(1, seq_len // args.patch_size)
    return MEGABYTE(
        num_tokens=256,
        dim=(args.global_dim, args.local_dim),
        depth=(args.global_layers, args.local_layers),
        max_seq_len=(patches, args.patch_size),
        dim_head=args.dim_head,
        heads=args.heads,
        flash_attn=not args.no_flash,
    )


def step_flops(model, args, batch_size: int, seq_len: int) -> float:
    """Matrix FLOPs of one training step, counted as haed.profile.step_flops counts haed's (haed.peer)."""
    return 3.0 * peer.forward_flops(model, args.patch_size, batch_size, seq_len)


def window_source(path: Path | None, seed: int) -> WindowSource:
    if path is None:
        return WindowSource(None, seed)
    if path.is_dir():
        return WindowSource(open_dataset(path).split("train"), seed, f"train split of {path}", str(path))
    if path.is_file():
        data = np.memmap(path, dtype=np.uint8, mode="r")
        return WindowSource(data, seed, f"bytes of {path}", str(path))
    raise HaedError(f"--data {path} does not exist")


def peer_cell(args, seq_len: int, batch_size: int, device: torch.device, source: WindowSource) -> dict:
    cuda = device.type == "cuda"

    def setup():
        if args.compile and cuda:
            torch._dynamo.reset()
        torch.manual_seed(args.seed)
        model = build(args, seq_len).to(device).train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, **({"fused": True} if cuda else {})
        )
        runner = torch.compile(model) if args.compile and cuda else model
        return model, runner, optimizer

    def make_batch(i):
        x = to_device(source.windows(i, batch_size, seq_len), device).long()
        return x, {}

    def step(state, x):
        model, runner, optimizer = state
        with autocast(device):
            loss = runner(x, return_loss=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.detach()}

    cell = measure_cell(
        OBJECTIVE,
        seq_len,
        batch_size,
        setup=setup,
        step=step,
        make_batch=make_batch,
        device=device,
        steps=args.steps,
        warmup=args.warmup,
    )
    cell["compiled"] = bool(args.compile and cuda)
    cell["candidates_mean"] = None
    cell["distinct_patches_mean"] = None
    if cell["status"] == "ok":
        with torch.device("meta"):
            meta = build(args, seq_len)
        cell["flops_per_step"] = step_flops(meta, args, batch_size, seq_len)
        cell["achieved_tflops"] = cell["flops_per_step"] / (cell["median_step_ms"] / 1e3) / 1e12
    else:
        cell["flops_per_step"] = cell["achieved_tflops"] = None
    add_fraction_of_peak(cell, args.peak_tflops if cuda else None)
    return cell


def run(args) -> dict:
    with torch.device("meta"):
        counts = peer.parameter_counts(build(args, max(args.seq_lens)))
    if args.params_only:
        print(f"{PACKAGE} {VERSION}: {counts['total']:,} parameters ({counts['total'] / 1e6:.2f}M): {counts}")
        return {"parameters": {OBJECTIVE: counts}}
    device = profile_device(args.device)
    source = window_source(args.data, args.seed)
    env = environment(device, args.compile)
    env["megabyte_pytorch"] = VERSION
    result = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "environment": env,
        "recipe": None,
        "model": {
            "name": f"lucidrains/{PACKAGE}",
            "version": VERSION,
            "num_tokens": 256,
            "dim": [args.global_dim, args.local_dim],
            "depth": [args.global_layers, args.local_layers],
            "patch_size": args.patch_size,
            "heads": args.heads,
            "dim_head": args.dim_head,
            "flash_attn": not args.no_flash,
            "optimizer": f"AdamW (fused on CUDA), betas (0.9, 0.95), weight decay 0.1, lr {args.lr}, grad clip 1.0",
        },
        "data": source.description,
        "dataset": source.path,
        "settings": {
            "objectives": [OBJECTIVE],
            "seq_lens": sorted(args.seq_lens),
            "batch_sizes": sorted(args.batch_sizes),
            "steps": args.steps,
            "warmup": args.warmup,
            "seed": args.seed,
            "grad_accum": 1,
            "peak_tflops": args.peak_tflops,
        },
        "parameters": {OBJECTIVE: counts},
        "cells": [],
        "ratios": [],
        "max_context": None,
    }
    grid = [(n, b) for b in sorted(args.batch_sizes) for n in sorted(args.seq_lens)]
    from haed_cli.common import TaskDisplay  # the CLI's renderer of sweep events

    with TaskDisplay() as display:
        emit = (lambda event: None) if args.no_progress else display
        emit({"event": "start", "label": OBJECTIVE, "total": len(grid)})
        for seq_len, batch_size in grid:
            emit({"event": "task", "label": f"{OBJECTIVE} seq {seq_len} batch {batch_size}"})
            if source.max_len is not None and source.max_len < seq_len:
                raise HaedError(f"{source.path} has {source.max_len:,} bytes, fewer than seq_len {seq_len:,}")
            cell = peer_cell(args, seq_len, batch_size, device, source)
            result["cells"].append(cell)
            emit({"event": "done", "text": describe_cell(cell)})
    return result


def main(argv=None) -> int:
    args = arguments(argv)
    try:
        result = run(args)
    except HaedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.params_only:
        return 0
    from rich.console import Console

    from haed_cli.profile import cells_table

    Console().print(
        cells_table(
            result,
            title=f"{PACKAGE} {VERSION} ({result['parameters'][OBJECTIVE]['total'] / 1e6:.1f}M "
            f"parameters) on {result['environment']['gpu'] or 'CPU'}, {result['data']}",
        )
    )
    write_profile_json(result, args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
