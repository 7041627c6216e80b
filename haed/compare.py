"""`haed compare`: which objective should I train? IEM + decoder phase, full, flat and the MEGABYTE-pytorch
peer at one time budget, optionally under one enforced cap on GPU memory.

Every system gets the same seconds of training on the same device (validation and checkpoint writing
not counted), its best validation checkpoint is kept, and each is scored by exact bits per byte on the
test split (and on any other data given). The IEM system splits its budget between the IEM phase and
the decoder phase (`decoder_fraction`). The flat baseline is the recipe's main stack over bytes, its
depth chosen so that its parameter count is closest to the hierarchical model's. The peer
(`haed.peer`) has the recipe's main stack as its global model and its decoder as its local model.
With a memory cap (`haed.memory_cap`) each phase trains at the fastest micro-batch and recomputation
of its own that fits, chosen by a short probe before any clock starts.

    out_dir/
      iem/ (and iem/decoder/), full/, flat/, megabyte/    the runs
      compare.json                             every number, the budget split, parameter counts
      compare.png                              validation bits per byte against training seconds
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch

from haed import peer
from haed.atomic import check_writable, write_text_atomic
from haed.checkpoint import read_run_config
from haed.compare_report import (
    SHARED,
    check_mergeable,
    merge_comparisons,
    plot_comparison,
    read_comparison,
    summarise,
)
from haed.device import resolve_device
from haed.distributed import refuse_under_torchrun
from haed.errors import HaedError
from haed.evaluate import evaluate_run
from haed.memory_cap import (
    PROBES_FILE,
    apply_configuration,
    choose_configuration,
    enforced_cap,
    probe_measure,
    read_saved_choices,
    save_choices,
    saved_choice,
    saved_entry,
)
from haed.model import build_model, count_parameters
from haed.objectives import DECODER, FLAT, FULL, IEM, MEGABYTE, Objective
from haed.recipe import Recipe, apply_overrides, recipe_from_dict
from haed.runs import read_metrics, recipe_changes
from haed.train import finish_phase

UNCAPPED_STEPS = 10**9  # with a time budget, `steps` only caps the run
PEER_MISSING = f"{peer.PACKAGE} is not installed (pip install 'haed[peer]')"


def flat_recipe(recipe: Recipe, overrides: list[str] | None = None) -> Recipe:
    """The flat baseline: the recipe's main stack over bytes, as deep as makes its parameter count
    closest to the hierarchical model's (unless `overrides` set the layers themselves)."""
    values = recipe.to_dict()
    values["model"]["arch"] = FLAT.arch
    if not any(o.split("=", 1)[0].strip() in ("main.layers", "model.main.layers") for o in overrides or []):
        target = count_parameters(build_model(recipe.model))["total"]
        sizes = {}
        for layers in (1, 2):
            trial = copy.deepcopy(values)
            trial["model"]["main"]["layers"] = layers
            sizes[layers] = count_parameters(build_model(recipe_from_dict(trial).model))["total"]
        per_layer = sizes[2] - sizes[1]
        values["model"]["main"]["layers"] = max(1, round((target - (sizes[1] - per_layer)) / per_layer))
    apply_overrides(values, list(overrides or []))
    return recipe_from_dict(values)


def _budgeted(cfg, seconds: float, evals: int):
    return dataclasses.replace(
        cfg,
        time_budget=seconds,
        steps=UNCAPPED_STEPS,
        eval_every=0,
        eval_every_seconds=seconds / max(1, evals),
        ckpt_every=UNCAPPED_STEPS,
    )


# Each system: (label, [(objective record, recipe), ...]), phases that share its budget; each phase starts
# from the one before it (its run in the objective's `subfolder` of that one's), and the last one is scored.
def _iem_system(recipe: Recipe, budget: float, decoder_fraction: float, evals: int, flat_overrides):
    r = copy.deepcopy(recipe)
    r.iem = _budgeted(r.iem, budget * (1 - decoder_fraction), evals)
    r.decoder = _budgeted(r.decoder, budget * decoder_fraction, evals)
    return "IEM + decoder phase", [(IEM, r), (DECODER, r)]


def _full_system(recipe: Recipe, budget: float, decoder_fraction: float, evals: int, flat_overrides):
    r = copy.deepcopy(recipe)
    r.full = _budgeted(r.full, budget, evals)
    return "full (end to end)", [(FULL, r)]


def _flat_system(recipe: Recipe, budget: float, decoder_fraction: float, evals: int, flat_overrides):
    r = flat_recipe(recipe, flat_overrides)
    r.full = _budgeted(r.full, budget, evals)
    return f"flat {r.model.main.layers}x{r.model.main.dim}", [(FLAT, r)]


