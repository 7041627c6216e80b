"""Exact bits per byte of a split: every byte's cross-entropy through the byte decoder, no sampling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from haed.atomic import check_writable, write_text_atomic
from haed.data import open_dataset
from haed.device import autocast, resolve_device
from haed.errors import HaedError
from haed.runs import load_run, resolve_sampling_run


def _window_nll(model, x: torch.Tensor, counted: int) -> torch.Tensor:
    """Summed cross-entropy (nats, float64) of the first `counted` bytes of every window in x (B, N)."""
    logits = model(x)
    nll = F.cross_entropy(
        logits[:, :counted].reshape(-1, 256).float(), x[:, :counted].reshape(-1).long(), reduction="sum"
    )
    return nll.double()


@torch.no_grad()
def bits_per_byte(
    model, data: np.ndarray, seq_len: int, batch_size: int = 8, device=None, max_bytes: int | None = None, progress=None
) -> dict:
    """Exact bits per byte of `data` (a uint8 array) under `model`.

    The data is cut into consecutive windows of `seq_len` bytes without overlap; the last, shorter
    window is zero-padded to whole patches and only its real bytes are counted (padding sits after
    them, and the model is causal, so it changes nothing they see). Every byte is counted once.
    """
    device = device or next(model.parameters()).device
    n = len(data) if max_bytes is None else min(len(data), max_bytes)
    if n == 0:
        raise HaedError("nothing to evaluate: the split is empty")
    patch = getattr(model, "patch_size", 1)  # windows of whole patches (HAED, the MEGABYTE peer)
    full_windows, remainder = divmod(n, seq_len)
    total = torch.zeros((), dtype=torch.float64, device=device)
    task = progress.add_task("evaluate", total=n) if progress is not None else None
    for start in range(0, full_windows, batch_size):
        count = min(batch_size, full_windows - start)
        chunk = np.asarray(data[start * seq_len : (start + count) * seq_len]).reshape(count, seq_len)
        x = torch.from_numpy(chunk.copy()).to(device)
        with autocast(device):
            total += _window_nll(model, x, seq_len)
        if progress is not None:
            progress.update(task, advance=count * seq_len)
    if remainder:
        padded = -(-remainder // patch) * patch
        tail = np.zeros(padded, dtype=np.uint8)
        tail[:remainder] = data[full_windows * seq_len : n]
        x = torch.from_numpy(tail).view(1, padded).to(device)
        with autocast(device):
            total += _window_nll(model, x, remainder)
        if progress is not None:
            progress.update(task, advance=remainder)
    nll = float(total)
    return {
        "bits_per_byte": nll / n / math.log(2),
        "nll_nats": nll,
        "bytes": n,
        "windows": full_windows + (1 if remainder else 0),
        "windowing": f"non-overlapping windows of {seq_len} bytes"
        + (f", the last one of {remainder} bytes" if remainder else "")
        + "; each window starts without context",
    }


def read_eval_data(path: Path, split: str, kind: str, sample_rate: int | None) -> tuple[np.ndarray, str]:
    """Bytes to evaluate from `path`: a dataset directory's split, a WAV/FLAC file (audio runs: mono,
    resampled, mu-law encoded as in training), or any other file's raw bytes. Returns (bytes, description)."""
    path = Path(path)
    if path.is_dir():
        dataset = open_dataset(path)
        if dataset.kind != kind:
            raise HaedError(f"{path} is a {dataset.kind} dataset, but the run models {kind}")
        return dataset.split(split), f"{path} ({split} split)"
    if not path.is_file():
        raise HaedError(f"--data {path} does not exist")
    if kind == "audio" and path.suffix.lower() in (".wav", ".flac"):
        from haed.audio import encode_to_bytes, read_audio

        return encode_to_bytes(read_audio(path, sample_rate)), f"{path} (mu-law at {sample_rate} Hz)"
    return np.fromfile(path, dtype=np.uint8), f"{path} (raw bytes)"


def evaluate_run(
    run_dir: Path,
    split: str = "test",
    batch_size: int = 8,
    device: str = "auto",
    max_bytes: int | None = None,
    seq_len: int | None = None,
    progress=None,
    checkpoint: str = "best",
    data: Path | None = None,
    json_out: Path | None = None,
    allow_unverified: bool = False,
) -> dict:
    """Exact bits per byte of a run's dataset split, or of `data` (a file or a dataset directory).

    An IEM run is evaluated through its decoder phase. `checkpoint`: "best" (the best validation point,
    else the last), "last" or "step-N"; one that cannot be verified is refused unless `allow_unverified`.
    `json_out`: also write the result there (checked for writing before anything is evaluated).
    """
    for option, value in (("--batch-size", batch_size), ("--max-bytes", max_bytes), ("--seq-len", seq_len)):
        if value is not None and value < 1:
            raise HaedError(f"{option} must be >= 1, not {value}")
    if json_out is not None:
        check_writable(json_out, what="--json")
    run_dir = resolve_sampling_run(Path(run_dir))
    dev = resolve_device(device)
    model, recipe, config = load_run(run_dir, dev, checkpoint, allow_unverified)
    kind, sample_rate = config["dataset"]["kind"], config["dataset"].get("sample_rate")
    if data is None:
        values, source = open_dataset(config["dataset"]["path"]).split(split), f"{split} split"
    else:
        values, source = read_eval_data(data, split, kind, sample_rate)
    seq_len = recipe.data.seq_len if seq_len is None else seq_len
    if seq_len % getattr(model, "patch_size", 1):
        raise HaedError(f"--seq-len must be a multiple of the patch size {model.patch_size}")
    result = bits_per_byte(model, values, seq_len, batch_size, dev, max_bytes, progress)
    unit = "bits per 8-bit sample" if kind == "audio" else "bits per byte"
    result.update(
        {
            "run": str(run_dir),
            "checkpoint": config["checkpoint"],
            "split": split if data is None else None,
            "data": source,
            "kind": kind,
            "unit": unit,
            "device": str(dev),
        }
    )
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(result, indent=2))
    return result
