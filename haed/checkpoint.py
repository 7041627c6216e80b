"""The files of a run directory: its checkpoints (written, verified, chosen, loaded) and its lock.

    run_dir/
      config.json        the resolved recipe, the objective, the dataset and the parent run
      metrics.jsonl      one JSON object per logged or evaluated step
      metrics.png        the loss curves
      step-000500/       model.safetensors, optimizer.pt, rng.pt, state.json, config.json, manifest.json
      best/              the checkpoint with the best validation metric so far (same files)
      .lock              held by the one process that writes the run (its pid and host inside)

Every checkpoint is written to a uniquely named temporary sibling and renamed into place, so a crash
never leaves a half-written `step-N`. `manifest.json` records each file's size and sha256 at write
time; loading verifies them, and a damaged latest checkpoint gives way to the newest intact one.
Weights load through safetensors and the optimizer through `torch.load(weights_only=True)`: loading
a run never executes code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from haed.atomic import temporary_sibling
from haed.config import Recipe, recipe_from_dict
from haed.errors import HaedError, warn
from haed.model import build_model
from haed.objectives import get_objective

STEP_PREFIX = "step-"
BEST = "best"
MANIFEST = "manifest.json"


def step_dirs(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    dirs = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = step_dirs(run_dir)
    return dirs[-1] if dirs else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_problem(checkpoint_dir: Path) -> str | None:
    """Why a checkpoint cannot be trusted (a missing, truncated or altered file), or None if intact.

    Checkpoints written before manifests existed are taken as they are when their weights exist.
    """
    checkpoint_dir = Path(checkpoint_dir)
    manifest_path = checkpoint_dir / MANIFEST
    if not manifest_path.is_file():
        return None if (checkpoint_dir / "model.safetensors").is_file() else "model.safetensors is missing"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return f"{MANIFEST} is unreadable"
    for name, expected in manifest["files"].items():
        path = checkpoint_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['size']} were written"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match the sha256 recorded when it was written"
    return None


def latest_intact_checkpoint(run_dir: Path) -> Path | None:
    """The newest step checkpoint that passes verification; damaged newer ones are skipped with a warning."""
    for checkpoint in reversed(step_dirs(run_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        warn(f"checkpoint {checkpoint} is damaged ({problem}); falling back to an earlier one")
    return None


def checkpoint_step(checkpoint_dir: Path) -> int:
    return int(json.loads((Path(checkpoint_dir) / "state.json").read_text())["step"])


def save_checkpoint(
    run_dir: Path, step: int, model, optimizer, state: dict, config: dict, keep_last: int = 2, name: str | None = None
) -> Path:
    """Write `run_dir/step-NNNNNN` (or `run_dir/<name>`) atomically, with its manifest; keep the last step dirs."""
    run_dir = Path(run_dir)
    final = run_dir / (name or f"{STEP_PREFIX}{step:06d}")
    tmp = temporary_sibling(final)
    tmp.mkdir(parents=True)
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            # Dropout draws from torch's global generators: save them so that resume is exact.
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                rng["cuda"] = torch.cuda.get_rng_state()
            torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_manifest(tmp)
        install_directory(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if name is None:
        keep_newest(run_dir, keep_last)
    return final


def write_manifest(checkpoint_dir: Path) -> None:
    """Record the size and sha256 of every file below `checkpoint_dir` in its manifest.json."""
    files = {
        p.relative_to(checkpoint_dir).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(checkpoint_dir.rglob("*"))
        if p.is_file()
    }
    (checkpoint_dir / MANIFEST).write_text(json.dumps({"files": files}, indent=2))


def install_directory(tmp: Path, final: Path) -> None:
    """Rename a finished temporary directory into place, replacing an older one of the same name.

    Replacing a directory is two renames: the old one moves aside first, so that a crash between
    them leaves either the old or the new checkpoint under a findable name.
    """
    if final.exists():
        old = temporary_sibling(final)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def keep_newest(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints (0: keep every one)."""
    if keep_last > 0:
        for old in step_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def read_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise HaedError(f"{run_dir} is not a haed run directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise HaedError(f"{path} is not valid JSON: the run directory is damaged") from None


def load_weights(model, checkpoint_dir: Path, strict: bool = True) -> None:
    try:
        state = load_file(str(Path(checkpoint_dir) / "model.safetensors"))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise HaedError(f"cannot read the weights in {checkpoint_dir}: {e}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise HaedError(f"checkpoint {checkpoint_dir} does not match the model: {str(e).splitlines()[0]}") from None
    if strict and (missing or unexpected):
        raise HaedError(
            f"checkpoint {checkpoint_dir} does not match the model (missing {missing}, unexpected {unexpected})"
        )


def load_optimizer_state(checkpoint_dir: Path, device) -> dict:
    path = Path(checkpoint_dir) / "optimizer.pt"
    if not path.is_file():
        raise HaedError(f"{checkpoint_dir} has no optimizer.pt: it cannot be resumed exactly")
    return torch.load(path, map_location=device, weights_only=True)


def restore_rng_state(checkpoint_dir: Path) -> None:
    path = Path(checkpoint_dir) / "rng.pt"
    if not path.is_file():
        raise HaedError(f"{checkpoint_dir} has no rng.pt: it cannot be resumed exactly")
    rng = torch.load(path, weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def resolve_sampling_run(run_dir: Path) -> Path:
    """The run to evaluate or sample from: an IEM run hands over to its decoder phase (`run/decoder`)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    if not get_objective(config.get("objective", "?")).trains_decoder:
        sub = run_dir / "decoder"
        if latest_checkpoint(sub) is not None:
            return sub
        raise HaedError(
            f"{run_dir} was trained with IEM only and its byte decoder is untrained: "
            f"run `haed train-decoder --run {run_dir}` first"
        )
    return run_dir


def select_checkpoint(run_dir: Path, which: str = "best") -> Path:
    """The checkpoint directory `which` names: "best" (the best validation point, else the last),
    "last" (the newest intact step), or "step-N"."""
    run_dir = Path(run_dir)
    if which == BEST:
        best = run_dir / BEST
        if best.is_dir():
            problem = checkpoint_problem(best)
            if problem is None:
                return best
            warn(f"the best checkpoint {best} is damaged ({problem}); using the last one")
        which = "last"
    if which == "last":
        checkpoint = latest_intact_checkpoint(run_dir)
        if checkpoint is None:
            if step_dirs(run_dir):
                raise HaedError(f"{run_dir} has no intact checkpoint (every step-N directory is damaged)")
            raise HaedError(f"{run_dir} has no checkpoint yet (no step-N directory)")
        return checkpoint
    name = which if which.startswith(STEP_PREFIX) else None
    if name is None or not name[len(STEP_PREFIX) :].isdigit():
        raise HaedError(f"--checkpoint must be best, last or step-N, not {which!r}")
    wanted = int(name[len(STEP_PREFIX) :])
    for checkpoint in step_dirs(run_dir):
        if int(checkpoint.name[len(STEP_PREFIX) :]) == wanted:
            problem = checkpoint_problem(checkpoint)
            if problem is not None:
                raise HaedError(f"checkpoint {checkpoint} is damaged ({problem})")
            return checkpoint
    kept = ", ".join(p.name for p in step_dirs(run_dir)) or "none"
    raise HaedError(f"{run_dir} has no checkpoint {which} (kept: {kept})")


def load_run(run_dir: Path, device="cpu", checkpoint: str = "best") -> tuple[torch.nn.Module, Recipe, dict]:
    """Build the model of a run and load a checkpoint's weights (the best validation point by default):
    (model in eval mode, recipe, run config with "checkpoint" set to the directory loaded)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    chosen = select_checkpoint(run_dir, checkpoint)
    recipe = recipe_from_dict(config["recipe"])
    model = build_model(recipe.model)
    load_weights(model, chosen)
    model.to(device).eval()
    config["checkpoint"] = str(chosen)
    return model, recipe, config


class RunLock:
    """The one writer of a run directory: an exclusive lock on `run_dir/.lock`, which names its holder.

    The operating system drops the lock when the process ends, however it ends, so a crashed run
    never leaves a stale lock behind.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.file = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX: no lock
            pass
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise HaedError(
                f"{self.path.parent} is being written by {holder}: wait for it or choose another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}")
        f.flush()
        self.file = f
        # Temporaries of a writer that was killed mid-write: nobody else can be writing them now.
        for leftover in self.path.parent.glob(".*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()  # closing releases the lock
            self.file = None
