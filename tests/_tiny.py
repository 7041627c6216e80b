"""Tiny models and datasets shared by the model-core tests (imported by test modules)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from haed.data import DatasetWriter
from haed.model import build_model
from haed.recipe import debug_recipe


def make_text_dataset(path: Path, n_bytes: int = 6000, seed: int = 0) -> Path:
    """A learnable text-like dataset: words drawn from a small vocabulary."""
    rng = np.random.default_rng(seed)
    words = [b"the", b"cat", b"sat", b"on", b"a", b"mat", b"and", b"dog", b"ran", b"far", b"<page>", b"\n"]
    out = bytearray()
    while len(out) < n_bytes:
        out += words[rng.integers(len(words))] + b" "
    data = bytes(out[:n_bytes])
    a, b = int(n_bytes * 0.8), int(n_bytes * 0.9)
    with DatasetWriter(path) as w:
        w.write("train", data[:a])
        w.write("valid", data[a:b])
        w.write("test", data[b:])
        w.finish({"kind": "text", "source": {"description": "synthetic words for tests"}})
    return path


def tiny_model(patch_size: int = 4, arch: str = "haed", seed: int = 0, **model_overrides):
    recipe = debug_recipe(patch_size=patch_size, arch=arch)
    for k, v in model_overrides.items():
        setattr(recipe.model, k, v)
    torch.manual_seed(seed)
    return build_model(recipe.model).eval()


def random_bytes(*shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def write_recipe_toml(path: Path, recipe) -> Path:
    """`recipe` (a Recipe) as a TOML file that `--recipe PATH` loads back to the same recipe."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return repr(v)

    lines = []
    for key, v in recipe.to_dict().items():
        if not isinstance(v, dict):
            lines.append(f"{key} = {value(v)}")
    for key, v in recipe.to_dict().items():
        if isinstance(v, dict):
            lines += ["", f"[{key}]"] + [f"{k} = {value(x)}" for k, x in v.items()]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) as a module, to test its functions."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
