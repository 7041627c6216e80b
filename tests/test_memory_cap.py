"""`haed compare --memory-cap`: the probe's choice under a fake cap (a fake measurement: no GPU needed), the
cap set on the device, and the chosen configuration trained and reported."""

import json

import pytest
from _tiny import make_text_dataset

from haed.compare import compare
from haed.compare_report import describe_configuration
from haed.errors import HaedError
from haed.recipe import apply_overrides, debug_recipe, recipe_from_dict


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_text_dataset(tmp_path_factory.mktemp("data") / "words")


def _debug_recipe_with(dataset, overrides):
    """The debug recipe with `--set`-style overrides, checked as a recipe file would be."""
    table = debug_recipe(str(dataset)).to_dict()
    apply_overrides(table, overrides)
    return recipe_from_dict(table)


def fake_measure(peaks: dict, times: dict):
    """A `measure` that reports, per (micro-batch, recompute) or (micro-batch, recompute, lean setting's
    value), a peak (GiB) and a step time (ms); an absent peak is an out-of-memory cell."""
    tried = []

    def measure(candidate):
        tried.append(candidate)
        key = (candidate.batch_size, candidate.recompute, *(value for _, value in candidate.settings))
        if key not in peaks:
            return {"status": "OOM", "peak_allocated_gib": 9.9, "peak_reserved_gib": 10.0, "median_step_ms": None}
        return {"status": "ok", "peak_allocated_gib": peaks[key], "peak_reserved_gib": peaks[key],
                "median_step_ms": times[key]}  # fmt: skip

    return measure, tried


def test_the_probe_picks_the_fastest_configuration_that_fits():
    from haed.memory_cap import Candidate, choose_configuration, micro_batches

    assert micro_batches(16) == [16, 8, 4, 2, 1] and micro_batches(12) == [12, 6, 3, 1] and micro_batches(1) == [1]
    recipe = _debug_recipe_with(None, ["full.batch_size=8", "full.grad_accum=2"])  # a global batch of 16
    # 16 at once fits only with the main model recomputed (slow); 8 x 2 fits with nothing recomputed.
    peaks = {(16, "main,decoder"): 7.0, (8, ""): 7.5, (4, ""): 4.0}
    times = {(16, "main,decoder"): 300.0, (8, ""): 250.0, (4, ""): 260.0}
    measure, tried = fake_measure(peaks, times)
    chosen, probes = choose_configuration(recipe, "full", measure, cap_gib=8.0, label="full")
    assert chosen == Candidate(8, 2, "")
    # 16: none, decoder, main+decoder (fits); 8: none fits, so smaller micro-batches are not tried.
    assert [(c.batch_size, c.recompute) for c in tried] == [(16, ""), (16, "decoder"), (16, "main,decoder"), (8, "")]
    assert [p["fits"] for p in probes] == [False, False, True, True]
    # A peak within the headroom below the cap does not fit: 7.7 GiB of 8 leaves less than 5%.
    measure, _ = fake_measure({(16, ""): 7.7, (8, ""): 7.0}, {(16, ""): 100.0, (8, ""): 120.0})
    assert choose_configuration(recipe, "full", measure, 8.0, "full")[0] == Candidate(8, 2, "")


