"""How many seconds a system of a `haed compare` would need to get a given fraction below where it
ended: its validation curve fitted as `a + b * t**-c` (least squares for a and b over a grid of c),
then solved for the target. A target below the fitted asymptote `a` needs more than any time.

    python benchmarks/seconds_to_target.py docs/2026-12-07-h100/music-150.json --system full --lower 3 --lower 5

Also says where another system's last validation lies on that curve (`--at iem`): the seconds the
fitted system took to get there. The fit extrapolates: the script reports how well a fit on all but
the last point predicts it.
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compare_json", type=Path)
    parser.add_argument("--system", default="full", help="the row whose curve is fitted (default: full)")
    parser.add_argument("--lower", type=float, action="append", default=[], help="percent below its last value")
    parser.add_argument("--at", action="append", default=[], help="another row: where its last value lies")
    args = parser.parse_args(argv)
    rows = {row["system"]: row for row in json.loads(args.compare_json.read_text())["rows"]}
    for name in [args.system, *args.at]:
        if name not in rows or not rows[name].get("valid_curve"):
            raise SystemExit(f"error: {args.compare_json} has no validation curve for system {name!r}")
    t, v = zip(*rows[args.system]["valid_curve"])
    a, b, c, rms = fit_power_law(t, v)
    a4, b4, c4, _ = fit_power_law(t[:-1], v[:-1]) if len(t) > 3 else (a, b, c, rms)
    result = {
        "system": args.system,
        "fit": {"a": a, "b": b, "c": c, "rms": rms},
        "last": {"seconds": t[-1], "value": v[-1], "predicted_without_it": a4 + b4 * t[-1] ** -c4},
        "lower": {f"{p:g}%": seconds_to_reach(a, b, c, v[-1] * (1 - p / 100)) for p in args.lower},
        "at": {name: seconds_to_reach(a, b, c, rows[name]["valid_curve"][-1][1]) for name in args.at},
    }
    print(f"{args.system}: {a:.4f} + {b:.4f} t^-{c:.3f} (RMS {rms:.4f}); at {t[-1]:.0f} s {v[-1]:.4f}, "
          f"predicted {result['last']['predicted_without_it']:.4f} from the points before it")  # fmt: skip
    for label, s in result["lower"].items():
        print(f"  {label} below {v[-1]:.4f}: {s:.0f} s ({s / t[-1]:.2f}x)")
    for name, s in result["at"].items():
        print(f"  {name} ended at {rows[name]['valid_curve'][-1][1]:.4f}: where {args.system} was at {s:.0f} s")
    return result


if __name__ == "__main__":
    main()