def _megabyte_system(recipe: Recipe, budget: float, decoder_fraction: float, evals: int, flat_overrides):
    values = recipe.to_dict()
    values["model"]["arch"] = MEGABYTE.arch
    r = recipe_from_dict(values)
    r.full = _budgeted(r.full, budget, evals)
    m = r.model
    label = f"MEGABYTE-pytorch {peer.VERSION} {m.main.layers}x{m.main.dim} + {m.decoder.layers}x{m.decoder.dim}"
    return label, [(MEGABYTE, r)]


SYSTEMS = {"iem": _iem_system, "full": _full_system, "flat": _flat_system, "megabyte": _megabyte_system}
DEFAULT_SYSTEMS = ("iem", "full", "flat", "megabyte")


def _valid_curve(run_dir: Path, offset: float = 0.0, metric: str = "bits_per_byte") -> list[list[float]]:
    return [
        [offset + r["train_seconds"], r[metric]]
        for r in read_metrics(run_dir / "metrics.jsonl")
        if r["split"] == "valid" and metric in r
    ]


def _choose_systems(systems: tuple[str, ...] | None, say) -> tuple[str, ...]:
    """The systems asked for; by default every one, the peer only where its package is installed."""
    explicit = systems is not None
    systems = tuple(systems) if explicit else DEFAULT_SYSTEMS
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise HaedError(f"unknown system {unknown[0] if unknown else '(none)'}: choose from {', '.join(SYSTEMS)}")
    if "megabyte" in systems:
        try:
            peer.megabyte_class()
        except HaedError as e:
            if explicit:
                raise HaedError(f"{e}; or leave megabyte out of --systems") from None
            say(f"megabyte left out: {PEER_MISSING}")
            systems = tuple(s for s in systems if s != "megabyte")
    return systems


def _check_options(recipe: Recipe, budget: float, decoder_fraction: float, evals: int, eval_data, eval_bytes) -> None:
    if budget <= 0:
        raise HaedError(f"the time budget must be positive, not {budget}")
    if not 0 < decoder_fraction < 1:
        raise HaedError(f"--decoder-fraction must lie between 0 and 1, not {decoder_fraction}")
    if evals < 1:
        raise HaedError(f"--evals must be at least 1, not {evals}")
    if eval_bytes is not None and eval_bytes < 1:
        raise HaedError(f"--eval-bytes must be at least 1, not {eval_bytes}")
    if recipe.model.arch != "haed":
        raise HaedError("compare starts from a hierarchical recipe (model.arch = 'haed')")
    for path in eval_data or []:
        if not Path(path).exists():
            raise HaedError(f"--eval-data {path} does not exist")


def _refuse_other_runs(out_dir: Path, plans: dict) -> None:
    """A folder that already holds a phase made with other settings (another budget, share, recipe or
    capped configuration) is refused before anything trains: its numbers would not be this comparison's.
    A phase's settings are the data, the model and its own section (a copied IEM phase may differ in
    `decoder`)."""
    for system, (_, phases) in plans.items():
        for objective, phase_recipe in phases:
            phase_dir = out_dir / system / objective.subfolder
            if (phase_dir / "config.json").is_file():
                own = ("data.", "model.", f"{objective.section}.")
                changes = [
                    c for c in recipe_changes(read_run_config(phase_dir)["recipe"], phase_recipe) if c.startswith(own)
                ]
                if changes:
                    raise HaedError(
                        f"{phase_dir} holds a run made with other settings ({'; '.join(changes)}): "
                        f"compare into another --out, or remove it"
                    )


def _cap_plans(plans: dict, cap_gib: float, device, compile: bool, say, out_dir: Path, setting: dict, measure_for=None):
    """(the plans, each phase of each system at its fastest configuration under the cap; the probes per
    phase; the choices to save in `out_dir`, with the saved ones of systems not run now). A phase probed
    by an earlier run of this comparison under the same `setting` takes that choice
    (`haed.memory_cap.read_saved_choices`); the others are probed now, before any clock starts.
    `measure_for(recipe, objective name)` replaces the real probe (tests)."""
    capped, probes, choices = {}, {}, {}
    saved = read_saved_choices(out_dir, setting)
    for system, (label, phases) in plans.items():
        new_phases = []
        for objective, phase_recipe in phases:
            key, name = f"{system}/{objective.name}", f"{label}, {objective.name} phase" if len(phases) > 1 else label
            earlier = saved_choice(saved.get(key), phase_recipe)
            if earlier is not None:
                chosen, tried = earlier
                say(f"{name} under {cap_gib:g} GiB: {chosen.describe()} (probed before: {out_dir / PROBES_FILE})")
            else:
                if measure_for is not None:
                    measure = measure_for(phase_recipe, objective.name)
                else:
                    measure = probe_measure(phase_recipe, objective, device, compile)
                chosen, tried = choose_configuration(phase_recipe, objective, measure, cap_gib, name, on_probe=say)
                say(f"{name} under {cap_gib:g} GiB: {chosen.describe()} ({len(tried)} probed)")
            new_phases.append((objective, apply_configuration(phase_recipe, objective, chosen)))
            probes[(system, objective.name)] = (chosen, tried)
            choices[key] = saved_entry(phase_recipe, chosen, tried)
        capped[system] = (label, new_phases)
    return capped, probes, {**saved, **choices}  # phases of systems not run now keep their saved choice


