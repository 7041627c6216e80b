"""What keeps a training run from losing work or writing garbage: stop requests (Ctrl-C, SIGTERM) that
end the run after a checkpoint, the watch for non-finite values, and the checks made before step 1."""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path

import torch

from haed.config import TrainConfig
from haed.errors import HaedError


class StopRequests:
    """Turns SIGINT and SIGTERM into a request to stop after the current step (and checkpoint).

    A second Ctrl-C interrupts at once. Only the main thread can install signal handlers; elsewhere
    signals keep their usual effect.
    """

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signal == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class NonFiniteWatch:
    """Remembers, on the device, the first step whose loss or gradient norm was not finite.

    Checking costs a host synchronisation, so it is read only where the loop synchronises anyway (logging,
    validation, checkpoints), and always before weights are written.
    """

    def __init__(self, device, lr_option: str = "the phase's lr"):
        self.lr_option = lr_option  # how to lower the learning rate, named in the error
        self.step = torch.full((2,), -1, dtype=torch.long, device=device)  # [loss, grad norm]
        self.value = torch.zeros(2, dtype=torch.float32, device=device)

    def update(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        values = torch.stack((loss.detach().float().reshape(()), grad_norm.detach().float().reshape(())))
        first = (self.step < 0) & ~torch.isfinite(values)
        self.step.copy_(torch.where(first, torch.full_like(self.step, step), self.step))
        self.value.copy_(torch.where(first, values, self.value))

    def check(self, last_checkpoint: str) -> None:
        steps, values = self.step.tolist(), self.value.tolist()
        for name, step, value in zip(("loss", "gradient norm"), steps, values):
            if step >= 0:
                raise HaedError(
                    f"step {step}: the {name} is {value} (not finite); training stopped without saving "
                    f"these weights ({last_checkpoint}). Lower the learning rate ({self.lr_option}) or check the data."
                )


def _checkpoint_bytes(model, with_optimizer: bool) -> int:
    weights = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    return weights * (3 if with_optimizer else 1)  # AdamW keeps two float32 moments per parameter


def preflight(run_dir: Path, model, cfg: TrainConfig, splits: dict, seq_len: int) -> None:
    """Everything that can fail later but can be checked now, each with one line naming the cause."""
    for name, data in splits.items():
        if len(data) < seq_len:
            raise HaedError(
                f"the {name} split has {len(data):,} bytes, fewer than one window of seq_len={seq_len:,}: "
                f"use a smaller --seq-len or more data"
            )
    # Two step checkpoints, the best one and one being written may coexist.
    needed = 2 * _checkpoint_bytes(model, True) + 2 * _checkpoint_bytes(model, False)
    where = run_dir
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < needed:
        raise HaedError(
            f"{where} has {free / 1e6:,.0f} MB free, checkpoints of this model need about {needed / 1e6:,.0f} MB"
        )
