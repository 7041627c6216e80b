"""Nothing half-trusted (issue 26, classes 1 and 2): checkpoints that are corrupt, manifest-less, without a
digest, or that hold a pickle, through the library and the real CLI: one line, never silent use."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from _faults import cli, one_error
from safetensors.torch import load_file, save_file

from haed.checkpoint import checkpoint_problem, latest_intact_checkpoint
from haed.errors import HaedError, HaedWarning
from haed.integrity import DIGEST_KEY
from haed.train import train


@pytest.fixture
def trained(text_run):
    return text_run / "run"


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def _flip(path):
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _update_manifest(checkpoint, name):
    """Record `name`'s altered content in the manifest, as a tool that rewrote it would."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    path = checkpoint / name
    manifest["files"][name] = {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def _strip_digest(checkpoint):
    path = checkpoint / "model.safetensors"
    save_file(load_file(str(path)), str(path))  # as written before weights carried a digest


def test_the_weights_carry_their_digest(trained):
    from safetensors import safe_open

    with safe_open(str(trained / "step-000004" / "model.safetensors"), "pt") as f:
        assert len(f.metadata()[DIGEST_KEY]) == 64
    assert checkpoint_problem(trained / "step-000004") is None


@pytest.mark.parametrize("manifest", ["{}", "[1, 2]", '{"files": {"model.safetensors": 3}}', '{"files": []}'])
def test_a_manifest_of_the_wrong_shape_is_a_damaged_checkpoint(run, manifest):
    (run / "step-000004" / "manifest.json").write_text(manifest)
    assert "not a haed manifest" in checkpoint_problem(run / "step-000004")
    with pytest.warns(HaedWarning, match="step-000004 is damaged"):
        assert latest_intact_checkpoint(run).name == "step-000002"


def test_a_malformed_manifest_is_never_used_by_the_commands(run):
    for name in ("step-000004", "best"):
        (run / name / "manifest.json").write_text("[1, 2]")
    with pytest.warns(HaedWarning, match="best .* is damaged"):  # best and last damaged: step-000002
        r = cli("evaluate", "--run", run, "--max-bytes", "64")
    assert r.exit_code == 0 and "step-000002" in r.stdout, (r.stdout, r.stderr)
    one_error(cli("generate", "--run", run, "--checkpoint", "step-4"), "step-000004 is damaged", "manifest")
    with pytest.warns(HaedWarning, match="step-000004 is damaged"):
        r = cli("train-full", "--out", run, "--resume", "--allow-changes", "--steps", "3")
    assert r.exit_code == 0 and "Traceback" not in r.stderr, r.stderr


def test_without_a_manifest_the_digest_catches_flipped_weights(run):
    for name in ("step-000002", "step-000004", "best"):
        (run / name / "manifest.json").unlink()
    assert checkpoint_problem(run / "step-000004") is None  # verified by its digest alone
    _flip(run / "step-000004" / "model.safetensors")
    assert "digest" in checkpoint_problem(run / "step-000004")
    one_error(cli("evaluate", "--run", run, "--checkpoint", "step-4"), "digest")
    with pytest.warns(HaedWarning, match="step-000004 is damaged .*digest"):
        r = cli("generate", "--run", run, "--checkpoint", "last", "--max-bytes", "8")
    assert r.exit_code == 0 and "step-000002" in r.stderr, r.stderr  # sampled from the intact one, said so
    with pytest.warns(HaedWarning, match="step-000004 is damaged .*digest"):
        result = train(None, "full", run, resume=True, allow_changes=False)
    assert result.step == 4  # resumed from step 2, to the end of its schedule


def test_a_checkpoint_that_cannot_be_verified_is_refused_unless_asked(run):
    for name in ("step-000002", "step-000004", "best"):
        (run / name / "manifest.json").unlink()
        _strip_digest(run / name)
    one_error(cli("evaluate", "--run", run), "cannot be verified", "--allow-unverified")
    one_error(cli("generate", "--run", run, "--max-bytes", "8"), "--allow-unverified")
    with pytest.warns(HaedWarning, match="using it unverified, as asked"):
        r = cli("evaluate", "--run", run, "--max-bytes", "64", "--allow-unverified")
    assert r.exit_code == 0, r.stderr
    with (
        pytest.raises(HaedError, match="no checkpoint that can be verified"),
        pytest.warns(HaedWarning, match="verified"),
    ):
        train(None, "full", run, resume=True)


def test_an_older_checkpoint_without_a_digest_loads_with_one_line(run):
    for name in ("step-000004", "best"):
        _strip_digest(run / name)
        _update_manifest(run / name, "model.safetensors")
    with pytest.warns(HaedWarning, match="carry no digest .*verified by manifest.json only") as caught:
        r = cli("evaluate", "--run", run, "--max-bytes", "64")
    assert r.exit_code == 0, r.stderr
    assert len(caught) == 1


def test_a_truncated_optimizer_state_with_its_manifest_updated_falls_back(run):
    optimizer = run / "step-000004" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:200])
    _update_manifest(run / "step-000004", "optimizer.pt")
    with pytest.warns(HaedWarning, match="optimizer.pt cannot be read .*damaged"):
        assert latest_intact_checkpoint(run).name == "step-000002"


class _Evil:
    """Unpickled, it would run a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poison(checkpoint, name, marker):
    torch.save({"state": _Evil(marker), "param_groups": [], "cpu": _Evil(marker)}, checkpoint / name)
    _update_manifest(checkpoint, name)


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt"])
def test_a_pickle_is_refused_in_one_line_and_never_runs(run, tmp_path, name):
    from haed.checkpoint import load_optimizer_state, restore_rng_state

    marker = tmp_path / "marker"
    refused = "holds objects that are not tensors; refused, nothing was executed"
    _poison(run / "step-000004", name, marker)
    with pytest.raises(HaedError, match=refused):
        (load_optimizer_state if name == "optimizer.pt" else restore_rng_state)(
            run / "step-000004", *(["cpu"] * (name == "optimizer.pt"))
        )
    untouched = tmp_path / "untouched"
    shutil.copytree(run, untouched)
    with pytest.warns(HaedWarning, match=f"step-000004 is damaged .*{refused}"):
        r = cli("train-full", "--out", run, "--resume", "--allow-changes", "--steps", "5")
    assert r.exit_code == 0, r.stderr  # resumed from step-000002, the newest one that loads
    _poison(untouched / "step-000002", name, marker)
    with pytest.warns(HaedWarning, match=refused):
        one_error(cli("train-full", "--out", untouched, "--resume"), "no checkpoint that can be verified and loaded")
    assert not marker.exists()
