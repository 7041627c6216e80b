"""The byte windows each cell trains on: random windows of a dataset's train split, or synthetic random bytes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from haed.data import open_dataset, random_windows
from haed.recipe import Recipe
from haed.steps import batch_rng

RANDOM_BYTES = "random bytes"
SYNTHETIC_NOTE = (
    "synthetic: uniformly random bytes drawn per step (seeded), no dataset read; every patch is distinct, so "
    "the encoder's rows and IEM's candidates are at their maximum (text repeats some patches); "
    "give --dataset DIR for real bytes"
)


class WindowSource:
    """Byte windows for step i of a cell: random windows of a dataset's train split, or random bytes.

    Step i of every cell sees the same windows (seeded by (seed, i)), whatever the objective.
    """

    def __init__(
        self, data: np.ndarray | None, seed: int = 0, description: str = RANDOM_BYTES, path: str | None = None
    ):
        self.data = data
        self.seed = seed
        self.description = description
        self.path = path

    @classmethod
    def for_recipe(cls, recipe: Recipe, dataset: str | os.PathLike | None, seed: int = 0) -> "WindowSource":
        """An explicit `dataset` must exist; the recipe's own dataset is used when it exists; else random bytes."""
        if dataset is not None:
            path = Path(dataset)
        elif recipe.data.dataset and (Path(recipe.data.dataset) / "meta.json").is_file():
            path = Path(recipe.data.dataset)
        else:
            return cls(None, seed)
        data = open_dataset(path).split("train")
        return cls(data, seed, f"train split of {path}", str(path))

    @property
    def max_len(self) -> int | None:
        return None if self.data is None else int(self.data.shape[0])

    @property
    def note(self) -> str | None:
        """What a reader of the numbers must know about the windows: that random bytes are synthetic."""
        return SYNTHETIC_NOTE if self.data is None else None

    def windows(self, step: int, batch_size: int, seq_len: int) -> np.ndarray:
        if self.data is not None:
            return random_windows(self.data, batch_size, seq_len, batch_rng(self.seed, step, 0, stream=11))
        return np.random.default_rng([self.seed, 11, step]).integers(0, 256, (batch_size, seq_len), dtype=np.uint8)


def distinct_patches(windows: np.ndarray, patch_size: int) -> int:
    """How many distinct patches of `patch_size` bytes the windows hold (the encoder's rows)."""
    p = np.ascontiguousarray(windows).reshape(-1, patch_size)
    if patch_size <= 8:
        padded = np.zeros((p.shape[0], 8), dtype=np.uint8)
        padded[:, :patch_size] = p
        return int(np.unique(padded.view(np.uint64)).shape[0])
    return int(np.unique(p, axis=0).shape[0])
