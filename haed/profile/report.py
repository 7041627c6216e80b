"""What a profile says: ratios between objectives, merging profiles, one-line descriptions, JSON, the plot."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from haed.atomic import save_figure, write_text_atomic
from haed.config import CUDA_GRAPHS
from haed.errors import HaedError
from haed.objectives import PROFILE_RATIOS
from haed.profile.harness import CPU_MEMORY_NOTE

SCHEMA = "haed-profile-memory/1"

# --------------------------------------------------------------------------------------------
# one line each


def describe_cell(cell: dict) -> str:
    if cell["status"] != "ok":
        return f"{cell['objective']} seq {cell['seq_len']} batch {cell['batch_size']}: {cell['status']}"
    mem = f", peak {cell['peak_allocated_gib']:.2f} GiB" if cell.get("peak_allocated_gib") is not None else ""
    rate = cell["bytes_per_second"]
    return (
        f"{cell['objective']} seq {cell['seq_len']} batch {cell['batch_size']}: "
        f"{cell['median_step_ms']:.1f} ms/step, {rate / 1e6:.3f} MB/s{mem}"
    )


def describe_max_context(entry: dict) -> str:
    head = f"max context {entry['objective']} batch {entry['batch_size']}: "
    why = "ran out of memory" if entry.get("failure") == "OOM" else "failed (error, not OOM: see probes)"
    if entry["max_seq_len"] is None:
        return head + f"none (even seq {entry['first_failure']:,} {why})"
    tail = f" (capped at {entry['cap']:,})" if entry["capped"] else f" (seq {entry['first_failure']:,} {why})"
    return head + f"{entry['max_seq_len']:,} bytes" + tail


def describe_defaults(defaults: dict | None) -> str | None:
    """Which of the device's defaults a run took, and why they are the defaults (None: it took none)."""
    if not defaults or not defaults.get("used"):
        return None
    names = {"recipe": "--recipe", "seq_lens": "--seq-lens", "batch_sizes": "--batch-sizes"}
    given = ", ".join(names[u] for u in defaults["used"])
    return f"no {given} given: the defaults on {defaults['device'].upper()} are {defaults['why']}"


def describe_measured(result: dict) -> str:
    """One line: what a profile measured (recipe, device, dtype, compilation, data, lengths, batch sizes, steps)."""
    env = result.get("environment") or {}
    settings = result.get("settings") or {}
    if env.get("device") == "cuda":
        compiled = "compiled" if env.get("compile") else "not compiled"
        cells = result.get("cells") or []
        graphs = sorted({c["objective"] for c in cells if c.get("compile_mode") == CUDA_GRAPHS})
        if graphs:
            compiled += f"; {', '.join(graphs)} as CUDA graphs"
        how = f"on {env.get('gpu') or 'CUDA'} ({env.get('dtype')}, {compiled})"
    else:
        how = f"CPU-timed ({env.get('dtype')}; memory not measured)"
    data = result.get("data", "")
    if result.get("data_note"):
        data += f" ({result['data_note']})"
    seqs = ", ".join(f"{n:,}" for n in settings.get("seq_lens") or [])
    batches = ", ".join(str(b) for b in settings.get("batch_sizes") or [])
    return (
        f"measured: recipe {(result.get('recipe') or {}).get('name', '')} {how}; data: {data}; seq {seqs}; "
        f"batch {batches}; {settings.get('warmup')} warm-up + {settings.get('steps')} timed steps per cell"
    )


# --------------------------------------------------------------------------------------------
# ratios and merging


def compute_ratios(cells: list[dict], pairs=PROFILE_RATIOS) -> list[dict]:
    """numerator / denominator per (seq_len, batch_size) where both cells ran: memory, bytes/s, step time."""
    ok = {(c["objective"], c["seq_len"], c["batch_size"]): c for c in cells if c["status"] == "ok"}
    keys = sorted({(c["seq_len"], c["batch_size"]) for c in cells}, key=lambda k: (k[1], k[0]))
    out = []
    for num, den in pairs:
        for seq_len, batch_size in keys:
            a, b = ok.get((num, seq_len, batch_size)), ok.get((den, seq_len, batch_size))
            if a is None or b is None:
                continue
            out.append(
                {
                    "numerator": num,
                    "denominator": den,
                    "seq_len": seq_len,
                    "batch_size": batch_size,
                    "peak_allocated": _ratio(a.get("peak_allocated_gib"), b.get("peak_allocated_gib")),
                    "peak_reserved": _ratio(a.get("peak_reserved_gib"), b.get("peak_reserved_gib")),
                    "bytes_per_second": _ratio(a.get("bytes_per_second"), b.get("bytes_per_second")),
                    "median_step_ms": _ratio(a.get("median_step_ms"), b.get("median_step_ms")),
                }
            )
    return out


def _ratio(a, b):
    if a is None or b is None or not b:
        return None
    return a / b


def _cell_key(cell: dict) -> tuple:
    return cell["objective"], cell["seq_len"], cell["batch_size"]


