"""Mu-law against the reference formula (and torchaudio when it imports), audio reading and WAV writing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from haed.audio import mu_law_decode, mu_law_encode, read_audio, read_audio_info, to_pcm16, write_wav
from haed.errors import HaedError

sf = pytest.importorskip("soundfile")


def ref_encode(x: float, mu: int = 255) -> float:
    """The formula in float64, before the final floor: code = floor(ref_encode(x))."""
    y = math.copysign(math.log1p(mu * abs(x)) / math.log1p(mu), x) if x != 0 else 0.0
    return (y + 1) / 2 * mu + 0.5


def ref_decode(c: int, mu: int = 255) -> float:
    y = c / mu * 2 - 1
    return math.copysign((math.exp(abs(y) * math.log1p(mu)) - 1) / mu, y) if y != 0 else 0.0


def test_mu_law_encode_matches_reference_formula():
    xs = np.linspace(-1.0, 1.0, 20001, dtype=np.float32)
    codes = mu_law_encode(torch.from_numpy(xs))
    assert codes.dtype == torch.int64
    checked = 0
    for x, c in zip(xs.tolist(), codes.tolist()):
        r = ref_encode(x)
        if abs(r - round(r)) < 1e-4:  # float32 vs float64 may round either way exactly at a boundary
            continue
        assert c == math.floor(r), (x, c, r)
        checked += 1
    assert checked > 19000
    assert mu_law_encode(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
    # monotone, all 256 codes used
    assert torch.all(codes[1:] >= codes[:-1]) and set(codes.tolist()) == set(range(256))


def test_mu_law_decode_matches_reference_formula():
    codes = torch.arange(256)
    x = mu_law_decode(codes)
    assert x.dtype == torch.float32
    ref = torch.tensor([ref_decode(c) for c in range(256)], dtype=torch.float64)
    assert torch.allclose(x.double(), ref, atol=1e-6, rtol=1e-5)
    assert x[0] == -1.0 and abs(float(x[255]) - 1.0) < 1e-6
    # decode then encode is the identity on codes; encode then decode is within half a step
    assert torch.equal(mu_law_encode(x), codes)
    wave = torch.linspace(-1, 1, 5001)
    err = (mu_law_decode(mu_law_encode(wave)) - wave).abs()
    assert float(err.max()) < 0.022  # half a step at |x| = 1: (1/255) * log1p(255) * 256 / 255
    assert float(err[2490:2511].max()) < 2e-4  # fine steps near zero


def test_mu_law_clips_and_accepts_numpy():
    assert mu_law_encode(np.array([-3.0, 2.0], dtype=np.float32)).tolist() == [0, 255]
    assert mu_law_decode(np.array([0, 255], dtype=np.uint8)).shape == (2,)


def test_mu_law_matches_torchaudio():
    try:
        import torchaudio.functional as F
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        pytest.skip(f"torchaudio does not import here: {type(e).__name__}")
    x = torch.linspace(-1, 1, 100001)
    assert torch.equal(mu_law_encode(x), F.mu_law_encoding(x, 256))
    codes = torch.arange(256)
    assert torch.allclose(mu_law_decode(codes), F.mu_law_decoding(codes, 256))


def test_write_wav_codes_round_trip(tmp_path):
    codes = torch.randint(0, 256, (4000,))
    path = write_wav(tmp_path / "out" / "x.wav", codes, 8000)
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.wav"]  # no temporary file left
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (8000, 1, "PCM_16", 4000)
    back = read_audio(path, 8000)
    assert back.dtype == np.float32 and back.shape == (4000,)
    assert torch.equal(mu_law_encode(torch.from_numpy(back)), codes)
    # uint8 numpy codes and float waveforms work too
    write_wav(tmp_path / "y.wav", codes.numpy().astype(np.uint8), 8000)
    assert np.array_equal(sf.read(str(tmp_path / "y.wav"), dtype="int16")[0], sf.read(str(path), dtype="int16")[0])
    write_wav(tmp_path / "z.wav", np.array([0.0, 0.5, -1.0, 2.0]), 16000)
    assert sf.read(str(tmp_path / "z.wav"), dtype="int16")[0].tolist() == [0, 16384, -32767, 32767]
    with pytest.raises(HaedError, match="0..255"):
        to_pcm16(np.array([0, 256]))


def test_read_audio_mixdown_resample_and_errors(tmp_path):
    t = np.arange(8000) / 8000
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), np.zeros_like(t)
    sf.write(str(tmp_path / "stereo.flac"), np.stack([left, right], 1), 8000, subtype="PCM_16")
    mono, rate, channels = read_audio_info(tmp_path / "stereo.flac", None)
    assert (rate, channels, mono.shape) == (8000, 2, (8000,))
    assert np.allclose(mono, left / 2, atol=1e-4)
    up = read_audio(tmp_path / "stereo.flac", 16000)
    assert up.dtype == np.float32 and abs(len(up) - 16000) <= 1
    with pytest.raises(HaedError, match="not found"):
        read_audio(tmp_path / "nope.wav", 8000)
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEthis is not audio")
    with pytest.raises(HaedError, match="cannot read audio file .*bad.wav"):
        read_audio(tmp_path / "bad.wav", 8000)
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0), 8000)
    with pytest.raises(HaedError, match="no samples"):
        read_audio(tmp_path / "empty.wav", 8000)
