"""The comparison benchmarks of benchmarks/: merging comparisons run in several calls, the IEM variants sweep,
and the seconds a fitted curve needs to reach a target."""

import json

import pytest
from _tiny import load_benchmark, make_text_dataset

from haed.errors import HaedError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_text_dataset(tmp_path_factory.mktemp("data") / "words")


def _row(system: str, arch: str, bits: float) -> dict:
    return {
        "system": system,
        "label": system,
        "arch": arch,
        "test_bits_per_byte": bits,
        "test_bytes": 600,
        "parameters": 1_000_000,
        "train_seconds": 1.0,
        "peak_memory_gib": None,
        "valid_curve": [[1.0, bits]],
        "phases": [],
        "other_data": {},
    }


def test_the_merge_benchmark_keeps_the_chosen_rows_of_each_file(tmp_path, capsys):
    """benchmarks/merge_comparisons.py: FILE:SYSTEM,... keeps those rows; the ratios cover the merged rows."""
    merge_script = load_benchmark("merge_comparisons")
    shared = {
        "recipe": "code",
        "dataset": "/x/data/code",
        "budget_seconds": 150.0,
        "memory_cap_gib": None,
        "gpu": "H",
        "device": "cuda",
        "unit": "bits per byte",
        "windowing": "w",
        "decoder_fraction": 0.1,
    }
    a = dict(shared, rows=[_row("iem", "haed", 1.0), _row("full", "haed", 1.2)])
    b = dict(shared, dataset="data/code", rows=[_row("iem", "haed", 3.0), _row("flat", "flat", 1.25)])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    out = tmp_path / "m.json"
    args = [
        str(tmp_path / "a.json"),
        f"{tmp_path / 'b.json'}:flat",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "m.png"),
    ]
    assert merge_script.main(args) == 0
    merged = json.loads(out.read_text())
    assert [r["system"] for r in merged["rows"]] == ["iem", "full", "flat"]
    assert merged["iem_vs_full"] == pytest.approx(1.0 / 1.2) and merged["best_haed_vs_flat"] == pytest.approx(
        1.0 / 1.25
    )
    assert "1.2500" in capsys.readouterr().out
    assert (
        merge_script.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", str(tmp_path / "n.json")]) == 1
    )
    assert "repeats system iem" in capsys.readouterr().err and not (tmp_path / "n.json").exists()
    # A variants.json (benchmarks/iem_variants.py): its rows are picked by variant; each is an IEM row.
    variants = dict(
        shared,
        rows=[dict(_row("iem", "haed", bits), variant=name, overrides=[]) for name, bits in (("x", 1.1), ("y", 0.9))],
    )
    (tmp_path / "v.json").write_text(json.dumps(variants))
    picked = [f"{tmp_path / 'v.json'}:y", f"{tmp_path / 'a.json'}:full", "--json", str(tmp_path / "p.json")]
    assert merge_script.main([*picked, "--plot", str(tmp_path / "p.png")]) == 0
    merged = json.loads((tmp_path / "p.json").read_text())
    assert [(r["system"], r["test_bits_per_byte"]) for r in merged["rows"]] == [("iem", 0.9), ("full", 1.2)]
    assert merged["iem_vs_full"] == pytest.approx(0.9 / 1.2)
    assert merge_script.main([f"{tmp_path / 'v.json'}:iem", "--json", str(tmp_path / "q.json")]) == 1
    assert "has no row named iem" in capsys.readouterr().err and not (tmp_path / "q.json").exists()
    # Sweeps run in several jobs merge whole: rows told apart by variant, each against full training's row.
    full_row = dict(_row("full", "haed", 1.2), variant="full (end to end)", overrides=[])
    sweep = dict(shared, rows=[full_row, dict(_row("iem", "haed", 0.6), variant="z", overrides=["iem.tau=2.0"])])
    (tmp_path / "w.json").write_text(json.dumps(sweep))
    both = [str(tmp_path / "w.json"), str(tmp_path / "v.json"), "--json", str(tmp_path / "s.json")]
    assert merge_script.main([*both, "--plot", str(tmp_path / "s.png")]) == 0
    merged = json.loads((tmp_path / "s.json").read_text())
    assert [r["variant"] for r in merged["rows"]] == ["full (end to end)", "z", "x", "y"]
    assert merged["iem_vs_full"] is None  # three IEM rows: the ratio is each row's, in the table
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [line.rsplit("|", 2)[-2].strip() for line in table[1:]] == ["1.000", "0.500", "0.917", "0.750"]
    assert (tmp_path / "s.png").stat().st_size > 0
    again = [
        str(tmp_path / "w.json"),
        str(tmp_path / "v.json"),
        str(tmp_path / "v.json"),
        "--json",
        str(tmp_path / "t.json"),
    ]
    assert merge_script.main(again) == 1
    assert "repeats variant x" in capsys.readouterr().err and not (tmp_path / "t.json").exists()


