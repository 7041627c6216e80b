"""Audio <-> bytes: 8-bit mu-law (torchaudio's formula), reading audio files and writing WAV.

Mu-law with ``mu = 255`` (256 levels), exactly as ``torchaudio.functional.mu_law_encoding`` /
``mu_law_decoding`` compute it::

    encode:  y = sign(x) * log1p(mu * |x|) / log1p(mu);   code = floor((y + 1) / 2 * mu + 0.5)
    decode:  y = code / mu * 2 - 1;                        x = sign(y) * (exp(|y| * log1p(mu)) - 1) / mu

Inputs outside [-1, 1] are clipped first (torchaudio does not clip; inside the range the codes
are identical). Silence (0.0) is code 128.

``soundfile`` and ``soxr`` (the ``audio`` extra) are imported only inside the functions that need
them, so the rest of haed works where they are absent; ``torch`` is imported only by the
tensor functions.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np

from haed.atomic import atomic_path, remove_quietly
from haed.errors import HaedError, write_error

MU = 255  # quantization_channels - 1
QUANTIZATION_CHANNELS = 256
ENCODING = "mu-law-8"


def mu_law_encode(x):
    """Float waveform in [-1, 1] (torch tensor or array) -> ``torch.long`` codes 0..255."""
    import torch

    x = torch.as_tensor(x)
    if not torch.is_floating_point(x):
        x = x.to(torch.float32)
    x = x.clamp(-1.0, 1.0)
    mu = torch.tensor(float(MU), dtype=x.dtype)
    x_mu = torch.sign(x) * torch.log1p(mu * torch.abs(x)) / torch.log1p(mu)
    return ((x_mu + 1) / 2 * mu + 0.5).to(torch.int64)


def mu_law_decode(codes):
    """Codes 0..255 (torch tensor or array, any integer dtype) -> ``torch.float32`` waveform in [-1, 1]."""
    import torch

    codes = torch.as_tensor(codes)
    x = codes.to(torch.float32)
    mu = torch.tensor(float(MU), dtype=torch.float32)
    x = (x / mu) * 2 - 1.0
    return torch.sign(x) * (torch.exp(torch.abs(x) * torch.log1p(mu)) - 1.0) / mu


def encode_to_bytes(x: np.ndarray) -> np.ndarray:
    """Float waveform (numpy) -> mu-law codes as a numpy ``uint8`` array (via :func:`mu_law_encode`)."""
    import torch

    return mu_law_encode(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).to(torch.uint8).numpy()


def _to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def to_pcm16(codes_or_float) -> np.ndarray:
    """Mu-law codes (any integer dtype) or a float waveform in [-1, 1] -> int16 PCM samples."""
    a = _to_numpy(codes_or_float)
    if np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > MU):
            raise HaedError(f"mu-law codes must lie in 0..{MU} (got {a.min()}..{a.max()})")
        a = _to_numpy(mu_law_decode(a.astype(np.int64)))
    a = np.clip(np.asarray(a, dtype=np.float64), -1.0, 1.0)
    return np.round(a * 32767.0).astype(np.int16)


def audio_library(name: str, purpose: str):
    """The optional audio package `name` (soundfile or soxr, the `audio` extra), imported on first
    use; without it, one clear error that says what needed it and how to install it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise HaedError(f"{purpose} needs the `{name}` package: pip install 'haed[audio]'") from None


def _decode(src, sample_rate: int | None, name: str) -> np.ndarray:
    sf = audio_library("soundfile", f"reading audio file {name}")
    try:
        data, sr = sf.read(src, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile's errors: corrupt, truncated, not audio, unknown format
        raise HaedError(f"cannot read audio file {name}: {_short(e)}") from None
    if data.shape[0] == 0:
        raise HaedError(f"audio file {name} contains no samples")
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(mono)):
        raise HaedError(f"audio file {name} contains non-finite samples")
    if sample_rate is not None and sr != sample_rate:
        soxr = audio_library("soxr", f"resampling {name} from {sr} Hz")
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32), int(sr), int(data.shape[1])


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    # libsndfile repeats the path in its message; keep it short
    return text[:200]


def read_audio_info(src, sample_rate: int | None, name: str | None = None):
    """Like :func:`read_audio`, also returning ``(samples, source_rate, source_channels)``."""
    if name is None:
        name = str(src)
    if isinstance(src, (str, os.PathLike)) and Path(src).is_dir():
        raise HaedError(f"{src} is a folder, not an audio file")
    if isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        raise HaedError(f"audio file not found: {src}")
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(src))
    if isinstance(src, (str, os.PathLike)):
        with open(src, "rb") as f:
            _check_wav_length(f, name)
    elif hasattr(src, "seek") and hasattr(src, "read"):
        _check_wav_length(src, name)
    return _decode(src, sample_rate, name)


