"""Every option and input checked before work starts (issue 26, classes 5 and 6): bad values, malformed
dataset metadata, recipes that are not UTF-8, truncated WAVs, usage errors, and the quieter cases (relative
dataset paths, a parent run still training, --allow-changes alone, a folder given as a file)."""

from __future__ import annotations

import json
import shutil
import struct
import threading

import numpy as np
import pytest
from _faults import cli, one_error

from haed.checkpoint import RunLock, read_run_config
from haed.data import open_dataset
from haed.errors import HaedError
from haed.recipe import debug_recipe
from haed.train import train


@pytest.fixture
def root(text_run):
    return text_run


def test_a_length_the_device_cannot_hold_is_refused_before_loading(root):
    one_error(cli("generate", "--run", root / "run", "--max-bytes", "10000000000000"), "--max-bytes", "memory")


@pytest.mark.parametrize("option", ["--eval-bytes", "--evals"])
def test_compare_checks_its_options_before_anything_trains(root, tmp_path, option):
    out = tmp_path / "compare"
    args = ("--dataset", root / "words", "--seq-len", "64", "--time-budget", "5", "--out", out, option, "0")
    one_error(cli("compare", *args), option, "at least 1")
    assert not out.exists()


@pytest.mark.parametrize("splits", [None, [], {"train": {"bytes": "many"}}])
def test_malformed_splits_in_meta_json_are_one_line_and_leave_no_run(root, tmp_path, splits):
    dataset = tmp_path / "data"
    shutil.copytree(root / "words", dataset)
    meta = json.loads((dataset / "meta.json").read_text())
    meta["splits"] = splits
    (dataset / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(HaedError, match="splits"):
        open_dataset(dataset)
    one_error(cli("train-full", "--dataset", dataset, "--out", tmp_path / "run", "--seq-len", "64"), "splits")
    assert not (tmp_path / "run").exists()


def test_a_recipe_that_is_not_utf8_or_is_a_folder_is_one_line(tmp_path):
    recipe = tmp_path / "latin1.toml"
    recipe.write_bytes("name = 'caf\xe9'\n".encode("latin-1"))
    one_error(cli("train-iem", "--recipe", recipe, "--out", tmp_path / "run"), "UTF-8")
    one_error(cli("train-iem", "--recipe", tmp_path, "--out", tmp_path / "run"), "directory")
    assert not (tmp_path / "run").exists()


def _wav(path, samples: int, declared: int | None = None):
    from haed.audio import write_wav

    write_wav(path, np.sin(np.arange(samples) / 5.0) * 0.3, 8000)
    if declared is not None:
        data = bytearray(path.read_bytes())
        data[40:44] = struct.pack("<I", declared)
        path.write_bytes(bytes(data))
    return path


def test_a_wav_cut_short_after_its_header_is_refused(root, tmp_path):
    pytest.importorskip("soundfile")
    from haed.audio import read_audio

    whole = _wav(tmp_path / "whole.wav", 800)
    assert len(read_audio(whole, 8000)) == 800
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[:900])
    with pytest.raises(HaedError, match="truncated: its header promises 1,600 bytes of samples, the file holds 856"):
        read_audio(cut, 8000)
    with pytest.raises(HaedError, match="truncated"):
        read_audio(cut.read_bytes(), 8000)  # the same from bytes (a dataset row)
    assert len(read_audio(_wav(tmp_path / "open.wav", 800, declared=0xFFFFFFFF), 8000)) == 800  # length left open
    with pytest.raises(HaedError, match="is a folder, not an audio file"):
        read_audio(tmp_path, 8000)


@pytest.mark.parametrize(
    "args, says",
    [
        (["train-iem", "--steps", "abc"], "--steps"),
        (["bogus"], "no such command 'bogus'"),
        (["train-iem", "--resume", "true"], "unexpected extra argument"),
        (["evaluate"], "missing option '--run'"),
        (["prepare", "text"], "missing argument"),
        (["generate", "--run"], "requires an argument"),
        (["train-full", "--arch", "wide"], "--arch is haed or flat"),
    ],
)
def test_usage_errors_are_one_error_line_with_exit_status_2(args, says):
    r = cli(*args)
    line = one_error(r, says, "--help`)", code=2)
    assert "╭" not in r.stdout + r.stderr and "Usage:" not in r.stdout + r.stderr, line


def test_the_help_and_version_are_unchanged():
    assert cli("--version").exit_code == 0
    assert cli("evaluate", "--help").exit_code == 0
    assert "Usage" in cli().stdout + cli().stderr  # `haed` alone shows the help


def test_a_relative_dataset_is_stored_absolute_and_resumes_from_anywhere(root, tmp_path, monkeypatch):
    monkeypatch.chdir(root)
    recipe = debug_recipe("words")
    recipe.full.steps, recipe.full.ckpt_every, recipe.full.eval_every = 2, 1, 0
    train(recipe, "full", tmp_path / "run", stop_after=1)
    recorded = read_run_config(tmp_path / "run")["recipe"]["data"]["dataset"]
    assert recorded == str(root / "words")
    monkeypatch.chdir(tmp_path)
    assert train(None, "full", tmp_path / "run", resume=True).step == 2


def test_allow_changes_without_resume_is_an_error(root, tmp_path):
    args = ("--dataset", root / "words", "--out", tmp_path / "run", "--seq-len", "64", "--allow-changes")
    one_error(cli("train-full", *args), "--allow-changes", "--resume")
    assert not (tmp_path / "run").exists()


def test_a_folder_given_as_a_prompt_file_is_named_as_a_folder(root, tmp_path):
    one_error(cli("generate", "--run", root / "run", "--prompt-file", tmp_path), "is a folder")


def test_the_decoder_phase_refuses_a_parent_still_training_or_waits_for_it(root, tmp_path):
    parent = tmp_path / "iem"
    recipe = debug_recipe(str(root / "words"))
    recipe.iem.steps = recipe.decoder.steps = 2
    train(recipe, "iem", parent)
    lock = RunLock(parent).__enter__()  # as a training process holds it
    try:
        one_error(cli("train-decoder", "--run", parent), "still being trained", "--wait")
        assert not (parent / "decoder").exists()
        threading.Timer(0.5, lock.__exit__, (None, None, None)).start()
        messages = []
        result = train(
            recipe,
            "decoder",
            parent / "decoder",
            init_from=parent,
            wait_for_parent=True,
            on_event=lambda e: messages.append(e.get("text", "")),
        )
    finally:
        lock.__exit__(None, None, None)
    assert result.step == 2 and any("waiting for" in m for m in messages)
