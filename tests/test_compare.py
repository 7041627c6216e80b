"""`haed compare`: every system trained for the same seconds, scored on test bytes, written as JSON and PNG."""

import json
import re

import pytest
from _tiny import make_text_dataset
from typer.testing import CliRunner

from haed.compare import _choose_systems, compare, flat_recipe
from haed.compare_report import describe_configuration, describe_phase_ends
from haed.errors import HaedError
from haed.model import build_model, count_parameters
from haed.recipe import apply_overrides, debug_recipe, recipe_from_dict
from haed_cli.main import app


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_text_dataset(tmp_path_factory.mktemp("data") / "words")


def test_flat_baseline_is_sized_to_the_hierarchys_parameter_count(dataset):
    recipe = debug_recipe(str(dataset))
    haed = count_parameters(build_model(recipe.model))["total"]
    flat = flat_recipe(recipe)
    sizes = {}
    for layers in range(1, 12):
        trial = flat_recipe(recipe, [f"main.layers={layers}"])
        sizes[layers] = count_parameters(build_model(trial.model))["total"]
    assert flat.model.arch == "flat"
    assert flat.model.main.layers == min(sizes, key=lambda n: abs(sizes[n] - haed))
    assert flat_recipe(recipe, ["main.layers=1"]).model.main.layers == 1


def test_compare_gives_every_system_the_budget_and_a_test_score(dataset, tmp_path):
    recipe = debug_recipe(str(dataset))
    other = tmp_path / "other.txt"
    other.write_bytes(b"the cat sat on the mat " * 40)
    result = compare(recipe, tmp_path / "cmp", 1.0, evals=2, eval_data=[other], device="cpu")
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"iem", "full", "flat", "megabyte"}  # by default the peer too, where it is installed
    assert rows["megabyte"]["arch"] == "megabyte" and rows["megabyte"]["label"].startswith("MEGABYTE-pytorch 0.3.6")
    assert result["best_haed_vs_megabyte"] == pytest.approx(
        min(rows["iem"]["test_bits_per_byte"], rows["full"]["test_bits_per_byte"])
        / rows["megabyte"]["test_bits_per_byte"]
    )
    for row in rows.values():
        assert row["train_seconds"] >= 0.9 * 1.0  # the IEM system's two phases share one budget
        assert 0 < row["test_bits_per_byte"] < 9 and row["test_bytes"] == 600
        assert 0 < row["other_data"][str(other)] < 9
        assert row["valid_curve"] and all(len(p) == 2 for p in row["valid_curve"])
    # The IEM system's curve starts after its IEM phase: the decoder phase is where bits per byte exist.
    iem_seconds = json.loads((tmp_path / "cmp" / "iem" / "config.json").read_text())["train_seconds"]
    assert rows["iem"]["valid_curve"][0][0] > iem_seconds
    assert rows["iem"]["run"].endswith("decoder") and rows["iem"]["checkpoint"].endswith("best")
    # Each phase reports its steps and training throughput, from its own run config.
    assert [p["objective"] for p in rows["iem"]["phases"]] == ["iem", "decoder"]
    assert [p["objective"] for p in rows["full"]["phases"]] == ["full"]
    iem_config = json.loads((tmp_path / "cmp" / "iem" / "config.json").read_text())
    first = rows["iem"]["phases"][0]
    assert first["steps"] == iem_config["steps_done"] > 0
    assert first["bytes_per_second"] == pytest.approx(
        iem_config["steps_done"] * iem_config["global_batch"]["bytes"] / iem_config["train_seconds"]
    )
    assert sum(p["train_seconds"] for p in rows["iem"]["phases"]) == pytest.approx(rows["iem"]["train_seconds"])
    # Where each phase's validation ended: the decoder phase at the curve's last point; this IEM phase,
    # without a byte loss, has no bits per byte.
    assert first["last_valid_bits_per_byte"] is None
    assert rows["iem"]["phases"][1]["last_valid_bits_per_byte"] == rows["iem"]["valid_curve"][-1][1]
    assert rows["full"]["phases"][0]["last_valid_bits_per_byte"] == rows["full"]["valid_curve"][-1][1]
    assert describe_phase_ends(rows["iem"]) == f"- + {rows['iem']['valid_curve'][-1][1]:.4f}"
    assert result["iem_vs_full"] == pytest.approx(
        rows["iem"]["test_bits_per_byte"] / rows["full"]["test_bits_per_byte"]
    )
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["rows"][0]["test_bits_per_byte"] == result["rows"][0]["test_bits_per_byte"]
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    # Finished runs are kept: a second call only re-scores them.
    again = compare(recipe, tmp_path / "cmp", 1.0, evals=2, device="cpu")
    assert [r["train_seconds"] for r in again["rows"]] == [r["train_seconds"] for r in result["rows"]]