def merge_profiles(main: dict, *others: dict) -> dict:
    """Add the cells of other profile JSONs (the MEGABYTE peer's, say) to `main` and recompute the ratios.

    A later cell of the same objective, seq_len and batch_size replaces an earlier one.
    """
    merged = dict(main)
    cells = {_cell_key(c): c for c in main["cells"]}
    merged["merged"] = list(main.get("merged") or [])
    for other in others:
        for c in other["cells"]:
            cells.pop(_cell_key(c), None)
            cells[_cell_key(c)] = c
        merged["merged"].append(
            {
                "created": other.get("created"),
                "command": other.get("command"),
                "objectives": sorted({c["objective"] for c in other["cells"]}),
                "environment": other.get("environment"),
                "parameters": other.get("parameters"),
                "model": other.get("model"),
                "data": other.get("data"),
            }
        )
    merged["cells"] = list(cells.values())
    merged["settings"] = dict(main.get("settings") or {})
    merged["settings"]["objectives"] = list(dict.fromkeys(c["objective"] for c in merged["cells"]))
    merged["ratios"] = compute_ratios(merged["cells"])
    return merged


# --------------------------------------------------------------------------------------------
# JSON and the plot


def _clean(value):
    """JSON-safe: non-finite floats become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def profile_to_json(result: dict) -> str:
    return json.dumps(_clean(result), indent=2, allow_nan=False) + "\n"


def write_profile_json(result: dict, path: str | os.PathLike) -> Path:
    """Write the profile as JSON, atomically (a temporary file renamed into place)."""
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, profile_to_json(result))
    return path


def read_profile_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HaedError(f"profile JSON {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise HaedError(f"{path} cannot be read as a profile JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise HaedError(f"{path} is not a profile-memory JSON (no cells)")
    return data


_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v")


def plot_profile(result: dict, path: str | os.PathLike, title: str | None = None) -> Path:
    """Two panels against sequence length: peak allocated memory and bytes/s. One colour per
    objective, one line style per batch size; out-of-memory cells are marked with an x at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    cells = result["cells"]
    objectives = list(dict.fromkeys(c["objective"] for c in cells))
    batch_sizes = sorted({c["batch_size"] for c in cells})
    colors = {o: f"C{i % 10}" for i, o in enumerate(objectives)}
    styles = {b: _LINESTYLES[i % len(_LINESTYLES)] for i, b in enumerate(batch_sizes)}
    markers = {b: _MARKERS[i % len(_MARKERS)] for i, b in enumerate(batch_sizes)}
    measured = any(c.get("peak_allocated_gib") is not None for c in cells if c["status"] == "ok")

    fig, (ax_mem, ax_rate) = plt.subplots(1, 2, figsize=(13, 5))
    panels = (
        (ax_mem, "peak_allocated_gib", 1.0, "peak allocated memory (GiB)"),
        (ax_rate, "bytes_per_second", 1e-6, "training throughput (million bytes/s)"),
    )
    any_oom = False
    for ax, key, scale, label in panels:
        for o in objectives:
            for b in batch_sizes:
                row = sorted(
                    (c for c in cells if c["objective"] == o and c["batch_size"] == b), key=lambda c: c["seq_len"]
                )
                pts = [(c["seq_len"], c[key] * scale) for c in row if c["status"] == "ok" and c.get(key) is not None]
                name = o if len(batch_sizes) == 1 else f"{o}, batch {b}"
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, linestyle=styles[b], marker=markers[b], color=colors[o], label=name, markersize=4)
                ooms = [c["seq_len"] for c in row if c["status"] == "OOM"]
                if ooms:
                    any_oom = True
                    ax.plot(
                        ooms,
                        [0.96] * len(ooms),
                        linestyle="none",
                        marker="x",
                        markersize=9,
                        markeredgewidth=2,
                        color=colors[o],
                        transform=ax.get_xaxis_transform(),
                        clip_on=False,
                    )
        ax.set_xscale("log", base=2)
        seqs = sorted({c["seq_len"] for c in cells})
        if seqs:
            ax.set_xlim(seqs[0] / 1.2, seqs[-1] * 1.2)
            ax.set_xticks(seqs)
            ax.set_xticklabels([f"{s:,}" for s in seqs], rotation=30 if len(seqs) > 5 else 0)
            ax.minorticks_off()
        ax.set_xlabel("sequence length (bytes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        tops = [c[key] * scale for c in cells if c["status"] == "ok" and c.get(key) is not None]
        ax.set_ylim(0, max(tops) * 1.15 if tops and max(tops) > 0 else 1.0)  # headroom for the OOM marks
    if not measured:
        ax_mem.text(0.5, 0.5, f"memory {CPU_MEMORY_NOTE}", transform=ax_mem.transAxes, ha="center", va="center")
    handles, labels = ax_rate.get_legend_handles_labels()
    if any_oom:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], linestyle="none", marker="x", color="black", markeredgewidth=2))
        labels.append("out of memory")
    if handles:
        ax_rate.legend(handles, labels, fontsize=8, loc="best")
    env = result.get("environment", {})
    where = env.get("gpu") or "CPU"
    data = result.get("data", "")
    fig.suptitle(
        title or f"{result.get('recipe', {}).get('name', '')}: {where}, {env.get('dtype', '')}, {data}", fontsize=10
    )
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
