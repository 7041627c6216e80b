"""Every bad input: one clear `error:` line, a non-zero exit, and no output directory left behind."""

from __future__ import annotations

import json

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")


@pytest.fixture
def wavs(tmp_path):
    d = tmp_path / "wavs"
    d.mkdir()
    for i in range(40):
        sf.write(
            str(d / f"{i % 10}_spk_{i}.wav"), 0.1 * np.sin(np.arange(800) * (0.05 + 0.001 * i)), 8000, subtype="PCM_16"
        )
    return d


def test_text_bad_inputs(tmp_path, prepare_cli, assert_clean_failure):
    out = tmp_path / "out" / "ds"
    assert_clean_failure(
        prepare_cli("text", tmp_path / "missing.txt", "--out", out), out, "no such file or folder", "missing.txt"
    )
    (tmp_path / "emptydir").mkdir()
    assert_clean_failure(prepare_cli("text", tmp_path / "emptydir", "--out", out), out, "contains no files")
    (tmp_path / "zero.txt").write_bytes(b"")
    assert_clean_failure(prepare_cli("text", tmp_path / "zero.txt", "--out", out), out, "empty")
    small = tmp_path / "small.txt"
    small.write_bytes(b"only nine")
    assert_clean_failure(prepare_cli("text", small, "--out", out), out, "valid split empty")
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 1000)
    assert_clean_failure(
        prepare_cli("text", big, "--out", out, "--valid-fraction", "0.6", "--test-fraction", "0.4"),
        out,
        "nothing for the train split",
    )
    assert_clean_failure(prepare_cli("text", big, "--out", out, "--test-fraction", "0"), out, "--test-fraction")
    assert_clean_failure(prepare_cli("text", big, "--out", out, "--valid-fraction", "1.5"), out, "--valid-fraction")
    assert not (tmp_path / "out").exists()  # not even the parent folder that would have been created


def test_existing_output_needs_force(tmp_path, prepare_cli):
    src = tmp_path / "a.txt"
    src.write_bytes(b"some text " * 100)
    out = tmp_path / "ds"
    assert prepare_cli("text", src, "--out", out).exit_code == 0
    before = (out / "meta.json").read_text()
    r = prepare_cli("text", src, "--out", out)
    assert r.exit_code != 0 and "--force" in r.stderr and len(r.error_lines()) == 1
    assert (out / "meta.json").read_text() == before  # untouched
    # a failing --force run keeps the old dataset
    r = prepare_cli("text", tmp_path / "missing", "--out", out, "--force")
    assert r.exit_code != 0 and (out / "meta.json").read_text() == before
    src.write_bytes(b"other text " * 100)
    assert prepare_cli("text", src, "--out", out, "--force").exit_code == 0
    assert (out / "meta.json").read_text() != before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    r = prepare_cli("text", src, "--out", mine, "--force")
    assert r.exit_code != 0 and "not a haed dataset" in r.stderr and (mine / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "ds", "mine"]


def test_audio_bad_inputs(tmp_path, wavs, prepare_cli, assert_clean_failure):
    out = tmp_path / "out"
    sr = ("--sample-rate", "8000")
    assert_clean_failure(prepare_cli("audio", tmp_path / "nope", "--out", out, *sr), out, "not found", "nope")
    (tmp_path / "empty").mkdir()
    assert_clean_failure(prepare_cli("audio", tmp_path / "empty", "--out", out, *sr), out, "is empty")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "readme.txt").write_text("hello")
    assert_clean_failure(prepare_cli("audio", tmp_path / "texts", "--out", out, *sr), out, "contains no audio files")
    assert_clean_failure(prepare_cli("audio", wavs / "0_spk_0.wav", "--out", out, *sr), out, "not a folder")
    assert_clean_failure(prepare_cli("audio", wavs, "--out", out, "--sample-rate", "12"), out, "--sample-rate")
    assert_clean_failure(prepare_cli("audio", wavs, "--out", out, *sr, "--split-rule", "random"), out, "--split-rule")
    assert_clean_failure(prepare_cli("audio", wavs, "--out", out, *sr, "--split-rule", "dataset"), out, "--hf")
    assert_clean_failure(
        prepare_cli("audio", wavs, "--out", out, *sr, "--split-rule", "fsdd", "--test-fraction", "0.2"),
        out,
        "only to --split-rule hash",
    )
    assert_clean_failure(prepare_cli("audio", "--out", out, *sr), out, "SOURCE")
    # fractions that leave a split empty (40 files, 1% each)
    assert_clean_failure(
        prepare_cli("audio", wavs, "--out", out, *sr, "--valid-fraction", "0.01", "--test-fraction", "0.01"),
        out,
        "puts none of the 40 files",
    )
    # the fsdd rule on names it cannot parse
    sf.write(str(wavs / "unlabelled.wav"), np.zeros(100), 8000)
    assert_clean_failure(
        prepare_cli("audio", wavs, "--out", out, *sr, "--split-rule", "fsdd"),
        out,
        "unlabelled.wav",
        "{digit}_{speaker}_{index}",
    )


def test_corrupt_audio_file_fails_or_is_skipped(tmp_path, wavs, prepare_cli, assert_clean_failure):
    out = tmp_path / "out"
    (wavs / "sub").mkdir()
    (wavs / "sub" / "9_spk_99.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage, not audio")
    (wavs / "3_spk_77.flac").write_bytes(b"plain text pretending to be FLAC")
    line = assert_clean_failure(
        prepare_cli("audio", wavs, "--out", out, "--sample-rate", "8000", "--split-rule", "fsdd"), out, "--skip-bad"
    )
    assert "3_spk_77.flac" in line  # the first bad file in sorted order is named
    r = prepare_cli("audio", wavs, "--out", out, "--sample-rate", "8000", "--split-rule", "fsdd", "--skip-bad")
    assert r.exit_code == 0, r.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped_count"] == 2
    assert sorted(s["name"] for s in meta["skipped"]) == ["3_spk_77.flac", "sub/9_spk_99.wav"]
    assert len(meta["files"]) == 40 and "skipped 2" in r.stdout


def test_hf_without_network_or_package_is_clear(tmp_path, prepare_cli, assert_clean_failure):
    out = tmp_path / "out"
    r = prepare_cli("audio", "--hf", "someone/some-speech-dataset", "--out", out, "--sample-rate", "16000")
    try:
        import datasets  # noqa: F401
    except ImportError:
        assert_clean_failure(r, out, "datasets", "pip install 'haed[hf]'")  # brackets survive rich markup
    else:
        assert_clean_failure(r, out, "someone/some-speech-dataset")


def test_help_lists_commands_with_examples(prepare_cli):
    r = prepare_cli("--help")
    assert r.exit_code == 0
    for cmd in ("stdlib", "text", "enwik8", "audio"):
        assert f"haed prepare {cmd}" in r.stdout
    for cmd in ("stdlib", "text", "enwik8", "audio"):
        r = prepare_cli(cmd, "--help")
        assert r.exit_code == 0 and "Example" in r.stdout and f"haed prepare {cmd}" in r.stdout
