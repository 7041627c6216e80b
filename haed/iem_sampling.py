"""What IEM's step samples: the candidate patches each row is scored against (the batch's distinct patches,
a uniform subset of them under `num_negatives`, or an explicit set) with their log-Q shift, and the patches
its byte loss takes. With fixed shapes (`iem.fixed_shapes`) the random numbers are drawn before the loss,
so that the loss is one function of tensors (`haed.objectives.fixed_shape_loss`).
"""

from __future__ import annotations

import math

import torch

from haed.config import TrainConfig
from haed.device import host_to_device
from haed.model import patch_keys


def fixed_shape_draws(rows: int, cfg: TrainConfig, generator, device) -> dict:
    """The random numbers of an IEM step over `rows` patches with fixed shapes, drawn from the step's
    generator in the order the loss uses them, on the device: each row's key for the capped candidates
    (`capped_slots`; None without a cap below `rows`), and the rows of the byte loss (None: all, or no
    byte loss)."""
    noise = byte_rows = None
    if cfg.num_negatives and rows > cfg.num_negatives:
        noise = host_to_device(torch.rand(rows, generator=generator), device)
    if cfg.byte_loss_fraction > 0:
        count = byte_loss_rows(rows, cfg.byte_loss_fraction)
        if count < rows:
            byte_rows = host_to_device(torch.randperm(rows, generator=generator)[:count], device)
    return {"noise": noise, "byte_rows": byte_rows}


def choose_candidates(vectors, uniq, counts, cfg: TrainConfig, generator, candidates, draws: dict | None):
    """IEM's candidates: (their vectors, each distinct patch's column among them or -1, their log Q shift or
    None, how many count). An explicit (C, K) set of `candidates` is matched to the batch's distinct patches
    `uniq` by key; otherwise the distinct patches themselves, subsampled to `cfg.num_negatives` where set
    (with fixed shapes, by the `draws`' keys)."""
    fixed_shapes = draws is not None
    device = vectors.device
    U = uniq.shape[0]
    if candidates is not None:
        cand_keys = patch_keys(candidates.to(device))
        order = torch.argsort(cand_keys)
        where = torch.searchsorted(cand_keys[order], patch_keys(uniq)).clamp(max=len(order) - 1)
        found = cand_keys[order][where] == patch_keys(uniq)
        col_of_uniq = torch.where(found, order[where], torch.full_like(where, -1))
        logq_cand = None
        if cfg.logq:
            logq_cand = torch.zeros(vectors.shape[0], device=device)
            logq_cand[col_of_uniq[found]] = counts[found].float().log()
        return vectors, col_of_uniq, logq_cand, vectors.shape[0]
    if cfg.num_negatives and U > cfg.num_negatives:
        if fixed_shapes:
            keep, log_rate = capped_slots(counts, cfg.num_negatives, draws["noise"])
        else:
            keep = host_to_device(capped_candidates(U, cfg.num_negatives, generator), device)
            log_rate = math.log(len(keep) / U)
        cand = vectors[keep]
        col_of_uniq = torch.full((U,), -1, dtype=torch.long, device=device)
        col_of_uniq[keep] = torch.arange(len(keep), device=device)
        logq_cand = candidate_shift(counts[keep], len(keep), cfg.logq)
        if cfg.logq:
            logq_cand = logq_cand + log_rate  # the kept patches' counts as a share of the batch's
    else:
        cand = vectors
        col_of_uniq = torch.arange(U, device=device)
        logq_cand = candidate_shift(counts, cand.shape[0], cfg.logq)
    if fixed_shapes:  # counted on the device: no synchronisation
        num_candidates = (counts > 0).sum().clamp(max=cand.shape[0])
    else:
        num_candidates = min(cand.shape[0], U)  # padding not counted
    return cand, col_of_uniq, logq_cand, num_candidates


def byte_loss_rows(rows: int, fraction: float) -> int:
    """How many of `rows` patches the byte loss takes: a `fraction` of them, at least one."""
    return max(1, min(rows, round(fraction * rows)))


def capped_candidates(num_distinct: int, cap: int, generator: torch.Generator | None) -> torch.Tensor:
    """A uniform random subset of `cap` of the distinct patches (indices), shared by every row."""
    return torch.randperm(num_distinct, generator=generator)[:cap]


def capped_slots(counts: torch.Tensor, cap: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`capped_candidates` for `unique_patches_fixed`'s rows, chosen on the device by each row's uniform random
    key in `noise`: (indices of `cap` rows, a uniform random subset of the distinct patches, all of them and
    then padding rows where there are at most `cap`; log of the distinct patches' sampling rate)."""
    keep = torch.topk(noise.masked_fill(counts == 0, -1.0), cap).indices
    distinct = (counts > 0).sum()
    return keep, torch.log(distinct.clamp(max=cap) / distinct)


def candidate_shift(counts: torch.Tensor, rows: int, logq: bool) -> torch.Tensor:
    """What IEM's softmax subtracts from the scores of `rows` candidates whose first `len(counts)` have these
    counts in the batch: log Q (the log count, with `logq`; else 0), and +inf for padding (a count of 0, or
    a row beyond `counts`), which then changes neither the loss nor a gradient."""
    shift = counts.float().log() if logq else torch.zeros(counts.shape[0], device=counts.device)
    shift = shift.masked_fill(counts == 0, float("inf"))
    if rows > counts.shape[0]:
        shift = torch.cat((shift, shift.new_full((rows - counts.shape[0],), float("inf"))))
    return shift