def test_compare_refuses_bad_options(dataset, tmp_path):
    recipe = debug_recipe(str(dataset))
    with pytest.raises(HaedError, match="time budget must be positive"):
        compare(recipe, tmp_path / "a", 0)
    with pytest.raises(HaedError, match="decoder-fraction"):
        compare(recipe, tmp_path / "a", 1, decoder_fraction=1.5)
    with pytest.raises(HaedError, match="unknown system"):
        compare(recipe, tmp_path / "a", 1, systems=("iem", "mystery"))
    with pytest.raises(HaedError, match="--evals must be at least 1"):
        compare(recipe, tmp_path / "a", 1, evals=0)
    with pytest.raises(HaedError, match="--eval-bytes must be at least 1"):
        compare(recipe, tmp_path / "a", 1, eval_bytes=0)
    with pytest.raises(HaedError, match="--memory-cap must be a positive"):
        compare(recipe, tmp_path / "a", 1, memory_cap_gib=0)
    with pytest.raises(HaedError, match="needs a CUDA device"):
        compare(recipe, tmp_path / "a", 1, memory_cap_gib=8, device="cpu")
    assert not (tmp_path / "a").exists()


def test_without_the_peers_package_megabyte_is_left_out_by_default_and_refused_when_asked(
    dataset, tmp_path, monkeypatch
):
    from haed import peer

    def missing():
        raise HaedError("model.arch = 'megabyte' needs MEGABYTE-pytorch (No module named 'MEGABYTE_pytorch')")

    monkeypatch.setattr(peer, "megabyte_class", missing)
    recipe = debug_recipe(str(dataset))
    with pytest.raises(HaedError, match="leave megabyte out of --systems"):
        compare(recipe, tmp_path / "a", 1, systems=("full", "megabyte"), device="cpu")
    said = []
    assert _choose_systems(None, said.append) == ("iem", "full", "flat")
    assert said == ["megabyte left out: MEGABYTE-pytorch is not installed (pip install 'haed[peer]')"]
    assert not (tmp_path / "a").exists()


def _debug_recipe_with(dataset, overrides):
    """The debug recipe with `--set`-style overrides, checked as a recipe file would be."""
    table = debug_recipe(str(dataset)).to_dict()
    apply_overrides(table, overrides)
    return recipe_from_dict(table)


def test_the_decoder_phases_share_comes_from_the_recipe_unless_given(dataset, tmp_path):
    """`compare.decoder_fraction` splits the IEM system's budget; an explicit decoder_fraction wins."""
    recipe = _debug_recipe_with(dataset, ["compare.decoder_fraction=0.25"])
    result = compare(recipe, tmp_path / "recipe", 2.0, systems=("iem",), evals=1, device="cpu")
    iem = json.loads((tmp_path / "recipe" / "iem" / "config.json").read_text())["recipe"]
    assert (iem["iem"]["time_budget"], iem["decoder"]["time_budget"]) == (1.5, 0.5)
    assert result["decoder_fraction"] == 0.25
    given = compare(recipe, tmp_path / "given", 2.0, systems=("iem",), decoder_fraction=0.5, evals=1, device="cpu")
    decoder = json.loads((tmp_path / "given" / "iem" / "decoder" / "config.json").read_text())["recipe"]
    assert decoder["decoder"]["time_budget"] == 1.0 and given["decoder_fraction"] == 0.5
    # Into the same folder with another share: refused before anything trains, the finished runs kept.
    before = sorted(p.name for p in (tmp_path / "recipe" / "iem").iterdir())
    with pytest.raises(HaedError, match="holds a run made with other settings .*iem.time_budget: 1.5 -> 1.0"):
        compare(recipe, tmp_path / "recipe", 2.0, systems=("iem",), decoder_fraction=0.5, evals=1, device="cpu")
    assert sorted(p.name for p in (tmp_path / "recipe" / "iem").iterdir()) == before
    with pytest.raises(HaedError, match=r"compare.decoder_fraction must be in \(0, 1\)"):
        _debug_recipe_with(dataset, ["compare.decoder_fraction=1"])


def test_cli_compare_and_plain_progress_lines(dataset, tmp_path):
    recipe = tmp_path / "debug.toml"
    recipe.write_text(
        f'name = "debug"\n[data]\ndataset = "{dataset}"\nseq_len = 64\n'
        "[model]\npatch_size = 4\nencoder = { dim = 16, layers = 1, heads = 2 }\n"
        "main = { dim = 32, layers = 2, heads = 2 }\ndecoder = { dim = 16, layers = 2, heads = 2 }\n"
        "[iem]\nbatch_size = 2\nlog_every = 1\n[decoder]\nbatch_size = 2\nlog_every = 1\n[full]\nbatch_size = "
        "2\nlog_every = 1\n"
    )
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "compare",
            "--recipe",
            str(recipe),
            "--time-budget",
            "0.5",
            "--out",
            str(tmp_path / "c"),
            "--systems",
            "iem,full",
            "--evals",
            "1",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "IEM + decoder phase" in result.output and "full (end to end)" in result.output
    # Not a terminal: one plain line per log interval, with the budget's seconds, and no source locations.
    # (the seconds of step 1 depend on the machine's load: the line's form is what is checked)
    assert re.search(r"step 1 \(\d+\.\d+/0\.45 s\): loss ", result.output), result.output
    assert "train.py:" not in result.output
    assert json.loads((tmp_path / "c" / "compare.json").read_text())["budget_seconds"] == 0.5


