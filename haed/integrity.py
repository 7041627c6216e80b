"""What makes a checkpoint verifiable on its own, and what may be read from one.

- The weights carry their own digest: `model.safetensors` holds, in its metadata, the sha256 of every
  tensor's name, dtype, shape and bytes (`weights_digest`), checked whenever they are read.
- `manifest.json` records the size and sha256 of every file of the checkpoint; its shape is checked
  before it is trusted (`read_manifest`).
- The optimizer and random-number states are read with `torch.load(weights_only=True)` only, and a
  file that holds anything but tensors is refused in one line, nothing executed (`load_tensors`).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import torch

from haed.errors import HaedError

DIGEST_KEY = "haed.weights_sha256"
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_digest(tensors: dict) -> str:
    """sha256 over the tensors in name order: each one's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_weights(tensors: dict, path: str | Path) -> None:
    """Write `tensors` as safetensors with their digest in the metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={DIGEST_KEY: weights_digest(tensors)})


def read_weights(path: Path) -> tuple[dict, bool]:
    """(the tensors of a safetensors file, whether they carried a digest). A file that cannot be read,
    or whose tensors differ from their digest, is a HaedError."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            recorded = (f.metadata() or {}).get(DIGEST_KEY)
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise HaedError(f"cannot read the weights {path}: {_first_line(e)}") from None
    if recorded is not None and weights_digest(state) != recorded:
        raise HaedError(f"the weights {path} do not match the digest recorded when they were written")
    return state, recorded is not None


def weights_problem(path: Path) -> str | None:
    """Why the weights in `path` cannot be trusted, "no digest" when they carry none, or None."""
    try:
        _, has_digest = read_weights(path)
    except HaedError as e:
        return str(e)
    return None if has_digest else "no digest"


def read_manifest(checkpoint_dir: Path) -> dict:
    """The manifest's files, {name: {"size": int, "sha256": str}}, after checking its shape: a manifest
    that is not valid JSON, or JSON of another shape, is a HaedError."""
    path = Path(checkpoint_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        raise HaedError(f"{MANIFEST} is unreadable") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    # A step checkpoint of a multi-process run lists its shards, and whole weights only if it is the last.
    if not isinstance(files, dict) or not ({"model.safetensors", "dcp/.metadata"} & set(files)):
        raise HaedError(
            f"{MANIFEST} is not a haed manifest (no files entry listing model.safetensors or dcp/.metadata)"
        )
    for name, entry in files.items():
        size = entry.get("size") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        bad_name = not isinstance(name, str) or name.startswith("/") or ".." in Path(name).parts
        if bad_name or isinstance(size, bool) or not isinstance(size, int) or not isinstance(digest, str):
            raise HaedError(f"{MANIFEST} is not a haed manifest (its entry {name!r} is malformed)")
    return files


def manifest_problem(checkpoint_dir: Path) -> str | None:
    """Why the files of a checkpoint do not match its manifest (or the manifest is malformed), or None."""
    checkpoint_dir = Path(checkpoint_dir)
    try:
        files = read_manifest(checkpoint_dir)
    except HaedError as e:
        return str(e)
    for name, expected in files.items():
        path = checkpoint_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['size']} were written"
        if sha256_file(path) != expected["sha256"]:
            return f"{name} does not match the sha256 recorded when it was written"
    return None


def load_tensors(path: Path, map_location="cpu", mmap: bool = False):
    """`torch.load(weights_only=True)` of a checkpoint's state file, with one line for a file that holds
    anything but tensors (refused: nothing was executed) or cannot be read."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise HaedError(f"{path} holds objects that are not tensors; refused, nothing was executed") from None
    except Exception as e:  # a truncated or foreign file: the zip reader's or unpickler's own errors
        reason = _first_line(e)
        if "weights_only" in reason:  # never pass on advice to turn the check off
            reason = "not a checkpoint state file"
        raise HaedError(f"{path} cannot be read ({reason}): the checkpoint is damaged") from None


def state_files_problem(checkpoint_dir: Path) -> str | None:
    """Why a state file of a checkpoint (optimizer.pt, rng.pt, rng/*.pt) cannot be loaded, or None.
    Loads memory-mapped: the tensors' bytes are not read."""
    checkpoint_dir = Path(checkpoint_dir)
    for path in (checkpoint_dir / "optimizer.pt", checkpoint_dir / "rng.pt", *sorted(checkpoint_dir.glob("rng/*.pt"))):
        if path.is_file():
            try:
                load_tensors(path, mmap=True)
            except HaedError as e:
                return str(e)
    return None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]
