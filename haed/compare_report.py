"""What `haed compare` reports: its ratios, the phrases of its table, its plot, and the merging of
comparisons run separately (each system in its own job, say) into one table, JSON and plot.

A comparison's JSON (`compare.json`) holds the settings every row shares (recipe, dataset, budget, cap,
GPU, unit and windowing of the test bytes) and one row per system. Rows of several files are merged only
where those settings agree, so a merged table still compares like with like.
"""

from __future__ import annotations

import json
from pathlib import Path

from haed.atomic import save_figure
from haed.config import CUDA_GRAPHS
from haed.errors import HaedError

# Settings a merged comparison's rows must share: otherwise their numbers are not one comparison's.
SHARED = ("recipe", "dataset", "budget_seconds", "memory_cap_gib", "gpu", "unit", "windowing", "test_bytes")


def _shared(result: dict, key: str):
    """One shared setting of a comparison. The dataset by its folder's name (each job may see the corpus
    at another path); the test bytes scored, from its rows."""
    if key == "dataset":
        return Path(result.get("dataset") or "").name
    if key == "test_bytes":
        return sorted({row.get("test_bytes") for row in result["rows"]}, key=str)
    return result.get(key)


def summarise(rows: list[dict]) -> dict:
    """The comparison's ratios of test bits per byte: IEM + decoder phase over full training, and the
    best hierarchical system over the flat baseline and over the MEGABYTE peer (None where a row is missing)."""
    best = {
        arch: min((r["test_bits_per_byte"] for r in rows if r["arch"] == arch), default=None)
        for arch in ("haed", "flat", "megabyte")
    }
    values = {r["system"]: r["test_bits_per_byte"] for r in rows}
    one_each = all(sum(r["system"] == s for r in rows) == 1 for s in ("iem", "full"))  # a sweep: per row
    return {
        "iem_vs_full": values["iem"] / values["full"] if one_each else None,
        "best_haed_vs_flat": best["haed"] / best["flat"] if best["haed"] and best["flat"] else None,
        "best_haed_vs_megabyte": best["haed"] / best["megabyte"] if best["haed"] and best["megabyte"] else None,
    }


def read_comparison(path: str | Path) -> dict:
    """A `compare.json`, checked to be one (one clear line otherwise)."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise HaedError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise HaedError(f"{path} is a folder: give its compare.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HaedError(f"{path} is not a readable compare.json ({e})") from None
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list) or "budget_seconds" not in result:
        raise HaedError(f"{path} is not a compare.json (no rows or budget): merge the files `haed compare` writes")
    return result


def row_key(*row_lists: list[dict]) -> str:
    """What tells merged rows apart: the variant where every row has one (sweeps of
    `benchmarks/iem_variants.py`, several IEM rows each), the system otherwise."""
    return "variant" if all("variant" in row for rows in row_lists for row in rows) else "system"


def check_mergeable(first: dict, name: str, other: dict, keys: tuple[str, ...] = SHARED) -> None:
    """Refuse (HaedError) to merge `other` (read from `name`) into `first` where a shared setting
    differs, or where it repeats one of `first`'s systems (variants, when both are sweeps)."""
    for key in keys:
        if _shared(other, key) != _shared(first, key):
            raise HaedError(
                f"{name} was compared with {key} = {_shared(other, key)!r}, not {_shared(first, key)!r}: "
                f"merge only comparisons of the same {', '.join(SHARED)}"
            )
    by = row_key(first["rows"], other["rows"])
    seen = {row[by] for row in first["rows"]}
    repeated = [row[by] for row in other["rows"] if row[by] in seen]
    if repeated:
        raise HaedError(f"{name} repeats {by} {repeated[0]}: a merged table has one row per {by}")