def test_systems_run_in_separate_jobs_merge_into_one_comparison(dataset, tmp_path):
    """--merge: rows of an earlier compare.json join this run's table, JSON and plot, with the ratios over
    all rows; a file of another comparison (budget, data) or one repeating a system is refused before
    anything trains, in one line, and nothing is written."""
    recipe = debug_recipe(str(dataset))
    first = compare(recipe, tmp_path / "a", 1.0, systems=("full",), evals=1, device="cpu")
    runner = CliRunner()
    merged = compare(
        recipe, tmp_path / "b", 1.0, systems=("flat",), evals=1, device="cpu", merge=[tmp_path / "a" / "compare.json"]
    )
    assert [r["system"] for r in merged["rows"]] == ["flat", "full"]
    assert merged["merged_from"] == [str(tmp_path / "a" / "compare.json")]
    full, flat = (next(r for r in merged["rows"] if r["system"] == s) for s in ("full", "flat"))
    assert full == first["rows"][0]
    assert merged["best_haed_vs_flat"] == pytest.approx(full["test_bits_per_byte"] / flat["test_bits_per_byte"])
    assert json.loads((tmp_path / "b" / "compare.json").read_text())["best_haed_vs_flat"] == merged["best_haed_vs_flat"]
    assert (tmp_path / "b" / "compare.png").stat().st_size > 0

    for args, message in (
        (dict(budget=2.0, systems=("flat",)), "budget_seconds = 1.0, not 2.0"),
        (dict(budget=1.0, systems=("full",)), "repeats system full"),
    ):
        with pytest.raises(HaedError, match=re.escape(message)):
            compare(
                recipe,
                tmp_path / "c",
                args["budget"],
                systems=args["systems"],
                evals=1,
                device="cpu",
                merge=[tmp_path / "a" / "compare.json"],
            )
        assert not (tmp_path / "c").exists()
    (tmp_path / "bad.json").write_text("{}")
    result = runner.invoke(
        app,
        [
            "compare",
            "--dataset",
            str(dataset),
            "--time-budget",
            "1",
            "--systems",
            "flat",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "d"),
            "--merge",
            str(tmp_path / "bad.json"),
        ],
    )
    assert result.exit_code == 1 and "is not a compare.json" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "d").exists()


def test_the_configuration_says_how_each_phase_was_compiled(dataset, tmp_path):
    """A comparison's configuration column names each compiled phase's mode (CUDA graphs, the default mode)
    and nothing for an eager one, as a CPU run is."""
    row = {
        "phases": [
            {"batch_size": 16, "grad_accum": 1, "recompute": "main", "compile_mode": "reduce-overhead"},
            {"batch_size": 16, "grad_accum": 1, "compile_mode": "default"},
            {"batch_size": 8, "grad_accum": 2, "compile_mode": "max-autotune-no-cudagraphs"},
        ]
    }
    assert describe_configuration(row) == (
        "16 x 1 (main; CUDA graphs) + 16 x 1 (compiled) + 8 x 2 (compiled max-autotune-no-cudagraphs)"
    )
    recipe = debug_recipe(str(dataset))
    result = compare(recipe, tmp_path / "cmp", 0.5, systems=("full",), evals=1, device="cpu")
    assert [p["compile_mode"] for p in result["rows"][0]["phases"]] == [None]
    assert describe_configuration(result["rows"][0]) == "2 x 1"


@pytest.mark.parametrize("compiled", [False, True])
def test_an_eager_comparison_on_a_gpu_says_that_compile_may_change_the_verdict(
    dataset, tmp_path, monkeypatch, compiled
):
    """On CUDA without --compile, one line before anything trains (here a missing --merge file stops it right after)."""
    import torch

    import haed.compare

    monkeypatch.setattr(haed.compare, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    said = []
    with pytest.raises(HaedError):
        compare(
            debug_recipe(str(dataset)),
            tmp_path / "c",
            4,
            systems=("iem",),
            compile=compiled,
            merge=[tmp_path / "missing.json"],
            on_event=lambda e: said.append(e.get("text")),
        )
    assert (haed.compare.EAGER_NOTE in said) is not compiled
    assert not (tmp_path / "c").exists()
