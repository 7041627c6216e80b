"""Merge `haed compare` JSONs (systems of one comparison run in separate jobs) into one: table, ratios,
JSON, PNG.

    python benchmarks/merge_comparisons.py runs/code-150/compare.json runs/code-150-flat/compare.json \
        old/compare.json:full,megabyte --json docs/code-150.json --plot docs/code-150.png

`FILE:SYSTEM,SYSTEM` keeps only those systems' rows of a file. A `variants.json` of
`benchmarks/iem_variants.py` gives its rows by variant name instead (`runs/v/variants.json:carry-main4`):
each is an IEM row. The files must share their recipe, data, budget, memory cap, GPU and test bytes
(`haed.compare_report.merge_comparisons`); a system may appear once. `haed compare --merge FILE` does
the same while it runs further systems. Sweeps of `iem_variants.py` run in several jobs merge whole
(`runs/a/variants.json runs/b/variants.json`): their rows are told apart by variant, and the table gives
each against full training's row.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from haed.atomic import write_text_atomic  # noqa: E402
from haed.compare_report import (  # noqa: E402
    merge_comparisons,
    plot_comparison,
    read_comparison,
    row_key,
    sweep_table,
)
from haed.errors import HaedError  # noqa: E402


def read_selected(spec: str) -> tuple[str, dict]:
    """'FILE' or 'FILE:NAME,NAME' -> (spec, the comparison with only those rows). A name is a system, or
    in a variants.json (rows with a `variant`), a variant."""
    path, _, wanted = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    result = read_comparison(path)
    if wanted:
        keep = [s.strip() for s in wanted.split(",") if s.strip()]
        key = "variant" if all("variant" in r for r in result["rows"]) else "system"
        missing = [s for s in keep if s not in {r[key] for r in result["rows"]}]
        if missing:
            raise HaedError(f"{path} has no row named {missing[0]}")
        result = dict(result, rows=[r for r in result["rows"] if r[key] in keep])  # ratios: on merging
    return spec, result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("comparisons", nargs="+", help="compare.json files (FILE or FILE:SYSTEM,...); the first heads")
    p.add_argument("--json", type=Path, default=Path("compare.json"))
    p.add_argument("--plot", type=Path, default=Path("compare.png"))
    args = p.parse_args(argv)
    try:
        (first_name, first), *others = [read_selected(spec) for spec in args.comparisons]
        result = merge_comparisons(dict(first, merged_from=[first_name]), *others)
    except HaedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_text_atomic(args.json, json.dumps(result, indent=2))
    if row_key(result["rows"]) == "variant":  # sweeps: one row per variant, each against full training
        print(sweep_table(result["rows"], result["unit"]))
        plot_comparison(dict(result, rows=[dict(r, label=r["variant"]) for r in result["rows"]]), args.plot)
    else:
        from haed_cli.common import console
        from haed_cli.compare import compare_table

        console.print(compare_table(result))
        plot_comparison(result, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
