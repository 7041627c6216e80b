"""How many seconds a system of a `haed compare` would need to get a given fraction below where it
ended: its validation curve fitted as `a + b * t**-c` (least squares for a and b over a grid of c),
then solved for the target. A target below the fitted asymptote `a` needs more than any time.

    python benchmarks/seconds_to_target.py docs/2026-12-07-h100/music-150.json --system full --lower 3 --lower 5

Also says where another system's last validation lies on that curve (`--at iem`): the seconds the
fitted system took to get there, and, from the rows' phases, how many bytes it had trained on by then
against the bytes the other system trained on: below 1x, the other system learned less per byte. The
fit extrapolates: the script reports how well a fit on all but the last point predicts it. A row is
named by its system, or in a sweep of `iem_variants.py` (`variants.json`) by its variant (`dec30` or
`IEM dec30`).

    python benchmarks/seconds_to_target.py docs/2026-12-07-h100/thirteenth/music-graphs-sweep.json --lower 3 \
        --at dec30 --at main8
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def fit_power_law(seconds, values) -> tuple[float, float, float, float]:
    """(a, b, c, RMS error) of `a + b * t**-c` fitted to the points; c on a grid of 0.05..4."""
    t, v = np.asarray(seconds, dtype=float), np.asarray(values, dtype=float)
    if len(t) < 3:
        raise SystemExit("error: a fit needs at least 3 validation points")
    best = None
    for c in np.linspace(0.05, 4.0, 791):
        design = np.stack([np.ones_like(t), t**-c], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, v, rcond=None)
        error = float(((design @ (a, b) - v) ** 2).mean())
        if best is None or error < best[3]:
            best = (float(a), float(b), float(c), error)
    a, b, c, error = best
    return a, b, c, math.sqrt(error)


def seconds_to_reach(a: float, b: float, c: float, value: float) -> float:
    """When the fitted curve reaches `value` (infinity where it lies at or below the asymptote)."""
    return (((value - a) / b) ** (-1.0 / c)) if value > a and b > 0 else math.inf


def find_row(rows: list[dict], name: str, where: Path) -> dict:
    """The one row named `name`: by its system, or by its variant with or without the 'IEM ' prefix."""
    found = [r for r in rows if name in (r["system"], r.get("variant"), (r.get("variant") or "").removeprefix("IEM "))]
    if len(found) > 1:
        raise SystemExit(f"error: {where} has {len(found)} rows named {name!r}: name a variant")
    if not found or not found[0].get("valid_curve"):
        raise SystemExit(f"error: {where} has no validation curve for system {name!r}")
    return found[0]


def trained_bytes(row: dict) -> float | None:
    """The bytes a row's phases trained on (their rates times their seconds); None without phases."""
    phases = row.get("phases") or []
    if not phases or any(not p.get("bytes_per_second") for p in phases):
        return None
    return sum(p["bytes_per_second"] * p["train_seconds"] for p in phases)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compare_json", type=Path)
    parser.add_argument("--system", default="full", help="the row whose curve is fitted (default: full)")
    parser.add_argument("--lower", type=float, action="append", default=[], help="percent below its last value")
    parser.add_argument("--at", action="append", default=[], help="another row: where its last value lies")
    args = parser.parse_args(argv)
    all_rows = json.loads(args.compare_json.read_text())["rows"]
    rows = {name: find_row(all_rows, name, args.compare_json) for name in [args.system, *args.at]}
    t, v = zip(*rows[args.system]["valid_curve"])
    a, b, c, rms = fit_power_law(t, v)
    a4, b4, c4, _ = fit_power_law(t[:-1], v[:-1]) if len(t) > 3 else (a, b, c, rms)
    result = {
        "system": args.system,
        "fit": {"a": a, "b": b, "c": c, "rms": rms},
        "last": {"seconds": t[-1], "value": v[-1], "predicted_without_it": a4 + b4 * t[-1] ** -c4},
        "lower": {f"{p:g}%": seconds_to_reach(a, b, c, v[-1] * (1 - p / 100)) for p in args.lower},
        "at": {name: seconds_to_reach(a, b, c, rows[name]["valid_curve"][-1][1]) for name in args.at},
        "per_byte": {},
    }
    fitted_bytes = trained_bytes(rows[args.system])
    for name, seconds in result["at"].items():
        used = trained_bytes(rows[name])
        if fitted_bytes is not None and used is not None and math.isfinite(seconds):
            reached = fitted_bytes / t[-1] * seconds  # the fitted system's bytes by then (a steady rate)
            result["per_byte"][name] = {"bytes": used, "fitted_system_bytes": reached, "ratio": reached / used}
    print(f"{args.system}: {a:.4f} + {b:.4f} t^-{c:.3f} (RMS {rms:.4f}); at {t[-1]:.0f} s {v[-1]:.4f}, "
          f"predicted {result['last']['predicted_without_it']:.4f} from the points before it")  # fmt: skip
    for label, s in result["lower"].items():
        print(f"  {label} below {v[-1]:.4f}: {s:.0f} s ({s / t[-1]:.2f}x)")
    for name, s in result["at"].items():
        line = f"  {name} ended at {rows[name]['valid_curve'][-1][1]:.4f}: where {args.system} was at {s:.0f} s"
        if name in result["per_byte"]:
            pb = result["per_byte"][name]
            line += (
                f", after {pb['fitted_system_bytes'] / 1e6:.0f} MB; {name} trained on {pb['bytes'] / 1e6:.0f} MB "
                f"({args.system} needed {pb['ratio']:.2f}x its bytes)"
            )
        print(line)
    return result


if __name__ == "__main__":
    main()
