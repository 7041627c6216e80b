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
time, and the weights carry their own digest (`haed.integrity`), so that a checkpoint can be verified
even without its manifest. A damaged or unverifiable latest checkpoint gives way to the newest
verifiable one, with a warning; evaluation and sampling refuse an unverifiable one unless asked.
Weights load through safetensors and the optimizer through `torch.load(weights_only=True)`: loading
a run never executes code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from pathlib import Path

import torch

from haed.atomic import remove_quietly, temporary_sibling
from haed.errors import HaedError, WriteError, warn, write_error
from haed.integrity import (
    MANIFEST,
    load_tensors,
    manifest_problem,
    read_weights,
    sha256_file,
    state_files_problem,
    weights_problem,
)
from haed.integrity import save_weights as save_file  # one name for tests to intercept the weights write
from haed.shard_reader import is_sharded, load_model_from_shards

STEP_PREFIX = "step-"
BEST = "best"
UNVERIFIABLE = "it cannot be verified: it has no manifest.json and its weights carry no digest"


def step_dirs(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    dirs = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = step_dirs(run_dir)
    return dirs[-1] if dirs else None


def checkpoint_problem(checkpoint_dir: Path) -> str | None:
    """Why a checkpoint cannot be trusted (a missing, truncated or altered file, a malformed manifest,
    weights that differ from their digest), `UNVERIFIABLE`, or None if it is intact.

    With a manifest every file is checked against it; without one, the weights against their digest.
    """
    checkpoint_dir = Path(checkpoint_dir)
    weights = checkpoint_dir / "model.safetensors"
    if not (checkpoint_dir / MANIFEST).is_file():
        if not weights.is_file():
            return "model.safetensors is missing"
        problem = weights_problem(weights)
        return UNVERIFIABLE if problem == "no digest" else problem
    problem = manifest_problem(checkpoint_dir)
    if problem is None and weights.is_file():  # (the manifest of a sharded step may list no weights)
        problem = weights_problem(weights)
    return None if problem == "no digest" else problem


def _unusable(checkpoint: Path, problem: str) -> str:
    if problem == UNVERIFIABLE:
        return f"checkpoint {checkpoint} cannot be verified (no manifest.json, and its weights carry no digest)"
    return f"checkpoint {checkpoint} is damaged ({problem})"


def latest_intact_checkpoint(run_dir: Path) -> Path | None:
    """The newest step checkpoint that passes verification and whose optimizer and random-number states
    load; damaged or unverifiable newer ones are skipped with a warning."""
    for checkpoint in reversed(step_dirs(run_dir)):
        problem = checkpoint_problem(checkpoint) or state_files_problem(checkpoint)
        if problem is None:
            return checkpoint
        warn(f"{_unusable(checkpoint, problem)}; falling back to an earlier one")
    return None


def read_state(checkpoint_dir: Path) -> dict:
    """A checkpoint's state.json, its shape checked ("step" a non-negative integer)."""
    path = Path(checkpoint_dir) / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        raise HaedError(f"{path} is missing or not valid JSON: the checkpoint is damaged") from None
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise HaedError(f"{path} does not record a step: the checkpoint is damaged")
    return state


def checkpoint_step(checkpoint_dir: Path) -> int:
    return read_state(checkpoint_dir)["step"]


def save_checkpoint(
    run_dir: Path, step: int, model, optimizer, state: dict, config: dict, keep_last: int = 2, name: str | None = None
) -> Path:
    """Write `run_dir/step-NNNNNN` (or `run_dir/<name>`) atomically, with its manifest; keep the last step dirs.

    A write that fails (a full disk, a read-only folder) leaves no temporary behind and raises a
    `WriteError` naming the checkpoint; the checkpoints already written are untouched.
    """
    run_dir = Path(run_dir)
    final = run_dir / (name or f"{STEP_PREFIX}{step:06d}")
    tmp = temporary_sibling(final)
    try:
        tmp.mkdir(parents=True)
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
    except OSError as e:
        raise write_error(final, e) from None
    except Exception as e:  # safetensors reports a failed write with its own error type
        if type(e).__name__ != "SafetensorError":
            raise
        raise WriteError(f"cannot write {final}: {' '.join(str(e).split()).lower() or 'the weights'}") from None
    finally:
        remove_quietly(tmp)
    if name is None:
        keep_newest(run_dir, keep_last)
    return final


def write_manifest(checkpoint_dir: Path) -> None:
    """Record the size and sha256 of every file below `checkpoint_dir` in its manifest.json."""
    files = {
        p.relative_to(checkpoint_dir).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
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
    """Load a checkpoint's weights into `model`, checked against their digest; weights written before
    haed recorded digests load with one line saying that they are verified by the manifest only. A step
    checkpoint of a multi-process run written without whole weights (all but its last) loads from its
    DCP shards, which its manifest verified."""
    if not (Path(checkpoint_dir) / "model.safetensors").is_file() and is_sharded(checkpoint_dir):
        return load_model_from_shards(Path(checkpoint_dir), model)
    state, has_digest = read_weights(Path(checkpoint_dir) / "model.safetensors")
    if not has_digest and (Path(checkpoint_dir) / MANIFEST).is_file():
        warn(f"the weights in {checkpoint_dir} carry no digest (an older haed wrote them): verified by {MANIFEST} only")
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
    state = load_tensors(path, map_location=device)
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) or "param_groups" not in state:
        raise HaedError(f"{path} is not an optimizer state: the checkpoint is damaged")
    return state


def restore_rng_state(checkpoint_dir: Path) -> None:
    path = Path(checkpoint_dir) / "rng.pt"
    if not path.is_file():
        raise HaedError(f"{checkpoint_dir} has no rng.pt: it cannot be resumed exactly")
    rng = load_tensors(path)
    if not isinstance(rng, dict) or not isinstance(rng.get("cpu"), torch.Tensor) or rng["cpu"].dtype != torch.uint8:
        raise HaedError(f"{path} is not a random-number state: the checkpoint is damaged")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _sampling_problem(checkpoint: Path, allow_unverified: bool) -> str | None:
    problem = checkpoint_problem(checkpoint)
    if problem != UNVERIFIABLE:
        return problem
    if not allow_unverified:
        raise HaedError(
            f"{_unusable(checkpoint, problem)}: choose another with --checkpoint, or pass --allow-unverified "
            "to use it anyway"
        )
    warn(f"{_unusable(checkpoint, problem)}: using it unverified, as asked")
    return None


def select_checkpoint(run_dir: Path, which: str = "best", allow_unverified: bool = False) -> Path:
    """The checkpoint directory `which` names: "best" (the best validation point, else the last),
    "last" (the newest intact step), or "step-N". A damaged best or last one gives way to an intact one
    with a warning; one that cannot be verified is refused unless `allow_unverified` (then a warning)."""
    run_dir = Path(run_dir)
    if which == BEST:
        best = run_dir / BEST
        if best.is_dir():
            problem = _sampling_problem(best, allow_unverified)
            if problem is None:
                return best
            warn(f"the best checkpoint {best} is damaged ({problem}); using the last one")
        which = "last"
    if which == "last":
        for checkpoint in reversed(step_dirs(run_dir)):
            problem = _sampling_problem(checkpoint, allow_unverified)
            if problem is None:
                return checkpoint
            warn(f"{_unusable(checkpoint, problem)}; falling back to an earlier one")
        if step_dirs(run_dir):
            raise HaedError(f"{run_dir} has no intact checkpoint (every step-N directory is damaged)")
        raise HaedError(f"{run_dir} has no checkpoint yet (no step-N directory)")
    name = which if which.startswith(STEP_PREFIX) else None
    if name is None or not name[len(STEP_PREFIX) :].isdigit():
        raise HaedError(f"--checkpoint must be best, last or step-N, not {which!r}")
    wanted = int(name[len(STEP_PREFIX) :])
    for checkpoint in step_dirs(run_dir):
        if int(checkpoint.name[len(STEP_PREFIX) :]) == wanted:
            problem = _sampling_problem(checkpoint, allow_unverified)
            if problem is not None:
                raise HaedError(_unusable(checkpoint, problem))
            return checkpoint
    kept = ", ".join(p.name for p in step_dirs(run_dir)) or "none"
    raise HaedError(f"{run_dir} has no checkpoint {which} (kept: {kept})")


class RunLock:
    """The one writer of a run directory: an exclusive lock on `run_dir/.lock`, which names its holder.

    The operating system drops the lock when the process ends, however it ends, so a crashed run
    never leaves a stale lock behind.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.file = None

    def __enter__(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
        except OSError as e:
            raise write_error(self.path, e) from None
        holder = _try_lock(f)
        if holder is not None:
            f.close()
            raise HaedError(f"{self.path.parent} is being written by {holder}: wait for it or choose another --out")
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on host {socket.gethostname()}")
            f.flush()
        except OSError as e:
            with contextlib.suppress(OSError):  # the unwritten line fails the close's flush again
                f.close()
            raise write_error(self.path, e) from None
        self.file = f
        # Temporaries of a writer that was killed mid-write: nobody else can be writing them now.
        for leftover in self.path.parent.glob(".*.tmp"):
            remove_quietly(leftover)
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()  # closing releases the lock
            self.file = None


def _try_lock(f, wait: bool = False) -> str | None:
    """Take the exclusive lock on the open file `f`; None, or the holder's line when another process has it."""
    try:
        import fcntl

        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except ImportError:  # pragma: no cover - not POSIX: no lock
        pass
    except OSError:
        f.seek(0)
        return f.read().strip() or "another process"
    return None


def wait_for_writer(run_dir: Path, wait: bool = False, on_wait=None) -> None:
    """Refuse (or, with `wait`, wait for) a run that another process is still writing: its checkpoints
    would be a moment of an unfinished run. Reads the lock without taking the run over."""
    path = Path(run_dir) / ".lock"
    if not path.is_file():
        return
    with open(path) as f:
        holder = _try_lock(f)
        if holder is None:
            return
        if not wait:
            raise HaedError(
                f"{run_dir} is still being trained by {holder}: wait for it to finish, or pass --wait to start "
                "when it does"
            )
        if on_wait is not None:
            on_wait(f"waiting for {run_dir} to finish training ({holder})")
        _try_lock(f, wait=True)
