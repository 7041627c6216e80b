"""Matrix FLOPs per optimizer step of each objective, and what they allow: the ceiling of IEM's speed-up.

IEM's step leaves out most of the byte decoder and adds the sampled softmax's scores, so where the
decoder is a small share of full training's step, IEM cannot be much faster however well it runs. This
prints, for a recipe (and `--set` variants) over sequence lengths, the FLOPs per step of full training,
IEM and the decoder phase (haed's convention: `haed.profile.flops.FLOPS_CONVENTION`), each part's share,
and full / IEM: the speed-up IEM would reach at equal FLOP throughput. The encoder and the candidates run
on the distinct patches of a batch, counted on real windows of `--dataset` (random bytes without one).
No GPU and no training: the models are built on the meta device.

    python benchmarks/step_flops.py --recipe code --dataset data/code
    python benchmarks/step_flops.py --recipe code --dataset data/code \
        --variant dec512:model.decoder.dim=512,model.decoder.heads=8

A phase's recomputation (`iem.recompute=main`, `full.recompute=decoder`, ...) runs stacks' forward passes
again: the "with recomputation" columns add them (the FLOPs the GPU does, not the model's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing haed
    sys.path.insert(0, str(REPO))

from haed.config import recompute_stacks  # noqa: E402
from haed.model import build_model, forward_flops  # noqa: E402
from haed.objectives import get_objective  # noqa: E402
from haed.profile.flops import step_flops  # noqa: E402
from haed.profile.windows import WindowSource  # noqa: E402
from haed.recipe import apply_overrides, load_recipe, recipe_from_dict  # noqa: E402


def distinct_patches(source: WindowSource, batch: int, seq_len: int, K: int, draws: int = 4) -> float:
    counts = []
    for i in range(draws):
        patches = np.ascontiguousarray(source.windows(i, batch, seq_len)).reshape(-1, K)
        counts.append(len(np.unique(patches.view(f"V{K}"))))
    return float(np.mean(counts))


def recomputed_flops(model, objective: str, parts: dict, cfg) -> float:
    """The forward FLOPs a phase's recomputation (`cfg.recompute`) runs again in its backward pass: each
    recomputed stack's forward once more, on the rows it trains (IEM's byte loss: its fraction). For
    the phases whose stacks train on every row they run on (IEM, full), not the decoder phase's mix of
    frozen and trained main blocks."""
    stacks = set(recompute_stacks(cfg.recompute))
    return sum(multiple / 3 * parts[part] for part, multiple in get_objective(objective).step_parts(model, cfg)
               if part in stacks)  # fmt: skip


def rows(recipe_name: str, dataset: str | None, variants: list[tuple[str, list[str]]], seq_lens, batch: int):
    for label, overrides in variants:
        table = load_recipe(recipe_name).to_dict()
        apply_overrides(table, overrides)
        recipe = recipe_from_dict(table)
        source = WindowSource.for_recipe(recipe, dataset)
        K = recipe.model.patch_size
        with torch.device("meta"):
            model = build_model(recipe.model)
        for n in seq_lens:
            U = distinct_patches(source, batch, n, K)
            C = min(U, recipe.iem.num_negatives) if recipe.iem.num_negatives else U  # IEM's candidates
            parts = forward_flops(model, batch, n, U, C)
            full = step_flops(model, "full", batch, n, U, C, recipe.full)
            iem = step_flops(model, "iem", batch, n, U, C, recipe.iem)
            dec = step_flops(model, "decoder", batch, n, U, C, recipe.decoder)
            full_rc = full + recomputed_flops(model, "full", parts, recipe.full)
            iem_rc = iem + recomputed_flops(model, "iem", parts, recipe.iem)
            share = {k: v / sum(parts.values()) for k, v in parts.items()}
            yield label, n, U, full, iem, dec, full_rc, iem_rc, share


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="code")
    p.add_argument("--dataset", default=None, help="dataset directory whose train windows give the distinct patches")
    p.add_argument("--seq-lens", default="2048,4096,8192,16384")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--variant", action="append", default=[], help="LABEL:field=value,field=value (the recipe itself is 'recipe')"
    )
    args = p.parse_args(argv)
    variants = [("recipe", [])] + [
        (v.split(":", 1)[0], [o for o in v.split(":", 1)[1].split(",") if o]) for v in args.variant
    ]
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    print(
        "| variant | seq | distinct patches | full TFLOP | IEM TFLOP | decoder phase TFLOP | full / IEM | "
        "with recomputation: full, IEM TFLOP, full / IEM | forward share: encoder, main, decoder, scores |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, n, U, full, iem, dec, full_rc, iem_rc, share in rows(
        args.recipe, args.dataset, variants, seq_lens, args.batch_size
    ):
        shares = ", ".join(f"{100 * share[k]:.0f}%" for k in ("encoder", "main", "decoder", "scores"))
        recomputed = f"{full_rc / 1e12:.2f}, {iem_rc / 1e12:.2f}, {full_rc / iem_rc:.2f}"
        print(f"| {label} | {n:,} | {U:,.0f} | {full / 1e12:.2f} | {iem / 1e12:.2f} | {dec / 1e12:.2f} | "
              f"{full / iem:.2f} | {recomputed} | {shares} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