def test_the_variants_benchmark_sets_each_variant_beside_full_training(dataset, tmp_path, capsys, monkeypatch):
    """benchmarks/iem_variants.py: full training, then each IEM variant with its overrides, every one for the same
    seconds; one table, JSON and PNG, each row's test score against full training's, written after each system.
    Bad input is one line."""
    script = load_benchmark("iem_variants")
    common = ["--recipe", "tiny", "--dataset", str(dataset), "--budget", "1", "--evals", "2", "--device", "cpu"]
    common += ["--set", "iem.batch_size=4", "--set", "decoder.batch_size=4", "--set", "full.batch_size=4"]
    out = tmp_path / "v"
    summary = script.main([*common, "--baselines", "full", "--variant", "t2:iem.tau=2.0", "--out", str(out)])
    rows = summary["rows"]
    assert [(r["variant"], r["overrides"]) for r in rows] == [("full (end to end)", []), ("IEM t2", ["iem.tau=2.0"])]
    assert json.loads((out / "t2" / "iem" / "config.json").read_text())["recipe"]["iem"]["tau"] == 2.0
    assert all(0.9 <= r["train_seconds"] for r in rows) and (out / "variants.png").stat().st_size > 0
    saved = json.loads((out / "variants.json").read_text())
    assert saved["rows"][1]["test_bits_per_byte"] == rows[1]["test_bits_per_byte"]
    table = (out / "variants.md").read_text().splitlines()
    assert table[2].endswith("| 1.000 |")
    assert table[3].endswith(f"| {rows[1]['test_bits_per_byte'] / rows[0]['test_bits_per_byte']:.3f} |")
    with pytest.raises(HaedError, match="nothing to compare"):
        script.main([*common, "--baselines", "", "--out", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()
    # A bad override of any variant is refused before the baselines train.
    with pytest.raises(HaedError, match="tau"):
        script.main([*common, "--baselines", "full", "--variant", "bad:iem.tau=oops", "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
    # A sweep stopped in a variant (a time limit) keeps the table of the systems that finished; run again, the
    # finished ones are read back from their runs, not trained anew.
    (out / "variants.json").unlink()
    real_compare = script.compare

    def stopped_in_t3(recipe, out_dir, *args, **kwargs):
        if out_dir.name == "t3":
            raise HaedError("stopped by a signal")
        return real_compare(recipe, out_dir, *args, **kwargs)

    monkeypatch.setattr(script, "compare", stopped_in_t3)
    sweep = ["--baselines", "full", "--variant", "t2:iem.tau=2.0", "--variant", "t3:", "--out", str(out)]
    with pytest.raises(HaedError, match="stopped"):
        script.main([*common, *sweep])
    kept = json.loads((out / "variants.json").read_text())["rows"]
    assert [(r["variant"], r["test_bits_per_byte"]) for r in kept] == [
        (r["variant"], r["test_bits_per_byte"]) for r in rows
    ]


def test_the_seconds_to_target_benchmark_recovers_a_known_curve(tmp_path, capsys):
    """benchmarks/seconds_to_target.py: a curve made from `a + b t^-c` gives back a, b, c, the seconds to
    a value below its end, where another row's last value lies, and infinity below the asymptote."""
    script = load_benchmark("seconds_to_target")

    def law(t):
        return 2.0 + 3.0 * t**-0.5

    full = _row("full", "haed", 0.0) | {"valid_curve": [[t, law(t)] for t in (30.0, 60.0, 90.0, 120.0, 150.0)]}
    iem = _row("iem", "haed", 0.0) | {"valid_curve": [[150.0, law(100.0)]]}
    (tmp_path / "c.json").write_text(json.dumps({"rows": [full, iem]}))
    result = script.main([str(tmp_path / "c.json"), "--lower", "3", "--lower", "60", "--at", "iem"])
    fit = result["fit"]
    assert (fit["a"], fit["b"], fit["c"]) == pytest.approx((2.0, 3.0, 0.5), abs=1e-6)
    target = law(150.0) * 0.97
    assert result["lower"]["3%"] == pytest.approx((3.0 / (target - 2.0)) ** 2, rel=1e-6)
    assert result["lower"]["60%"] == float("inf")  # below the asymptote
    assert result["at"]["iem"] == pytest.approx(100.0, rel=1e-6)
    assert "where full was at 100 s" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no validation curve for system 'flat'"):
        script.main([str(tmp_path / "c.json"), "--at", "flat"])
    # Per byte, from the phases: full at 2 MB/s for 150 s; IEM's two phases 3 MB/s x 100 s + 2 MB/s x 50 s.
    # Full reached IEM's last value at 100 s, after 200 MB, where IEM had trained on 400: half the bytes.
    full["phases"] = [{"bytes_per_second": 2e6, "train_seconds": 150.0}]
    iem["phases"] = [
        {"bytes_per_second": 3e6, "train_seconds": 100.0},
        {"bytes_per_second": 2e6, "train_seconds": 50.0},
    ]
    sweep = [dict(full, variant="full (end to end)"), dict(iem, variant="IEM dec30"), dict(iem, variant="IEM b")]
    (tmp_path / "v.json").write_text(json.dumps({"rows": sweep}))
    result = script.main([str(tmp_path / "v.json"), "--at", "dec30"])  # a sweep's row by its variant
    assert result["per_byte"]["dec30"] == pytest.approx({"bytes": 4e8, "fitted_system_bytes": 2e8, "ratio": 0.5})
    assert "after 200 MB; dec30 trained on 400 MB (full needed 0.50x its bytes)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="2 rows named 'iem': name a variant"):
        script.main([str(tmp_path / "v.json"), "--at", "iem"])