def merge_comparisons(first: dict, *others: tuple[str, dict]) -> dict:
    """`first` with the rows of each (name, result) in `others` added and the ratios recomputed. Refused
    (HaedError) where a file's shared settings differ from the first's, or where it repeats a system."""
    merged = dict(first, rows=list(first["rows"]))
    for name, other in others:
        check_mergeable(merged, name, other)
        merged["rows"] += other["rows"]
    merged.update(summarise(merged["rows"]))
    merged["merged_from"] = list(first.get("merged_from", [])) + [name for name, _ in others]
    return merged


def describe_phases(row: dict) -> str:
    """'1,304 + 387 steps, 0.84 + 2.17 MB/s' for a row of `compare`."""
    phases = row.get("phases") or []
    steps = " + ".join(f"{p['steps']:,}" for p in phases)
    rates = " + ".join(f"{p['bytes_per_second'] / 1e6:.3g}" if p["bytes_per_second"] else "-" for p in phases)
    return f"{steps} steps, {rates} MB/s"


COMPILED = {"default": "compiled", CUDA_GRAPHS: "CUDA graphs"}


def describe_configuration(row: dict) -> str:
    """'16 x 1 (logits_chunk 2048) + 8 x 2 (decoder; CUDA graphs)': each phase's micro-batch x accumulation,
    what it recomputes, the lean settings a memory cap gave it, and how it was compiled (eager says nothing)."""
    parts = []
    for p in row.get("phases") or []:
        extras = [p["recompute"]] if p.get("recompute") else []
        if p.get("compile_mode"):
            extras.append(COMPILED.get(p["compile_mode"], f"compiled {p['compile_mode']}"))
        extras += [f"{key} {value}" for key, value in (p.get("settings") or {}).items()]
        parts.append(f"{p.get('batch_size')} x {p.get('grad_accum')}" + (f" ({'; '.join(extras)})" if extras else ""))
    return " + ".join(parts)


def describe_phase_ends(row: dict) -> str:
    """'3.6607 + 3.6113': each phase's last validation bits per byte ('-' where it has none, as in an
    IEM phase without a byte loss), for a row of `compare`."""
    ends = (p.get("last_valid_bits_per_byte") for p in row.get("phases") or [])
    return " + ".join("-" if v is None else f"{v:.4f}" for v in ends)


def sweep_table(rows: list[dict], unit: str) -> str:
    """Markdown for a sweep of `benchmarks/iem_variants.py`: one row per variant, its test score against
    full training's where that ran."""
    reference = next((r["test_bits_per_byte"] for r in rows if r["system"] == "full"), None)
    lines = [
        "| system | overrides | decoder phase | train s | steps, training MB/s | valid at phase ends "
        f"| test {unit} | vs full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['test_bits_per_byte'] / reference:.3f}" if reference else "-"
        share = f"{r['decoder_fraction']:.0%}" if "decoder_fraction" in r else "-"
        lines.append(
            f"| {r['variant']} | {' '.join(r['overrides']) or '-'}"
            f"{f' (IEM phase of {shared_from})' if (shared_from := r.get('iem_phase_of')) else ''} | "
            f"{share} | {r['train_seconds']:.1f} | "
            f"{describe_phases(r)} | {describe_phase_ends(r)} | "
            f"{r['test_bits_per_byte']:.4f} | {ratio} |"
        )
    return "\n".join(lines)


def plot_comparison(result: dict, png_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in result["rows"]:
        if row["valid_curve"]:
            x, y = zip(*row["valid_curve"])
            ax.plot(x, y, "o-", markersize=3, label=f"{row['label']}: test {row['test_bits_per_byte']:.3f}")
    ax.set_xlabel("training seconds (validation and checkpoints not counted)")
    ax.set_ylabel(f"validation {result['unit']}")
    data = Path(result["dataset"]).name
    ax.set_title(
        f"{result['recipe']}"
        + (f" on {data}" if data != result["recipe"] else "")  # not "code on code"
        + f": {result['budget_seconds']:g} s each, "
        f"{result.get('gpu') or result['device']}"
        + (f", {result['memory_cap_gib']:g} GiB cap" if result.get("memory_cap_gib") else "")
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, png_path)