def _final_plans(
    plans: dict, cap_gib, gpu, device, compile: bool, say, out_dir: Path, measure_for
) -> tuple[dict, dict]:
    """(the plans as they will train, the probes per phase): under a cap each phase at its chosen
    configuration, saved in `out_dir` for a rerun; refused where `out_dir` holds runs of other settings."""
    if cap_gib is None:
        _refuse_other_runs(out_dir, plans)
        return plans, {}
    setting = {"memory_cap_gib": cap_gib, "gpu": gpu, "compile": compile}
    plans, probes, choices = _cap_plans(plans, cap_gib, device, compile, say, out_dir, setting, measure_for)
    _refuse_other_runs(out_dir, plans)
    save_choices(out_dir, setting, choices)  # a rerun into out_dir takes these instead of probing anew
    return plans, probes


def _attach_probes(rows: list[dict], probes: dict) -> None:
    """Each phase row gets its probes under a cap (None without one), and the lean settings chosen."""
    for row in rows:
        for phase in row["phases"]:
            chosen, phase["probe"] = probes.get((row["system"], phase["objective"]), (None, None))
            if chosen is not None and chosen.settings:
                phase["settings"] = dict(chosen.settings)  # what the cap changed besides batch and recomputation


# Said when a comparison on a GPU runs eager: compiled, every system is faster, and not by the same factor
# (docs/2026-12-06-big-corpora.md: as CUDA graphs full training won on code, where eager IEM had).
EAGER_NOTE = (
    "every system trains eager: --compile compiles each phase in its recipe's compile_mode before its clock starts, "
    "faster, and on the code recipe it changed which system wins"
)


def compare(
    recipe: Recipe,
    out_dir: Path,
    budget: float,
    *,
    systems: tuple[str, ...] | None = None,
    decoder_fraction: float | None = None,
    evals: int = 10,
    flat_overrides: list[str] | None = None,
    eval_data: list[Path] | None = None,
    eval_bytes: int | None = None,
    device: str = "auto",
    compile: bool = False,
    memory_cap_gib: float | None = None,
    merge: list[Path] | None = None,
    on_event: Callable[[dict], None] | None = None,
    _measure_for=None,
) -> dict:
    """Train each system for `budget` seconds into `out_dir`, score it, write compare.json and compare.png.

    `systems`: any of iem (IEM + decoder phase), full, flat, megabyte (the MEGABYTE-pytorch peer); by
    default all of them, the peer where its package is installed. Finished runs are not retrained, so an
    interrupted comparison continues where it stopped. `eval_bytes`: score only the first N bytes of each
    split or file (all by default). `decoder_fraction`: the decoder phase's share of the IEM system's budget
    (default: the recipe's `compare.decoder_fraction`). `memory_cap_gib`: every phase trains under this
    enforced cap on GPU memory, at the fastest micro-batch and recomputation of its own that fits
    (`haed.memory_cap`, probed before any clock starts). `merge`: earlier compare.json files (other
    systems of the same comparison, run in other jobs) whose rows join this one's table, JSON and plot;
    their settings are checked before anything trains.
    """

    def say(text: str) -> None:
        if on_event:
            on_event({"event": "message", "text": text})

    refuse_under_torchrun("haed compare")
    decoder_fraction = recipe.compare.decoder_fraction if decoder_fraction is None else decoder_fraction
    _check_options(recipe, budget, decoder_fraction, evals, eval_data, eval_bytes)
    if memory_cap_gib is not None and not memory_cap_gib > 0:
        raise HaedError(f"--memory-cap must be a positive number of GiB, not {memory_cap_gib}")
    systems = _choose_systems(systems, say)
    out_dir = Path(out_dir)
    check_writable(out_dir / "compare.json", what="--out")
    plans = {system: SYSTEMS[system](recipe, budget, decoder_fraction, evals, flat_overrides) for system in systems}
    dev = resolve_device(device)
    if dev.type == "cuda" and not compile:
        say(EAGER_NOTE)
    header = {
        "budget_seconds": budget,
        "decoder_fraction": decoder_fraction,
        "memory_cap_gib": memory_cap_gib,
        "dataset": recipe.data.dataset,
        "recipe": recipe.name,
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
    }
    others = _read_merges(merge or [], header, systems)
    with enforced_cap(dev, memory_cap_gib):
        plans, probes = _final_plans(plans, memory_cap_gib, header["gpu"], dev, compile, say, out_dir, _measure_for)
        rows = [
            _run_system(system, label, phases, out_dir, device, compile, eval_data, eval_bytes, say, on_event)
            for system, (label, phases) in plans.items()
        ]
    _attach_probes(rows, probes)
    result = {
        **header,
        "device": rows[0]["device"],
        "unit": rows[0]["unit"],
        "windowing": rows[0]["windowing"],
        "rows": rows,
        **summarise(rows),
    }
    if others:
        result = merge_comparisons(result, *others)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "compare.json", json.dumps(result, indent=2))
    plot_comparison(result, out_dir / "compare.png")
    return result


