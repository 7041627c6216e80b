"""The MEGABYTE-pytorch peer as a haed model: its logits are the package's own, causal, and haed's loop
trains it, evaluates it exactly and refuses to sample it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("MEGABYTE_pytorch")

from haed.errors import HaedError  # noqa: E402
from haed.model import build_model, count_parameters, forward_flops  # noqa: E402
from haed.recipe import debug_recipe  # noqa: E402


def peer_config(K=4):
    cfg = debug_recipe(patch_size=K).model
    return dataclasses.replace(cfg, arch="megabyte", max_seq_len=64)


def test_logits_give_the_packages_own_loss():
    """haed's byte cross-entropy of the peer equals MEGABYTE-pytorch's own loss (on bytes without 0, which
    the package leaves out as padding), so the peer is trained and scored as its authors compute it."""
    torch.manual_seed(0)
    model = build_model(peer_config()).eval()
    x = torch.randint(1, 256, (3, 32))
    ours = torch.nn.functional.cross_entropy(model(x).reshape(-1, 256), x.reshape(-1))
    theirs = model.net(x, return_loss=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_logits_are_causal():
    torch.manual_seed(0)
    model = build_model(peer_config()).eval()
    x = torch.randint(0, 256, (2, 32))
    base = model(x)
    for j in (0, 3, 4, 17, 31):  # inside a patch, at a patch's first and last byte
        y = x.clone()
        y[:, j] = (y[:, j] + 1) % 256
        changed = model(y)
        torch.testing.assert_close(changed[:, : j + 1], base[:, : j + 1])  # byte j is predicted before it is seen
        if j + 1 < x.shape[1]:
            assert not torch.allclose(changed[:, j + 1 :], base[:, j + 1 :])


def test_parameter_counts_and_flops():
    model = build_model(peer_config())
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["global"] > 0 and counts["local"] > 0
    assert forward_flops(model, 2, 32)["megabyte"] > 0


def test_haed_trains_evaluates_and_refuses_to_sample_the_peer(tmp_path):
    from haed.data import DatasetWriter
    from haed.evaluate import evaluate_run
    from haed.generate_job import prepare_generation
    from haed.train import train

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    with DatasetWriter(data) as w:
        for split, n in (("train", 20000), ("valid", 3000), ("test", 3000)):
            w.write(split, (np.arange(n) % 7 * 9 + rng.integers(0, 3, n)).astype(np.uint8))
        w.finish({"kind": "text", "source": {"type": "test"}})
    recipe = debug_recipe(str(data), patch_size=4)
    recipe.model.arch = "megabyte"
    recipe.full = dataclasses.replace(recipe.full, steps=30, eval_every=15, batch_size=4)
    result = train(recipe, "megabyte", tmp_path / "peer", device="cpu")
    assert result.step == 30 and result.best is not None
    scored = evaluate_run(tmp_path / "peer", "test", device="cpu", max_bytes=1000)
    assert scored["bytes"] == 1000 and 0 < scored["bits_per_byte"] < 8
    with pytest.raises(HaedError, match="MEGABYTE-pytorch"):
        prepare_generation(tmp_path / "peer", device="cpu", prompt="ab", max_bytes=8)