def test_under_a_cap_iem_first_takes_smaller_softmax_chunks_then_recomputes():
    from haed.memory_cap import Candidate, choose_configuration, memory_choices
    from haed.objectives import IEM

    lean = (("logits_chunk", 2048),)
    recipe = _debug_recipe_with(None, ["iem.batch_size=4", "iem.logits_chunk=16384"])
    assert memory_choices(IEM, recipe.iem) == [("", ()), ("", lean), ("main", lean), ("encoder,main,decoder", lean)]
    # The whole batch fits once the softmax is chunked: nothing is recomputed, no smaller micro-batch tried.
    measure, tried = fake_measure({(4, "", 2048): 6.0, (2, ""): 5.0}, {(4, "", 2048): 100.0, (2, ""): 90.0})
    chosen, probes = choose_configuration(recipe, "iem", measure, cap_gib=8.0, label="iem")
    assert chosen == Candidate(4, 1, "", lean) and chosen.describe() == "4 x 1, logits_chunk 2048"
    assert [(c.batch_size, c.recompute, c.settings) for c in tried] == [(4, "", ()), (4, "", lean)]
    assert [p["settings"] for p in probes] == [{}, {"logits_chunk": 2048}]
    # Where it does not fit chunked either, recomputation keeps the smaller chunks.
    measure, tried = fake_measure({(4, "main", 2048): 5.0, (2, ""): 7.0}, {(4, "main", 2048): 120.0, (2, ""): 110.0})
    assert choose_configuration(recipe, "iem", measure, 8.0, "iem")[0] == Candidate(2, 2, "")
    assert [(c.batch_size, c.recompute) for c in tried] == [(4, ""), (4, ""), (4, "main"), (2, "")]
    # A recipe whose chunks are already that small, and an objective without a softmax, try nothing lean.
    small = _debug_recipe_with(None, ["iem.logits_chunk=1024"])
    assert memory_choices(IEM, small.iem) == [("", ()), ("main", ()), ("encoder,main,decoder", ())]


def test_the_cap_is_set_on_the_current_device_when_none_is_named(monkeypatch):
    """`--device cuda` names no index; PyTorch's per-process fraction needs one (this failed on an H100)."""
    import torch

    from haed.memory_cap import enforced_cap

    calls = []
    props = type("Props", (), {"total_memory": 80 * 2**30})()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device: calls.append((f, device)))
    with enforced_cap(torch.device("cuda"), 8):
        assert calls == [(0.1, torch.device("cuda", 3))]
    assert calls[-1] == (1.0, torch.device("cuda", 3))
    with pytest.raises(HaedError, match="more than this GPU has"):
        with enforced_cap(torch.device("cuda", 0), 81):
            pass


def test_a_cap_nothing_fits_is_one_error_before_anything_trains(dataset, tmp_path, monkeypatch):
    import haed.compare as compare_module
    from haed.memory_cap import enforced_cap

    monkeypatch.setattr(compare_module, "enforced_cap", lambda dev, cap: enforced_cap(dev, None))  # no GPU here
    measure, tried = fake_measure({}, {})
    with pytest.raises(HaedError, match=r"--memory-cap 0.5 GiB: no configuration of full \(end to end\) fits"):
        compare(
            debug_recipe(str(dataset)), tmp_path / "capped", 1.0, systems=("iem", "full"), device="cpu",
            memory_cap_gib=0.5, _measure_for=lambda recipe, objective: measure if objective == "full" else
            fake_measure({(2, ""): 0.1}, {(2, ""): 5.0})[0],
        )  # fmt: skip
    assert len(tried) == 2 * 4  # micro-batches 2 and 1, each with every recomputation of full training
    assert not (tmp_path / "capped").exists()


def test_capped_phases_train_at_the_chosen_configuration(dataset, tmp_path, monkeypatch):
    import haed.compare as compare_module
    from haed.memory_cap import enforced_cap

    monkeypatch.setattr(compare_module, "enforced_cap", lambda dev, cap: enforced_cap(dev, None))
    recipe = _debug_recipe_with(dataset, ["full.batch_size=4"])
    peaks = {
        (4, ""): 9.0,
        (4, "decoder"): 9.0,
        (4, "main,decoder"): 9.0,
        (4, "encoder,main,decoder"): 9.0,
        (2, ""): 1.0,
    }
    result = compare(
        recipe, tmp_path / "capped", 0.5, systems=("full",), evals=1, device="cpu", memory_cap_gib=2.0,
        _measure_for=lambda r, o: fake_measure(peaks, {k: 10.0 for k in peaks})[0],
    )  # fmt: skip
    phase = result["rows"][0]["phases"][0]
    assert (phase["batch_size"], phase["grad_accum"], phase["recompute"]) == (2, 2, "")
    assert [p["fits"] for p in phase["probe"]] == [False] * 4 + [True] and result["memory_cap_gib"] == 2.0
    config = json.loads((tmp_path / "capped" / "full" / "config.json").read_text())
    assert config["global_batch"]["windows"] == 4 and config["recipe"]["full"]["grad_accum"] == 2
    assert "settings" not in phase and describe_configuration(result["rows"][0]) == "2 x 2"


