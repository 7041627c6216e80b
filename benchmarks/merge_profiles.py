"""Merge profile JSONs (haed profile-memory runs, the MEGABYTE peer's) into one: table, ratios, JSON, PNG.

    python benchmarks/merge_profiles.py iem-full.json decoder-flat.json megabyte-peer.json \
        --json docs/profile-memory.json --plot docs/profile-memory.png

The first file's environment, recipe and settings head the result; every file's cells are kept
(the others are listed under "merged"), and the ratios are computed over all cells.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from haed.errors import HaedError  # noqa: E402
from haed.profile import merge_profiles, plot_profile, read_profile_json, write_profile_json  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profiles", nargs="+", type=Path, help="profile JSONs; the first one heads the result")
    p.add_argument("--json", type=Path, default=Path("profile-memory.json"))
    p.add_argument("--plot", type=Path, default=Path("profile-memory.png"))
    p.add_argument("--title", default=None, help="plot title (default: recipe, GPU, dtype, data)")
    args = p.parse_args(argv)
    try:
        first, *others = [read_profile_json(path) for path in args.profiles]
    except HaedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    result = merge_profiles(first, *others)
    from haed_cli.profile import print_profile

    print_profile(result)
    write_profile_json(result, args.json)
    plot_profile(result, args.plot, title=args.title)
    print(f"wrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
