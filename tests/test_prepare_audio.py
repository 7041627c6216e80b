"""`haed prepare audio` on ../shared/data/fsdd and on small synthetic folders."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from haed.audio import mu_law_encode
from haed.data import SPLITS, open_dataset

sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")


@pytest.fixture(scope="module")
def fsdd_8k(fsdd_dir, tmp_path_factory):
    from typer.testing import CliRunner

    from haed_cli.main import app

    out = tmp_path_factory.mktemp("fsdd") / "fsdd-8k"
    r = CliRunner().invoke(
        app, ["prepare", "audio", str(fsdd_dir), "--out", str(out), "--sample-rate", "8000", "--split-rule", "fsdd"]
    )
    assert r.exit_code == 0, r.output
    return out, r.stdout


def check_layout(ds):
    """Every file in exactly one split; per split the files tile the split's bytes exactly."""
    files = ds.meta["files"]
    names = [f["name"] for f in files]
    assert len(names) == len(set(names))
    for s in SPLITS:
        in_split = sorted((f for f in files if f["split"] == s), key=lambda f: f["offset"])
        assert in_split, s
        pos = 0
        for f in in_split:
            assert f["offset"] == pos and f["length"] > 0
            pos += f["length"]
        assert pos == ds.meta["splits"][s]["bytes"] == ds.split(s).shape[0]
        assert ds.meta["file_counts"][s] == len(in_split)
        assert ds.meta["seconds"][s] == pytest.approx(pos / ds.sample_rate)
    return {f["name"]: f for f in files}


def test_fsdd_rule_offsets_and_content(fsdd_8k, fsdd_dir):
    out, stdout = fsdd_8k
    ds = open_dataset(out)
    assert ds.kind == "audio" and ds.sample_rate == 8000 and ds.meta["encoding"] == "mu-law-8"
    by_name = check_layout(ds)
    wavs = sorted(p.name for p in fsdd_dir.glob("*.wav"))
    assert sorted(by_name) == wavs and len(wavs) == 2500
    for name, f in by_name.items():
        index = int(re.match(r"^\d+_[^_]+_(\d+)\.wav$", name).group(1))
        assert f["split"] == ("test" if index <= 4 else "valid" if index <= 9 else "train"), name
    assert ds.meta["file_counts"] == {"train": 2000, "valid": 250, "test": 250}
    # no resampling at the native rate: one byte per sample, and the bytes are the file's mu-law codes
    for name in wavs[::97]:
        f = by_name[name]
        pcm, rate = sf.read(str(fsdd_dir / name), dtype="float32")
        assert rate == 8000 and f["length"] == len(pcm) and f["source_sample_rate"] == 8000
        stored = ds.split(f["split"])[f["offset"] : f["offset"] + f["length"]]
        assert np.array_equal(stored, mu_law_encode(torch.from_numpy(pcm)).numpy().astype(np.uint8))
    # summary: seconds of audio per split
    total_s = sum(ds.meta["seconds"].values())
    assert 15 * 60 < total_s < 25 * 60
    assert "seconds" in stdout and f"{ds.meta['seconds']['test']:,.1f}" in stdout


def test_fsdd_resampled_to_16k_by_hash(fsdd_8k, fsdd_dir, tmp_path, prepare_cli):
    out = tmp_path / "fsdd-16k"
    r = prepare_cli("audio", fsdd_dir, "--out", out, "--sample-rate", "16000")
    assert r.exit_code == 0, r.stderr
    ds16 = open_dataset(out)
    assert ds16.sample_rate == 16000 and ds16.meta["split_rule"]["name"] == "hash"
    by16 = check_layout(ds16)
    by8 = {f["name"]: f for f in open_dataset(fsdd_8k[0]).meta["files"]}
    assert by16.keys() == by8.keys()
    for name, f in by16.items():
        assert abs(f["length"] - 2 * by8[name]["length"]) <= 1, name  # twice the samples, within one
        # the documented hash rule, computed independently
        u = int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) / 2**64
        assert f["split"] == ("test" if u < 0.05 else "valid" if u < 0.10 else "train")
    counts = ds16.meta["file_counts"]
    assert 50 < counts["valid"] < 250 and 50 < counts["test"] < 250


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t)
    return np.stack([x] * channels, 1) if channels > 1 else x