def test_a_lean_setting_the_cap_chose_trains_and_is_reported(dataset, tmp_path, monkeypatch):
    import haed.compare as compare_module
    from haed.memory_cap import enforced_cap

    monkeypatch.setattr(compare_module, "enforced_cap", lambda dev, cap: enforced_cap(dev, None))
    recipe = _debug_recipe_with(dataset, ["iem.batch_size=2", "decoder.batch_size=2", "iem.logits_chunk=4096"])
    peaks = {"iem": {(2, "", 2048): 1.0}, "decoder": {(2, ""): 1.0}}  # IEM fits only chunked
    result = compare(
        recipe, tmp_path / "capped", 0.5, systems=("iem",), evals=1, device="cpu", memory_cap_gib=2.0,
        _measure_for=lambda r, o: fake_measure(peaks[o], {k: 10.0 for k in peaks[o]})[0],
    )  # fmt: skip
    row = result["rows"][0]
    iem, decoder = row["phases"]
    assert iem["settings"] == {"logits_chunk": 2048} and "settings" not in decoder
    assert describe_configuration(row) == "2 x 1 (logits_chunk 2048) + 2 x 1"
    config = json.loads((tmp_path / "capped" / "iem" / "config.json").read_text())
    assert config["recipe"]["iem"]["logits_chunk"] == 2048


def test_a_rerun_into_the_same_folder_takes_the_earlier_probes(dataset, tmp_path, monkeypatch):
    """An interrupted capped comparison runs again into its --out: each phase takes the choice kept in
    probes.json instead of probing anew (compiled, minutes of probes), and only under the same cap."""
    import haed.compare as compare_module
    from haed.memory_cap import enforced_cap

    monkeypatch.setattr(compare_module, "enforced_cap", lambda dev, cap: enforced_cap(dev, None))
    recipe = _debug_recipe_with(dataset, ["full.batch_size=4"])
    peaks = {(4, "encoder,main,decoder"): 1.5, (2, ""): 1.0}
    times = {(4, "encoder,main,decoder"): 30.0, (2, ""): 10.0}
    measured = []

    def run(cap, system="full"):
        measure, tried = (
            fake_measure(peaks, times) if system == "full" else fake_measure({(2, ""): 1.0}, {(2, ""): 5.0})
        )
        messages = []
        result = compare(
            recipe, tmp_path / "capped", 0.5, systems=(system,), evals=1, device="cpu", memory_cap_gib=cap,
            _measure_for=lambda r, o: measure, on_event=lambda e: messages.append(e.get("text", "")),
        )  # fmt: skip
        measured.append(len(tried))
        return result["rows"][0]["phases"][0], messages

    first, messages = run(2.0)
    probed = [m for m in messages if ": probed " in m]  # a line as each probe ends
    assert probed[0] == "full (end to end): probed 4 x 1: OOM at 9.90 GiB"
    assert probed[-1] == "full (end to end): probed 2 x 2: 1.00 GiB, 10.0 ms a step, fits" and len(probed) == 5
    saved = json.loads((tmp_path / "capped" / "probes.json").read_text())
    assert saved["setting"] == {"memory_cap_gib": 2.0, "gpu": None, "compile": False}
    assert saved["phases"]["full/full"]["chosen"] == {"batch_size": 2, "grad_accum": 2, "recompute": "", "settings": {}}
    again, messages = run(2.0)
    assert measured == [5, 0] and again["probe"] == first["probe"] and again["batch_size"] == 2
    assert any("2 x 2 (probed before:" in m for m in messages) and not any(": probed " in m for m in messages)
    run(2.0, "iem")  # another system into the same folder: the saved choices gain its phases, keep full's
    assert set(json.loads((tmp_path / "capped" / "probes.json").read_text())["phases"]) == {
        "full/full",
        "iem/iem",
        "iem/decoder",
    }
    other_cap, _ = run(3.0)  # another cap: probed anew (the same choice here, so the finished run stands)
    assert measured[-1] == 5 and other_cap["batch_size"] == 2
    assert json.loads((tmp_path / "capped" / "probes.json").read_text())["setting"]["memory_cap_gib"] == 3.0
