"""`haed compare --memory-cap GIB`: every system under the same enforced cap on GPU memory, each at the
fastest configuration of its own that fits.

A phase's configuration is its micro-batch (with gradient accumulation keeping the global batch: the
recipe's `batch_size x grad_accum` windows per optimizer step), which stacks recompute their
activations in the backward pass (the objective's `recompute_choices`, cheapest first), and the
objective's `lean_settings` (IEM: its softmax in smaller chunks of rows), which cost almost nothing and
are tried first when the recipe's own settings do not fit. Before any clock starts, a short probe trains
a few real optimizer steps of each candidate under the cap: from the whole batch at once downwards, at
each micro-batch the cheapest choice that fits, until one fits with no recomputation at all (a smaller
micro-batch is then only slower). The fastest candidate
that fits, with `HEADROOM` to spare (the distinct patches of an IEM batch vary from step to step), is
chosen; a phase that nothing fits is one error before anything trains.

The choices are kept in the comparison's folder (`probes.json`): run again into the same `--out` (an
interrupted comparison continues where it stopped), a phase with the same settings, cap, GPU and
compilation takes its earlier choice instead of probing anew. Compiled, a probe costs a compilation per
candidate (minutes in all), and a fresh probe could pick another of two near-equal candidates, which the
phase's unfinished run would then refuse.

The cap is enforced by PyTorch's caching allocator (`torch.cuda.set_per_process_memory_fraction`):
a run that would need more fails with an out-of-memory error instead of reporting a number above it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from haed.atomic import write_text_atomic
from haed.errors import HaedError
from haed.objectives import Objective, get_objective
from haed.profile.cells import build_for_objective
from haed.profile.harness import GIB, measure_cell
from haed.profile.windows import WindowSource
from haed.recipe import Recipe
from haed.steps import to_device, torch_generator, train_step

HEADROOM = 0.05  # a candidate fits when its peak allocation stays this fraction below the cap
PROBE_WARMUP, PROBE_STEPS = 1, 2


@dataclass(frozen=True)
class Candidate:
    batch_size: int  # windows per micro-batch
    grad_accum: int  # micro-batches per optimizer step
    recompute: str  # stacks recomputed in the backward pass ("" for none)
    settings: tuple[tuple[str, int], ...] = ()  # the objective's lean settings, where taken

    def as_dict(self) -> dict:
        """As JSON keeps it (probes, `probes.json`): its lean settings a mapping."""
        return dataclasses.asdict(self) | {"settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, values: dict) -> "Candidate":
        return cls(**{**values, "settings": tuple(values.get("settings", {}).items())})

    def describe(self) -> str:
        what = [f"{self.batch_size} x {self.grad_accum}"] + ([f"recompute {self.recompute}"] if self.recompute else [])
        return ", ".join(what + [f"{key} {value}" for key, value in self.settings])


PROBES_FILE = "probes.json"  # in a comparison's --out: each capped phase's choice and probes


def read_saved_choices(out_dir: Path, setting: dict) -> dict:
    """The phases probed by an earlier run of this comparison into `out_dir` under the same `setting`
    (cap, GPU, compilation), by `system/objective`; {} where there is none (or it cannot be read: then
    the phases are probed again)."""
    try:
        saved = json.loads((Path(out_dir) / PROBES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return saved.get("phases", {}) if saved.get("setting") == setting else {}


def save_choices(out_dir: Path, setting: dict, phases: dict) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(out_dir) / PROBES_FILE, json.dumps({"setting": setting, "phases": phases}, indent=2))


def saved_choice(entry: dict | None, recipe: Recipe) -> tuple[Candidate, list[dict]] | None:
    """(the candidate, its probes) of a saved phase made from the same phase recipe, else None."""
    if not entry or entry.get("recipe") != plain_recipe(recipe):
        return None
    return Candidate.from_dict(entry["chosen"]), entry["probes"]


def saved_entry(recipe: Recipe, chosen: Candidate, probes: list[dict]) -> dict:
    return {
        "recipe": plain_recipe(recipe),
        "chosen": chosen.as_dict(),
        "probes": probes,
    }


def plain_recipe(recipe: Recipe) -> dict:
    return json.loads(json.dumps(recipe.to_dict()))  # as read back from JSON (tuples become lists)


def memory_choices(spec: Objective, cfg) -> list[tuple[str, tuple]]:
    """(recompute, lean settings) in the order a micro-batch tries them, least compute first: the phase
    as the recipe has it; with the objective's lean settings that lower the recipe's values; then each
    recomputation, with them."""
    lean = tuple((key, value) for key, value in spec.lean_settings if getattr(cfg, key) > value)
    return [("", ())] + ([("", lean)] if lean else []) + [(r, lean) for r in spec.recompute_choices if r]


def micro_batches(total: int) -> list[int]:
    """The micro-batch sizes tried for a global batch of `total` windows: total, total / 2, ... , 1
    (halving while it divides, then 1)."""
    sizes, b = [], total
    while True:
        sizes.append(b)
        if b % 2 or b == 1:
            break
        b //= 2
    return sizes if sizes[-1] == 1 else sizes + [1]


def fits(cell: dict, cap_gib: float) -> bool:
    peak = cell.get("peak_allocated_gib")
    return cell["status"] == "ok" and peak is not None and peak <= cap_gib * (1 - HEADROOM)


def choose_configuration(
    recipe: Recipe,
    objective: Objective | str,
    measure: Callable[[Candidate], dict],
    cap_gib: float,
    label: str,
    on_probe: Callable[[str], None] = lambda line: None,
) -> tuple[Candidate, list[dict]]:
    """(the fastest candidate that fits under `cap_gib`, every probe made). `measure(candidate)` gives a
    cell of `haed.profile.harness.measure_cell` (status, peak_allocated_gib, median_step_ms); `on_probe`
    gets a line for each probe as it ends (compiled, each takes a compilation)."""
    spec = get_objective(objective)
    cfg = getattr(recipe, spec.section)
    total = cfg.batch_size * cfg.grad_accum
    probes, best = [], None
    for b in micro_batches(total):
        plain_fits = False
        for recompute, settings in memory_choices(spec, cfg):
            candidate = Candidate(b, total // b, recompute, settings)
            cell = measure(candidate)
            ok = fits(cell, cap_gib)
            probes.append(
                {
                    **candidate.as_dict(),
                    "status": cell["status"],
                    "peak_allocated_gib": cell.get("peak_allocated_gib"),
                    "peak_reserved_gib": cell.get("peak_reserved_gib"),
                    "median_step_ms": cell.get("median_step_ms"),
                    "fits": ok,
                }
            )
            on_probe(f"{label}: probed {candidate.describe()}: {describe_probe(probes[-1])}")
            if ok:
                if best is None or cell["median_step_ms"] < best[1]:
                    best = (candidate, cell["median_step_ms"])
                plain_fits = recompute == ""
                break
        if plain_fits:
            break
    if best is None:
        smallest = probes[-1]
        peak = smallest["peak_allocated_gib"]
        raise HaedError(
            f"--memory-cap {cap_gib:g} GiB: no configuration of {label} fits (micro-batch 1"
            + (f", recompute {smallest['recompute']}" if smallest["recompute"] else "")
            + (f" peaked at {peak:.2f} GiB" if peak is not None else "")
            + f", {smallest['status']}); raise the cap, or shrink the model or --seq-len"
        )
    return best[0], probes


def describe_probe(probe: dict) -> str:
    """'6.29 GiB, 128.8 ms a step, fits' or 'OOM at 7.79 GiB' for a probe of `choose_configuration`."""
    peak = probe["peak_allocated_gib"]
    at = f"{peak:.2f} GiB" if peak is not None else "an unknown peak"
    if probe["status"] != "ok":
        return f"{probe['status']} at {at}"
    return f"{at}, {probe['median_step_ms']:.1f} ms a step, " + ("fits" if probe["fits"] else "over the cap's headroom")


def apply_configuration(recipe: Recipe, objective: Objective, candidate: Candidate) -> Recipe:
    """The recipe with the objective's phase at `candidate`'s micro-batch, accumulation, recomputation and
    lean settings."""
    section = objective.section
    cfg = dataclasses.replace(
        getattr(recipe, section),
        batch_size=candidate.batch_size,
        grad_accum=candidate.grad_accum,
        recompute=candidate.recompute,
        **dict(candidate.settings),
    )
    return dataclasses.replace(recipe, **{section: cfg})


def probe_measure(
    recipe: Recipe, objective: Objective, device: torch.device, compile: bool
) -> Callable[[Candidate], dict]:
    """A `measure` for `choose_configuration`: a few real optimizer steps of the candidate on `device`,
    through the trainer's own pieces, on windows of the recipe's train split."""
    source = WindowSource.for_recipe(recipe, recipe.data.dataset, seed=getattr(recipe, objective.section).seed)
    seq_len, loss_fn = recipe.data.seq_len, objective

    def measure(candidate: Candidate) -> dict:
        cfg = dataclasses.replace(
            getattr(apply_configuration(recipe, objective, candidate), objective.section),
            compile=compile,
        )

        def setup():
            if compile and device.type == "cuda":
                torch._dynamo.reset()
            return build_for_objective(recipe, objective, cfg, device, compile)

        def make_batch(i):
            a = candidate.grad_accum
            batches = [
                (
                    to_device(source.windows(i * a + m, candidate.batch_size, seq_len), device),
                    torch_generator(cfg.seed, i, m),
                )
                for m in range(a)
            ]
            return batches, {}

        def step(state, batches):
            model, optimizer, params = state
            train_step(model, optimizer, params, loss_fn, cfg, batches, device)

        return measure_cell(
            objective.name, seq_len, candidate.batch_size, setup=setup, step=step, make_batch=make_batch,
            device=device, steps=PROBE_STEPS, warmup=PROBE_WARMUP,
        )  # fmt: skip

    return measure


@contextlib.contextmanager
def enforced_cap(device: torch.device, cap_gib: float | None) -> Iterator[None]:
    """Hold PyTorch's allocator on `device` to `cap_gib` for the block (nothing without a cap)."""
    if cap_gib is None:
        yield
        return
    if device.type != "cuda":
        raise HaedError("--memory-cap caps GPU memory: it needs a CUDA device (--device cuda)")
    if device.index is None:  # set_per_process_memory_fraction needs the device's index
        device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    if cap_gib > total:
        raise HaedError(f"--memory-cap {cap_gib:g} GiB is more than this GPU has ({total:.1f} GiB)")
    torch.cuda.set_per_process_memory_fraction(cap_gib / total, device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