def _read_merges(paths: list[Path], header: dict, systems: tuple[str, ...]) -> list[tuple[str, dict]]:
    """The comparisons to merge, read and checked against this one's settings before anything trains
    (the test bytes' unit, windowing and count are checked once this one's are known)."""
    planned = dict(header, rows=[{"system": s} for s in systems])
    others = []
    for path in paths:
        other = read_comparison(path)
        check_mergeable(planned, str(path), other, keys=tuple(k for k in header if k in SHARED))
        planned["rows"] += other["rows"]
        others.append((str(path), other))
    return others


def _run_system(system, label, phases, out_dir, device, compile, eval_data, eval_bytes, say, on_event) -> dict:
    """Train (or finish) one system's phases in order, each from the one before, and score the last."""
    run_dir = out_dir / system
    shares = " + ".join(f"{getattr(r, o.section).time_budget:g} s" for o, r in phases)
    say(f"{label}: {shares} into {run_dir}")
    seconds, curve, parent, phase_rows = 0.0, [], None, []
    for objective, phase_recipe in phases:
        phase_dir = run_dir / objective.subfolder
        done = finish_phase(
            phase_recipe, objective, phase_dir, init_from=parent, device=device, compile=compile, on_event=on_event
        )
        if done is None:
            say(f"{phase_dir} already finished")
        # The byte loss of an IEM phase (when on) gives validation bits per byte on a sample of patches.
        phase_curve = _valid_curve(phase_dir, offset=seconds, metric="bits_per_byte")
        phase_curve += _valid_curve(phase_dir, offset=seconds, metric="byte_bits_per_byte")
        curve += phase_curve
        phase_rows.append(_phase_row(objective, read_run_config(phase_dir), max(phase_curve, default=None)))
        seconds += phase_rows[-1]["train_seconds"]
        parent = phase_dir
    config = read_run_config(parent)
    test = evaluate_run(parent, "test", device=device, max_bytes=eval_bytes)
    row = {
        "system": system,
        "label": label,
        "arch": config["recipe"]["model"]["arch"],
        "run": str(parent),
        "train_seconds": seconds,
        "parameters": config["parameters"]["total"],
        "peak_memory_gib": max((p["peak_memory_gib"] or 0 for p in phase_rows), default=None) or None,
        "checkpoint": test["checkpoint"],
        "test_bits_per_byte": test["bits_per_byte"],
        "test_bytes": test["bytes"],
        "device": test["device"],
        "unit": test["unit"],
        "windowing": test["windowing"],
        "valid_curve": sorted(curve),
        "phases": phase_rows,
        "other_data": {},
    }
    for path in eval_data or []:
        other = evaluate_run(parent, device=device, max_bytes=eval_bytes, data=Path(path))
        row["other_data"][str(path)] = other["bits_per_byte"]
    return row


def _phase_row(objective: Objective, config: dict, last_valid: list[float] | None = None) -> dict:
    """What one phase did with its seconds: steps, training bytes per second (a system that trails at
    equal seconds may have learned less per step, or made fewer steps), and where its validation bits
    per byte ended (for an IEM phase, its byte loss's: how much the decoder phase still had to do)."""
    steps, seconds = config.get("steps_done", 0), config["train_seconds"]
    batch = config.get("global_batch", {})
    phase = config["recipe"][objective.section]
    return {
        "objective": objective.name,
        "steps": steps,
        "train_seconds": seconds,
        "bytes_per_second": steps * batch.get("bytes", 0) / seconds if seconds > 0 else None,
        "last_valid_bits_per_byte": last_valid[1] if last_valid else None,
        "peak_memory_gib": config.get("peak_memory_gib"),
        "batch_size": batch.get("batch_size"),
        "grad_accum": batch.get("grad_accum"),
        "recompute": phase.get("recompute", ""),
        # None where the phase ran eager (`--no-compile`, a CPU), else torch.compile's mode
        "compile_mode": phase.get("compile_mode", "default") if config.get("compiled") else None,
    }