def _check_wav_length(f, name: str) -> None:
    """Refuse a RIFF WAV whose data chunk holds fewer bytes than its header promises (a file cut short
    after an intact header, which decoders read silently as a shorter recording)."""
    import struct

    start = f.tell()
    try:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return  # not a RIFF WAV (FLAC, Ogg, RF64 ...): its decoder checks it
        size = f.seek(0, os.SEEK_END)
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk, length = struct.unpack("<4sI", f.read(8))
            if chunk == b"data":
                if length not in (0, 0xFFFFFFFF) and offset + 8 + length > size:  # 0 / -1: length left open
                    raise HaedError(
                        f"audio file {name} is truncated: its header promises {length:,} bytes of samples, "
                        f"the file holds {size - offset - 8:,}"
                    )
                return
            offset += 8 + length + (length & 1)
    finally:
        f.seek(start)


def read_audio(path, sample_rate: int | None) -> np.ndarray:
    """Read a WAV/FLAC/... file (or file-like object) as float32 mono at ``sample_rate``.

    Channels are averaged; the signal is resampled with soxr (HQ) when its rate differs
    (``sample_rate=None`` keeps the file's rate). Raises HaedError for a missing, corrupt or
    empty file.
    """
    return read_audio_info(path, sample_rate)[0]


def write_wav(path, codes_or_float, sample_rate: int) -> Path:
    """Write 16-bit PCM mono WAV, atomically (temporary file in the same folder, then rename).

    ``codes_or_float``: mu-law codes (an integer array or tensor, decoded to PCM) or a float
    waveform in [-1, 1]. Uses the standard library's `wave`, so writing needs no audio package
    (GPU images often lack libsndfile).
    """
    import wave

    path = Path(path)
    pcm = to_pcm16(codes_or_float).reshape(-1)
    if sample_rate <= 0:
        raise HaedError(f"sample rate must be positive (got {sample_rate})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path.parent, e) from None
    with atomic_path(path) as tmp:
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(int(sample_rate))
            w.writeframes(pcm.astype("<i2").tobytes())
    return path


class WavWriter:
    """A 16-bit PCM mono WAV written as it grows, valid and playable at every moment.

    The 44-byte header is written first with no samples; each `write` appends samples, flushes
    them, and only then rewrites the header's two sizes (so the header never counts samples that
    are not in the file yet) and flushes again. A reader that opens the file mid-way sees a complete
    WAV of the samples so far; `close` leaves the final header. (The standard library's `wave`
    writer fixes its header only when closed.)
    """

    def __init__(self, path, sample_rate: int):
        if sample_rate <= 0:
            raise HaedError(f"sample rate must be positive (got {sample_rate})")
        self.path = Path(path)
        self.sample_rate = int(sample_rate)
        self.frames = 0
        self._file = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb")
            self._file.write(self._header(0))
            self._file.flush()
        except OSError as e:
            self.abort()
            raise write_error(self.path, e) from None

    def _header(self, frames: int) -> bytes:
        import struct

        data = 2 * frames
        return struct.pack(
            "<4sI4s4sIHHIIHH4sI",
            b"RIFF",
            36 + data,
            b"WAVE",
            b"fmt ",
            16,
            1,
            1,
            self.sample_rate,
            2 * self.sample_rate,
            2,
            16,
            b"data",
            data,
        )

    def write(self, codes_or_float) -> None:
        """Append mu-law codes or a float waveform in [-1, 1] (see `to_pcm16`)."""
        pcm = to_pcm16(codes_or_float).reshape(-1)
        if not pcm.size:
            return
        try:
            self._file.seek(0, os.SEEK_END)
            self._file.write(pcm.astype("<i2").tobytes())
            self._file.flush()
            self.frames += int(pcm.size)
            self._file.seek(0)
            self._file.write(self._header(self.frames))
            self._file.flush()
        except OSError as e:
            raise write_error(self.path, e) from None

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            try:
                self._file.close()
            except OSError as e:
                raise write_error(self.path, e) from None

    def abort(self) -> None:
        """Close and remove the file: a WAV whose writing failed is not left behind, not even its header."""
        if self._file is not None:  # opened (and so truncated) by this writer
            with contextlib.suppress(OSError):
                self._file.close()
            remove_quietly(self.path)

    def __enter__(self) -> "WavWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
