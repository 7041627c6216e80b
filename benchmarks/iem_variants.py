"""IEM variants against full training and the flat baseline, each at the same time budget.

Runs `haed.compare.compare` once for the baselines (full, flat) and once per IEM variant (the IEM
system only, with the variant's recipe overrides), then writes one table (markdown), one JSON and one
PNG of validation bits per byte against training seconds, rewritten after each system, so a sweep
stopped by a time limit keeps the table of what finished. Every run stays in `--out`, so an interrupted
sweep continues where it stopped. Every variant's overrides are checked before anything trains.

    python benchmarks/iem_variants.py --recipe tiny --dataset data/enwik8-head --budget 120 \\
        --variant baseline: --variant cosine:model.score=cosine \\
        --variant byte-loss:iem.byte_loss_fraction=0.125 --out runs/iem-variants

A variant is `name:override,override,...` (recipe overrides as with `--set`); the share of the budget
given to the decoder phase is the recipe's `compare.decoder_fraction` (`decoder_fraction=F` is short for
`compare.decoder_fraction=F`). With `--share-iem`, a variant
that differs from an earlier one only in `decoder.*` overrides starts from a copy of that one's IEM
run (the table says whose), so decoder-phase variants cost their decoder phase alone and are compared
on the same IEM phase.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from haed.atomic import write_text_atomic  # noqa: E402
from haed.compare import compare  # noqa: E402
from haed.compare_report import plot_comparison, sweep_table  # noqa: E402
from haed.errors import HaedError  # noqa: E402
from haed.recipe import load_recipe  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    overrides = [
        f"compare.{item}" if item.startswith("decoder_fraction=") else item
        for item in filter(None, (s.strip() for s in rest.split(",")))
    ]
    return name, overrides


def share_iem_phase(recipe, iem_dir: Path, seen: dict) -> str | None:
    """With --share-iem: a variant that differs from an earlier one only in its decoder phase (the
    `decoder` section) starts from a copy of that variant's finished IEM run instead of training the
    same IEM phase again. Returns the earlier variant's name, or None (then this one is remembered).
    The decoder phase's share of the budget (`compare`) sets the IEM phase's seconds, so it is part of
    what must match."""
    settings = recipe.to_dict()
    settings.pop("decoder")
    key = json.dumps(settings, sort_keys=True)
    earlier = seen.get(key)
    if earlier is None or iem_dir.exists():
        seen.setdefault(key, iem_dir)
        return None
    shutil.copytree(earlier, iem_dir, ignore=shutil.ignore_patterns("decoder"))
    return earlier.parent.name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--budget", type=float, required=True, help="seconds of training per system")
    ap.add_argument("--variant", action="append", default=[], help="name:override,... (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="overrides for every system")
    ap.add_argument("--baselines", default="full,flat", help="comma-separated, or '' for none")
    ap.add_argument("--evals", type=int, default=5)
    ap.add_argument("--eval-bytes", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--share-iem",
        action="store_true",
        help="variants that differ only in the decoder phase reuse the first one's IEM run",
    )
    ap.add_argument("--out", type=Path, required=True)
    return ap.parse_args(argv)


def say(event: dict) -> None:
    if event["event"] in ("message", "valid"):
        print(
            event.get("text") or f"  step {event['step']} valid {event.get('bits_per_byte', event.get('loss')):.4f}",
            flush=True,
        )


def run_systems(a: argparse.Namespace, on_rows=lambda rows, result: None) -> tuple[list[dict], dict]:
    """The baselines' rows, then each variant's IEM row, and the last comparison's result (its settings).
    `on_rows(rows, result)` sees the rows so far after each comparison, so a sweep stopped by a time limit
    keeps the table of what finished."""
    base = [*a.set, f'data.dataset="{a.dataset}"']
    rows = []
    common = dict(evals=a.evals, eval_bytes=a.eval_bytes, device=a.device, compile=a.compile, on_event=say)
    systems = tuple(s for s in a.baselines.split(",") if s)
    result = {}
    variants = [parse_variant(text) for text in a.variant]
    # Every variant's recipe is read before anything trains: a bad override is one line, not a sweep cut short.
    recipes = [load_recipe(a.recipe, [*base, *overrides]) for _, overrides in variants]
    if systems:
        result = compare(load_recipe(a.recipe, base), a.out / "baselines", a.budget, systems=systems, **common)
        rows += [{**r, "variant": r["label"], "overrides": []} for r in result["rows"]]
        on_rows(rows, result)
    iem_phases: dict[str, Path] = {}  # IEM phase settings -> the first variant's finished IEM run
    for (name, overrides), recipe in zip(variants, recipes):
        fraction = recipe.compare.decoder_fraction
        print(
            f"== {name}: {' '.join(overrides) or '(recipe as is)'}, decoder phase {fraction:.0%} of the budget",
            flush=True,
        )
        shared = share_iem_phase(recipe, a.out / name / "iem", iem_phases) if a.share_iem else None
        if shared:
            print(f"   its IEM phase is {shared}'s (the variants differ in the decoder phase only)", flush=True)
        result = compare(recipe, a.out / name, a.budget, systems=("iem",), **common)
        rows += [
            dict(r, variant=f"IEM {name}", overrides=overrides, decoder_fraction=fraction, iem_phase_of=shared)
            for r in result["rows"]
        ]
        on_rows(rows, result)
    return rows, result


def write_outputs(a: argparse.Namespace, argv: list[str] | None, rows: list[dict], result: dict) -> dict:
    """variants.json, variants.md and variants.png in `--out` for `rows`; returns the JSON's content."""
    table = sweep_table(rows, result["unit"])
    summary = {
        "recipe": a.recipe,
        "dataset": a.dataset,
        "budget_seconds": a.budget,
        "device": result["device"],
        "gpu": result.get("gpu"),  # compare's settings, so that a variant's row can be set beside other runs'
        "memory_cap_gib": result.get("memory_cap_gib"),
        "unit": result["unit"],
        "windowing": result["windowing"],
        "command": " ".join(sys.argv if argv is None else ["benchmarks/iem_variants.py", *argv]),
        "rows": rows,
    }
    write_text_atomic(a.out / "variants.json", json.dumps(summary, indent=2))
    write_text_atomic(a.out / "variants.md", table + "\n")
    plot_comparison({**summary, "rows": [{**r, "label": r["variant"]} for r in rows]}, a.out / "variants.png")
    return summary


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if not a.variant and not a.baselines.strip(","):
        raise HaedError("nothing to compare: give --variant, or --baselines")
    written = []  # each system's outputs are written as it finishes; the last are the sweep's
    rows, result = run_systems(a, on_rows=lambda rows, result: written.append(write_outputs(a, argv, rows, result)))
    print(sweep_table(rows, result["unit"]))
    return written[-1]


if __name__ == "__main__":
    try:
        main()
    except HaedError as e:  # bad input, or a stop request (SIGTERM, Ctrl-C): one line; run again to continue
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