@pytest.fixture
def small_audio_folder(tmp_path) -> Path:
    root = tmp_path / "audio"
    (root / "deep" / "er").mkdir(parents=True)
    for i in range(12):
        rate = [8000, 16000, 44100][i % 3]
        ext = ["wav", "flac"][i % 2]
        sub = ["", "deep/", "deep/er/"][i % 3]
        sf.write(
            str(root / f"{sub}clip{i:02d}.{ext.upper() if i == 5 else ext}"),
            tone(0.25 + 0.01 * i, rate, channels=1 + i % 2),
            rate,
            subtype="PCM_16",
        )
    (root / "notes.txt").write_text("not audio, ignored")
    return root


def test_small_folder_mixed_rates_and_formats(small_audio_folder, tmp_path, prepare_cli):
    out = tmp_path / "ds"
    r = prepare_cli(
        "audio",
        small_audio_folder,
        "--out",
        out,
        "--sample-rate",
        "16000",
        "--valid-fraction",
        "0.3",
        "--test-fraction",
        "0.3",
    )
    assert r.exit_code == 0, r.stderr
    ds = open_dataset(out)
    by_name = check_layout(ds)
    assert len(by_name) == 12 and "deep/er/clip02.wav" in by_name and "deep/er/clip05.FLAC" in by_name
    for name, f in by_name.items():
        i = int(re.search(r"clip(\d+)", name).group(1))
        assert f["source_channels"] == 1 + i % 2
        assert abs(f["length"] - int((0.25 + 0.01 * i) * 16000)) <= 1
    meta = json.loads((out / "meta.json").read_text())
    assert meta["split_rule"]["valid_fraction"] == 0.3 and meta["skipped_count"] == 0


def test_hf_dataset_decoded_with_soundfile(small_audio_folder, tmp_path, prepare_cli):
    """--hf through the real `datasets` loader on a local parquet dataset with an Audio column (the
    layout of hub datasets), decoded with soundfile; its own train/validation/test splits are kept."""
    datasets = pytest.importorskip("datasets")
    files = sorted(p for p in small_audio_folder.rglob("*") if p.suffix.lower() in (".wav", ".flac"))
    hf_dir = tmp_path / "hf_dataset"
    (hf_dir / "data").mkdir(parents=True)
    parts = {"train": files[:8], "validation": files[8:10], "test": files[10:]}
    for split, chunk in parts.items():
        rows = [{"bytes": p.read_bytes(), "path": p.name} for p in chunk]
        ds = datasets.Dataset.from_dict({"audio": rows, "label": list(range(len(rows)))})
        ds.cast_column("audio", datasets.Audio(decode=False)).to_parquet(
            str(hf_dir / "data" / f"{split}-00000-of-00001.parquet")
        )
    out = tmp_path / "hf"
    r = prepare_cli("audio", "--hf", hf_dir, "--out", out, "--sample-rate", "8000")
    assert r.exit_code == 0, r.stderr
    ds = open_dataset(out)
    by_name = check_layout(ds)
    assert ds.meta["source"]["type"] == "huggingface" and ds.meta["split_rule"]["name"] == "dataset"
    assert ds.meta["file_counts"] == {"train": 8, "valid": 2, "test": 2}
    # the same bytes as preparing the files from the folder
    ref = tmp_path / "ref"
    assert (
        prepare_cli(
            "audio",
            small_audio_folder,
            "--out",
            ref,
            "--sample-rate",
            "8000",
            "--valid-fraction",
            "0.3",
            "--test-fraction",
            "0.3",
        ).exit_code
        == 0
    )
    ref_ds = open_dataset(ref)
    ref_by_base = {Path(f["name"]).name: f for f in ref_ds.meta["files"]}
    for name, f in by_name.items():
        g = ref_by_base[name.split(":", 1)[1]]
        a = ds.split(f["split"])[f["offset"] : f["offset"] + f["length"]]
        b = ref_ds.split(g["split"])[g["offset"] : g["offset"] + g["length"]]
        assert np.array_equal(a, b), name
