"""Training on several processes under torchrun: process group, FSDP2, per-rank data, sharded checkpoints.

Every process of a `torchrun` launch reads its place from the environment torchrun sets (RANK,
WORLD_SIZE, LOCAL_RANK, and MASTER_ADDR / MASTER_PORT for the rendezvous) and joins one process
group: NCCL between GPUs, each rank on cuda:LOCAL_RANK, or gloo between CPU processes. A process
started without torchrun, or as the only one, is a world of one: no process group is created and
every helper here does exactly what the single-process code does.

- Model: FSDP2 (`fully_shard`) on every transformer block and on the root, the root being the model
  and its objective as one module, so that the root's parameters are gathered around the whole loss
  (the objectives call the encoder, the main model and the decoder separately, not `model.forward`).
  On CUDA the gathered parameters are bf16 and gradients are reduced in float32; on CPU all float32.
- Data: the windows of step s, micro-batch m are one draw of batch_size x world size windows from
  (seed, s, m); rank r trains on the r-th block of them. An N-rank run therefore sees exactly the
  batches of a one-process run with N times the batch size, and resumes exactly.
- IEM: the candidates of the sampled softmax are the distinct target patches of the global batch
  (`global_candidates`); the gradient of each candidate vector flows back to the rank that encoded it.
- Checkpoints: `step-N/` holds DCP shards of the model and the optimizer (`dcp/`, loadable at any
  world size) and each rank's generator states (`rng/`); the run's last step checkpoint, like `best/`,
  also holds `model.safetensors` with the whole weights (gathered to rank 0). Evaluate and generate
  need no process group: they read the whole weights, or a step checkpoint's shards in one process.
  Rank 0 writes the rest, the manifest, and renames the directory into place after a barrier, as a
  one-process save does.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from haed import sharded
from haed.checkpoint import RunLock, load_optimizer_state, restore_rng_state, save_checkpoint
from haed.data import random_windows
from haed.errors import HaedError, write_error
from haed.layers import Block
from haed.model import gather_rows, pad_rows, row_bucket, unique_patches
from haed.shard_reader import is_sharded


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise HaedError(f"WORLD_SIZE is set but {name} is not: launch several processes with torchrun")
        return default
    try:
        return int(value)
    except ValueError:
        raise HaedError(f"the environment variable {name}={value!r} is not an integer") from None


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def refuse_under_torchrun(command: str) -> None:
    """`command` trains one run after another in one process (haed compare, haed quickstart): under torchrun
    every process would run all of it, so it is refused in one line instead."""
    size = launched_world_size()
    if size > 1:
        raise HaedError(
            f"{command} runs in one process, not under torchrun ({size} processes): run `{command} ...` without "
            "torchrun (only the train-* commands take several processes)"
        )


def is_main_process() -> bool:
    """Whether this process prints and writes: rank 0 of a torchrun launch, or a process on its own."""
    return launched_world_size() <= 1 or _env_int("RANK", 0) == 0


@dataclass
class World:
    """The processes training one run together, as seen from one of them (`rank` of `size`)."""

    device: torch.device
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives -------------------------------------------------------------------------

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def broadcast_object(self, value):
        """Rank 0's `value`, on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, values: dict) -> dict:
        """Floats averaged over the ranks (validation metrics, each rank's over its own windows)."""
        if self.size == 1:
            return values
        keys = list(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: v / self.size for k, v in zip(keys, t.tolist())}

    def reduce_step(self, sums: dict, grad_norm: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """A step's metrics averaged over the ranks (every rank trains on as many windows), and the
        gradient norm as a plain tensor. They stay on the device."""
        if self.size == 1:
            return sums, grad_norm
        if hasattr(grad_norm, "full_tensor"):  # FSDP2's norm is a DTensor over the shards
            grad_norm = grad_norm.full_tensor()
        keys = list(sums)
        t = torch.stack([torch.as_tensor(sums[k]).to(self.device, torch.float64).reshape(()) for k in keys])
        dist.all_reduce(t)
        t /= self.size
        return dict(zip(keys, t.unbind())), grad_norm

    def agree(self, train_seconds: float, stop=None) -> float:
        """Rank 0's seconds of training, and (with `stop`) a stop request received by any rank.

        Every rank then decides the same: whether the time budget is spent, when to validate and
        whether to stop, so all ranks run the same steps and meet in the same collectives.
        """
        if self.size == 1:
            return train_seconds
        received = getattr(stop, "_received", None) if stop is not None else None
        code = _SIGNALS.index(received) + 1 if received in _SIGNALS else 0
        t = torch.tensor([train_seconds if self.is_main else 0.0, float(code)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # seconds are >= 0: the maximum is rank 0's
        seconds, code = t.tolist()
        if stop is not None and code and stop.signal is None:
            stop.signal = _SIGNALS[int(code) - 1]
        return seconds

    def defer_stop_requests(self, stop) -> None:
        """With several ranks, a SIGINT or SIGTERM is only noted when it arrives: `agree` turns it into
        `stop.signal` on every rank at the same step. (A second SIGINT still interrupts at once.)"""
        if self.size == 1 or threading.current_thread() is not threading.main_thread():
            return

        def note(signum, frame):
            name = signal.Signals(signum).name
            if name == "SIGINT" and "SIGINT" in (stop.signal, getattr(stop, "_received", None)):
                raise KeyboardInterrupt
            stop._received = name

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, note)

    # -- data ----------------------------------------------------------------------------------

    def windows(self, data: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
        """This rank's `batch_size` windows: its block of one draw of batch_size x size windows."""
        if self.size == 1:
            return random_windows(data, batch_size, seq_len, rng)
        return random_windows(data, batch_size * self.size, seq_len, rng)[
            self.rank * batch_size : (self.rank + 1) * batch_size
        ]

    # -- the run directory -----------------------------------------------------------------------

    @contextlib.contextmanager
    def run_lock(self, run_dir: Path):
        """The run's lock, held by rank 0; every rank fails alike when it is taken."""
        if self.size == 1:
            with RunLock(run_dir):
                yield
            return
        lock, problem = RunLock(run_dir), None
        if self.is_main:
            try:
                lock.__enter__()
            except HaedError as e:
                problem = str(e)
        problem = self.broadcast_object(problem)
        if problem is not None:
            raise HaedError(problem)
        try:
            yield
        finally:
            if self.is_main:
                lock.__exit__(None, None, None)

    # -- the model -------------------------------------------------------------------------------

    def parallelize(self, model: nn.Module, objective, params: list, seed: int):
        """FSDP2 over `model` trained with `objective`: (loss function, trained parameters).

        Alone: (`objective`, `params`) unchanged. Otherwise every transformer block and the root (the
        model with its objective) are sharded; the returned loss function takes the same arguments as
        an objective and the parameters are the sharded ones, in the same order.
        """
        if self.size == 1:
            return objective, params
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        name_of = {id(p): n for n, p in model.named_parameters()}
        order = [name_of[id(p)] for p in params]
        mesh = init_device_mesh(self.device.type, (self.size,))
        if self.device.type == "cuda":
            # bf16 parameters for compute, float32 gradient reduction; block inputs keep their dtype so
            # that the rotary tables stay float32.
            policy = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
            )
        else:
            policy = MixedPrecisionPolicy()
        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module, mesh=mesh, mp_policy=policy)
        root = fully_shard(_ModelWithObjective(model, objective), mesh=mesh, mp_policy=policy)
        by_name = dict(model.named_parameters())  # now the sharded parameters
        params = [by_name[n] for n in order]
        if self.rank:
            # Every rank built the same initial weights from `seed`; dropout should differ per rank.
            torch.manual_seed(
                int(np.random.SeedSequence([seed, 3, self.rank]).generate_state(1, dtype=np.uint64)[0] >> 1)
            )

        def loss_fn(_model, x, cfg, generator=None):
            return root(x, cfg, generator)

        return loss_fn, params

    # -- checkpoints: one-process files alone, DCP shards with several ranks (haed.sharded) ----------

    def save_checkpoint(
        self,
        run_dir: Path,
        step: int,
        model,
        optimizer,
        state: dict,
        config: dict,
        name: str | None = None,
        consolidated: bool = True,
    ) -> Path:
        """`checkpoint.save_checkpoint` alone; with several ranks the same directory, sharded.

        Without an optimizer (the best checkpoint) the whole weights are gathered to rank 0 and
        written in the one-process format; a sharded step checkpoint holds them too only with
        `consolidated` (the trainer asks for it at a run's last checkpoint).
        """
        if self.size == 1:
            return save_checkpoint(run_dir, step, model, optimizer, state, config, name=name)
        try:
            if optimizer is None:
                return sharded.save_gathered(self, Path(run_dir), step, model, state, config, name)
            return sharded.save_sharded(
                self, Path(run_dir), step, model, optimizer, state, config, consolidated=consolidated
            )
        except OSError as e:
            raise write_error(Path(run_dir) / (name or f"step-{step:06d}"), e) from None

    def load_optimizer_state(self, checkpoint: Path, device) -> dict | None:
        """The optimizer state of a one-process checkpoint resumed by one process (else None: it is
        loaded by `load_training_state` once the optimizer exists)."""
        if self.size == 1 and not is_sharded(checkpoint):
            return load_optimizer_state(checkpoint, device)
        return None

    def load_training_state(self, checkpoint: Path, model, optimizer) -> None:
        """Model and optimizer state from DCP shards (saved at any world size), or from a one-process
        checkpoint onto several ranks."""
        if is_sharded(checkpoint):
            sharded.load_sharded(self, Path(checkpoint), model, optimizer)
        else:
            sharded.load_one_process_optimizer(Path(checkpoint), model, optimizer)

    def restore_rng_state(self, checkpoint: Path) -> None:
        """The generator states of this rank at the checkpoint. Ranks the checkpoint did not have (it was
        saved by fewer processes) keep their own seeded generators."""
        if is_sharded(checkpoint):
            sharded.restore_rank_rng(self, Path(checkpoint))
        elif self.is_main:
            restore_rng_state(checkpoint)


_SIGNALS = ("SIGINT", "SIGTERM")


def init_world(device: torch.device) -> World:
    """The world this process trains in, from torchrun's environment; joins the process group once.

    Without torchrun (no WORLD_SIZE, or 1) a world of one on `device`, with no process group.
    """
    size = launched_world_size()
    if size <= 1:
        return World(device=device)
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", 0)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        atexit.register(_leave)
    elif dist.get_backend() != backend:
        raise HaedError(
            f"this process already joined a {dist.get_backend()} process group; "
            f"training on {device.type} needs {backend}"
        )
    return World(device=device, rank=rank, size=size, local_rank=local_rank, backend=backend)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class _ModelWithObjective(nn.Module):
    """The model and its objective as one module: FSDP's root gathers its parameters around the loss."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x, cfg, generator=None):
        return self.objective(self.model, x, cfg, generator)


# -- IEM's candidates across ranks ----------------------------------------------------------------


def global_candidates(
    uniq: torch.Tensor, vectors: torch.Tensor, counts: torch.Tensor, inverse: torch.Tensor, mode: str = "global"
):
    """The distinct patches of the global batch, as IEM's candidates: (uniq, vectors, counts, inverse).

    `uniq` (U, K) are this rank's distinct target patches, `vectors` their encodings (U rows, then
    any padding rows), `counts` their counts and `inverse` every target's row in `uniq`. With several
    ranks and `mode` "global", the patches, encodings and counts of every rank are gathered: the
    result holds the G distinct patches of all ranks in the order a single process would sort them,
    one encoding each (from the first rank that has it; gradients flow back to that rank), their
    counts over the global batch (log-Q), and `inverse` mapped to them. With "local", or alone,
    the arguments are returned as they are.
    """
    if mode not in ("global", "local"):
        raise HaedError(f"iem.candidates must be 'global' or 'local', not {mode!r}")
    if mode == "local" or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return uniq, vectors, counts, inverse
    U, device = uniq.shape[0], vectors.device
    sizes = _gather_sizes(U, device)
    keyed = torch.cat((uniq.to(device, torch.long), counts.to(device, torch.long)[:, None]), dim=1)
    gathered = _gather_rows(keyed, sizes)
    all_vectors = _GatherRows.apply(vectors[:U], sizes)
    g_uniq, g_inverse, _ = unique_patches(gathered[:, :-1].to(uniq.dtype))
    G = g_uniq.shape[0]
    g_counts = torch.zeros(G, dtype=counts.dtype, device=device).index_add_(
        0, g_inverse, gathered[:, -1].to(counts.dtype)
    )
    rows = torch.arange(gathered.shape[0], device=device)
    first = torch.full((G,), gathered.shape[0], dtype=torch.long, device=device).scatter_reduce_(
        0, g_inverse, rows, "amin"
    )
    g_vectors = pad_rows(gather_rows(all_vectors, first), row_bucket(device))
    offset = sum(sizes[: dist.get_rank()])
    local_to_global = g_inverse[offset : offset + U]
    return g_uniq, g_vectors, g_counts, local_to_global[inverse.to(device)]


def _gather_sizes(n: int, device) -> list[int]:
    t = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(s) for s in torch.cat(out).tolist()]


def _pad_to(rows: torch.Tensor, n: int) -> torch.Tensor:
    """rows (m, ...) followed by zero rows up to n."""
    if rows.shape[0] == n:
        return rows.contiguous()
    return torch.cat((rows, rows.new_zeros((n - rows.shape[0], *rows.shape[1:]))))


def _gather_rows(rows: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's `rows` (sizes[r] of them), concatenated in rank order."""
    padded = _pad_to(rows, max(sizes))
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


class _GatherRows(torch.autograd.Function):
    """All-gather of rows, whose backward returns each rank the gradient of its own rows summed over
    every rank's loss (the data-parallel reduction then averages as for any parameter)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, sizes: list[int]):
        ctx.sizes = sizes
        return _gather_rows(rows, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sizes, rank, longest = ctx.sizes, dist.get_rank(), max(ctx.sizes)
        stacked = torch.stack([_pad_to(part, longest) for part in torch.split(grad.float(), sizes)])
        if dist.get_backend() == "nccl":
            mine = torch.empty_like(stacked[0])
            dist.reduce_scatter_tensor(mine, stacked.reshape(-1, *stacked.shape[2:]))
        else:
            dist.all_reduce(stacked)
            mine = stacked[rank]
        return mine[: sizes[rank]].to(grad.dtype), None
