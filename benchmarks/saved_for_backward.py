"""What one training step keeps for its backward pass, measured on the CPU: the GPU memory a setting saves,
before a GPU is at hand.

The forward pass of each objective runs once under bfloat16 autocast (as training runs on a GPU) while a
saved-tensors hook notes every distinct storage autograd keeps; their sum is what the step holds at the
start of its backward pass beside the weights, gradients and optimizer state. Temporaries that die within
the forward (the softmax's chunks, attention's working memory) are not in it, so a GPU's peak is higher.

    python benchmarks/saved_for_backward.py --recipe code --dataset data/code --objectives iem,full \
        --seq-len 2048 --batch-size 16 --set model.decoder.dim=512 --set model.decoder.heads=8 \
        --variant rc-main:iem.recompute=main --variant rc-main-decoder:iem.recompute=main+decoder

With `--peak`, the forward and backward passes run once more while a dispatch mode follows every storage
the step allocates until it is freed: the step's peak above what it started with (weights and optimizer
state excluded, the gradients included) and the operator at that peak, which says whether the peak falls
in the forward pass or in the backward (eager: compiled graphs on a GPU fuse and keep less).

A variant is NAME:FIELD=VALUE,FIELD=VALUE (in a value, + stands for a comma).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from haed.objectives import get_objective  # noqa: E402
from haed.profile import WindowSource, build_for_objective, objective_train_config  # noqa: E402
from haed.recipe import load_recipe  # noqa: E402
from haed.steps import to_device, torch_generator  # noqa: E402


def saved_bytes(model, objective, cfg, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves during one forward pass of `objective` on `x`."""
    storages: dict[int, int] = {}

    def note(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(note, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            objective(model, x, cfg, torch_generator(0, 0, 0))
    return sum(storages.values())


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages allocated under this mode and still alive, and their peak with the operator
    that reached it. A storage is counted from the operator that returned it until it is freed."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0
        self.peak_at = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                storage = t.untyped_storage()
                self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                self.now += storage.nbytes()
        if self.now > self.peak:
            self.peak, self.peak_at = self.now, str(func)
        return out


def step_peak(model, objective, cfg, x: torch.Tensor) -> tuple[int, str]:
    """Peak bytes a forward and backward pass of `objective` on `x` allocate above their start, and the
    operator at the peak (with its pass)."""
    model.zero_grad(set_to_none=True)
    mode = LiveBytes()
    with mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = objective(model, x, cfg, torch_generator(0, 0, 0))
        forward_peak = mode.peak
        loss.backward()
    where = "forward" if mode.peak == forward_peak else "backward"
    model.zero_grad(set_to_none=True)
    return mode.peak, f"{where}, {mode.peak_at}"


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, fields = text.partition(":")
    return name, [field.replace("+", ",") for field in fields.split(",") if field]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="code")
    p.add_argument("--dataset", default=None)
    p.add_argument("--objectives", default="iem,full")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--variant", action="append", default=[], help="NAME:FIELD=VALUE,... (+ for a comma in a value)")
    p.add_argument("--peak", action="store_true", help="also the step's peak memory and where it falls")
    a = p.parse_args()
    device = torch.device("cpu")
    peak_head = " step peak GiB | at |" if a.peak else ""
    print(f"| variant | objective | seq | batch | saved for backward GiB | parameters GiB (fp32) |{peak_head}")
    print("|---|---|---|---|---|---|" + ("---|---|" if a.peak else ""))
    for name, fields in [parse_variant(v) for v in a.variant] or [("recipe", [])]:
        recipe = load_recipe(a.recipe, a.overrides + fields)
        source = WindowSource.for_recipe(recipe, a.dataset)
        x = to_device(source.windows(0, a.batch_size, a.seq_len), device)
        for objective_name in a.objectives.split(","):
            objective = get_objective(objective_name)
            cfg = objective_train_config(recipe, objective, a.batch_size, False)
            model, _, _ = build_for_objective(recipe, objective, cfg, device, False)
            saved = saved_bytes(model, objective, cfg, x) / 2**30
            weights = sum(t.numel() for t in model.parameters()) * 4 / 2**30
            peak = ""
            if a.peak:
                model.train()
                peak_bytes, at = step_peak(model, objective, cfg, x)
                peak = f" {peak_bytes / 2**30:.3f} | {at} |"
            print(f"| {name} | {objective.name} | {a.seq_len:,} | {a.batch_size} | {saved:.3f} | {weights:.3f} |{peak}")


if __name__ == "__main__":
    main()
