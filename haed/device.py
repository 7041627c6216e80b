"""Where computation runs: device choice, autocast, CUDA switches, and out-of-memory detection."""

from __future__ import annotations

import contextlib

import torch

from haed.errors import HaedError


def resolve_device(device: str = "auto") -> torch.device:
    """ "auto" (CUDA when available), "cpu", "cuda" or "cuda:N"; CUDA is configured for haed's shapes."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HaedError("--device cuda was asked for but CUDA is not available here")
    if device != "cpu" and not device.startswith("cuda"):
        raise HaedError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        configure_cuda()
    return dev


def configure_cuda() -> None:
    """Turn off PyTorch's cuDNN attention backend (flash attention and memory-efficient attention remain).

    cuDNN builds an execution plan for every new shape, and haed's shapes change all the time: the
    encoder attends over the batch's distinct patches (a different count every step) and cached
    generation over a growing cache. Measured on an H100 (torch 2.11, docs/performance.md), planning
    cost about 70 ms of host time per attention call, which made every IEM and full step host-bound.
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


def host_to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without stalling the host: on CUDA through pinned memory, asynchronously.

    A copy from ordinary (pageable) host memory waits for the device's queued work first, so the host
    could not run ahead of the GPU for the rest of the step.
    """
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain float32 elsewhere (CPU bf16 is slow and changes results)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def is_oom(error: BaseException) -> bool:
    """True for a CUDA out-of-memory error, also when wrapped (torch.compile) or raised as RuntimeError."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, torch.OutOfMemoryError):
            return True
        if isinstance(e, RuntimeError) and "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False
