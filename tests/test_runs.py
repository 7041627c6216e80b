"""Run directories that are owned, verified and never hold garbage: lock, checkpoint verification and
fallback, non-finite losses, checks before the first step, signals, resume from the run's own recipe."""

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from _tiny import make_text_dataset
from conftest import single_thread
from safetensors.torch import load_file

from haed.checkpoint import RunLock, latest_checkpoint, select_checkpoint, step_dirs
from haed.data import DatasetWriter
from haed.errors import HaedError, HaedWarning
from haed.objectives import OBJECTIVES
from haed.recipe import debug_recipe
from haed.runs import load_run, read_metrics
from haed.train import train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_text_dataset(tmp_path_factory.mktemp("data") / "words")


def _weights(run, checkpoint=None):
    return load_file(str((checkpoint or latest_checkpoint(run)) / "model.safetensors"))


def _loss_that(monkeypatch, objective, at_call, action):
    """Replace an objective's loss by one that calls `action(loss, metrics)` on its `at_call`-th training
    call (1-based; validation calls are not counted)."""
    record = OBJECTIVES[objective]
    calls = {"n": 0}

    def loss(model, x, cfg, generator=None):
        value, metrics = record.loss(model, x, cfg, generator)
        if model.training:
            calls["n"] += 1
            if calls["n"] == at_call:
                value, metrics = action(value, metrics)
        return value, metrics

    monkeypatch.setitem(OBJECTIVES, objective, dataclasses.replace(record, loss=loss))


def test_a_second_writer_is_refused_with_the_holder_named(dataset, tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(HaedError, match=rf"being written by pid {os.getpid()} on host"):
            train(debug_recipe(str(dataset)), "iem", run)
    train(debug_recipe(str(dataset)), "iem", run)  # released: the run proceeds
    assert latest_checkpoint(run).name == "step-000004"


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_intact_one(dataset, tmp_path):
    recipe = debug_recipe(str(dataset))
    recipe.iem.steps, recipe.iem.ckpt_every = 6, 3
    straight = tmp_path / "straight"
    train(recipe, "iem", straight)
    run = tmp_path / "run"
    recipe.iem.steps = 6
    train(recipe, "iem", run)
    assert [p.name for p in step_dirs(run)] == ["step-000003", "step-000006"]
    weights = run / "step-000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated, as by a full disk
    with pytest.warns(HaedWarning, match="step-000006 is damaged"):
        assert select_checkpoint(run, "last").name == "step-000003"
    with pytest.warns(HaedWarning, match="damaged"):
        _, _, config = load_run(run, checkpoint="last")
    assert config["checkpoint"].endswith("step-000003")
    # A flipped byte of the same size is caught by the sha256.
    state = run / "step-000003" / "state.json"
    text = state.read_text()
    state.write_text(text.replace('"step": 3', '"step": 4'))
    with pytest.raises(HaedError, match="step-000003 is damaged .*sha256"):
        select_checkpoint(run, "step-3")
    state.write_text(text)
    # Resuming from the intact one reproduces the uninterrupted run.
    with pytest.warns(HaedWarning):
        train(None, "iem", run, resume=True)
    a, b = _weights(straight), _weights(run)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_resume_needs_the_optimizer_and_rng_state(dataset, tmp_path):
    recipe = debug_recipe(str(dataset))
    run = tmp_path / "run"
    train(recipe, "full", run, stop_after=2)
    (latest_checkpoint(run) / "optimizer.pt").unlink()
    (latest_checkpoint(run) / "manifest.json").unlink()  # as a checkpoint from before manifests
    with pytest.raises(HaedError, match="no optimizer.pt"):
        train(None, "full", run, resume=True)


def test_a_non_finite_loss_stops_the_run_without_saving_its_weights(dataset, tmp_path, monkeypatch):
    recipe = debug_recipe(str(dataset))
    recipe.full.steps, recipe.full.ckpt_every, recipe.full.eval_every = 6, 2, 0
    _loss_that(monkeypatch, "full", 3, lambda loss, m: (loss * float("nan"), {**m, "loss": m["loss"] * float("nan")}))
    run = tmp_path / "run"
    with pytest.raises(HaedError, match=r"step 3: the loss is nan .*step-000002.*--set full\.lr=\.\.\., now 0\.003"):
        train(recipe, "full", run)
    assert [p.name for p in step_dirs(run)] == ["step-000002"]
    assert all(torch.isfinite(w).all() for w in _weights(run).values())


def test_a_non_finite_gradient_is_caught_too(dataset, tmp_path, monkeypatch):
    recipe = debug_recipe(str(dataset))
    recipe.full.steps, recipe.full.eval_every = 4, 0

    def poison(loss, metrics):
        # finite loss, infinite gradient: the loss is scaled by a huge factor inside
        return loss + (loss * 1e38 * 1e38 - (loss * 1e38 * 1e38).detach()), metrics

    _loss_that(monkeypatch, "full", 2, poison)
    with pytest.raises(HaedError, match=r"step 2: the gradient norm is (nan|inf)"):
        train(recipe, "full", tmp_path / "run")
    assert not step_dirs(tmp_path / "run")


def test_a_short_validation_split_is_refused_before_the_first_step(tmp_path):
    data = tmp_path / "short"
    with DatasetWriter(data) as w:
        w.write("train", b"abcd" * 500)
        w.write("valid", b"abcd" * 4)  # 16 bytes: less than one window
        w.write("test", b"abcd" * 100)
        w.finish({"kind": "text", "source": {"description": "test"}})
    run = tmp_path / "runs" / "run"
    with pytest.raises(HaedError, match="the valid split has 16 bytes, fewer than one window of seq_len=64"):
        train(debug_recipe(str(data)), "iem", run)
    assert not (tmp_path / "runs").exists()  # nothing left behind


def test_sigterm_writes_a_checkpoint_and_resume_continues_exactly(dataset, tmp_path, monkeypatch):
    recipe = debug_recipe(str(dataset))
    recipe.full.steps, recipe.full.ckpt_every = 6, 100
    straight = train(recipe, "full", tmp_path / "straight")
    _loss_that(monkeypatch, "full", 3, lambda loss, m: (os.kill(os.getpid(), signal.SIGTERM), (loss, m))[1])
    run = tmp_path / "run"
    events = []
    stopped = train(recipe, "full", run, on_event=events.append)
    assert stopped.interrupted == "SIGTERM" and stopped.step == 3
    assert latest_checkpoint(run).name == "step-000003"
    assert any("stopped by SIGTERM at step 3" in e.get("text", "") for e in events)
    monkeypatch.undo()
    events = []
    resumed = train(None, "full", run, resume=True, on_event=events.append)
    assert resumed.step == straight.step == 6 and resumed.interrupted is None
    assert any(e.get("text", "").startswith(f"resuming {run} from step 3") for e in events)
    a, b = _weights(tmp_path / "straight"), _weights(run)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_stop_request_ends_a_command_of_several_phases_where_it_stopped(dataset, tmp_path):
    """SIGTERM during the IEM phase of `haed compare` (as `timeout` or a cluster's time limit sends it): the phase
    checkpoints, the decoder phase does not start, and the command ends with exit status 143 and one line; the same
    command again continues the phase and finishes."""
    from haed.compare import compare
    from haed.errors import StopRequested

    recipe = debug_recipe(str(dataset))
    steps = []

    def sigterm_after_two_steps(event):
        if event["event"] == "progress":
            steps.append(event)
            if len(steps) == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "cmp"
    with pytest.raises(StopRequested) as e:
        compare(recipe, out, 1.0, systems=("iem",), evals=2, device="cpu", on_event=sigterm_after_two_steps)
    assert e.value.exit_code == 143
    assert str(e.value).startswith(f"stopped by SIGTERM at step 2 of {out / 'iem'}: checkpoint written")
    assert latest_checkpoint(out / "iem").name == "step-000002"
    assert not (out / "iem" / "decoder").exists()
    result = compare(recipe, out, 1.0, systems=("iem",), evals=2, device="cpu")
    assert [r["system"] for r in result["rows"]] == ["iem"] and result["rows"][0]["run"].endswith("decoder")


def test_resume_takes_the_runs_own_recipe_and_refuses_a_different_one(dataset, tmp_path):
    recipe = debug_recipe(str(dataset))
    run = tmp_path / "run"
    train(recipe, "iem", run, stop_after=2)
    other = make_text_dataset(tmp_path / "other", seed=1)
    changed = debug_recipe(str(other))
    with pytest.raises(HaedError, match=r"differs from the run's own \(data.dataset: "):
        train(changed, "iem", run, resume=True)
    changed = debug_recipe(str(dataset))
    changed.iem.seed = 5
    with pytest.raises(HaedError, match=r"iem.seed: 0 -> 5.*pass --allow-changes"):
        train(changed, "iem", run, resume=True)
    assert train(None, "iem", run, resume=True).step == 4
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"]["iem"]["seed"] == 0


def test_best_checkpoint_is_the_lowest_validation_point(dataset, tmp_path, monkeypatch):
    import haed.trainer as trainer_module

    scripted = iter([3.0, 1.0, 2.0, 1.5])
    monkeypatch.setattr(
        trainer_module, "evaluate_objective", lambda *a, **k: {"loss": 0.0, "bits_per_byte": next(scripted)}
    )
    recipe = debug_recipe(str(dataset))
    recipe.full.steps, recipe.full.eval_every, recipe.full.ckpt_every = 8, 2, 2
    weights_at = {}

    def keep_weights(event):
        if event["event"] == "checkpoint":
            weights_at[event["step"]] = _weights(None, Path(event["path"]))

    result = train(recipe, "full", tmp_path / "run", on_event=keep_weights)
    assert result.best["step"] == 4 and result.best["value"] == 1.0
    best = select_checkpoint(tmp_path / "run", "best")
    assert best.name == "best" and json.loads((best / "state.json").read_text())["step"] == 4
    b = _weights(None, best)
    assert all(torch.equal(b[n], weights_at[4][n]) for n in b)
    _, _, config = load_run(tmp_path / "run")  # evaluate and generate take the best by default
    assert config["checkpoint"].endswith("best")
    valid = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "valid"]
    assert [r["bits_per_byte"] for r in valid] == [3.0, 1.0, 2.0, 1.5]


class SteadyClock:
    """A perf_counter that advances `tick` seconds per reading: every step of the trainer then takes the
    same seconds whatever the machine's load (the budget is counted in these seconds)."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_time_budget_ends_the_run_on_time_and_resume_uses_what_is_left(dataset, tmp_path, monkeypatch):
    import haed.trainer

    monkeypatch.setattr(haed.trainer, "time", SteadyClock(0.02))  # a step is 0.02 s: 50 steps in the budget
    recipe = debug_recipe(str(dataset))
    cfg = recipe.full
    cfg.time_budget, cfg.steps, cfg.eval_every, cfg.ckpt_every, cfg.log_every, cfg.warmup_steps = 1.0, 10**6, 0, 5, 1, 2
    run = tmp_path / "run"
    first = train(recipe, "full", run, stop_after=5)
    assert first.step == 5 and 0 < first.train_seconds < 1.0
    result = train(None, "full", run, resume=True)
    records = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    seconds = [r["train_seconds"] for r in records]
    assert seconds == sorted(seconds) and seconds[4] == pytest.approx(first.train_seconds, abs=1e-3)
    # It ran until the budget was spent, and stopped at the first step past it. Records round to 4
    # decimals, so a step that ended within 50 us before the budget can read 1.0 (it happened in CI).
    assert seconds[-1] >= 1.0 and seconds[-2] < 1.0 + 5e-5
    assert result.step == len(records) and result.train_seconds == pytest.approx(seconds[-1], abs=1e-3)
    config = json.loads((run / "config.json").read_text())
    assert config["time_budget"] == 1.0 and config["train_seconds"] >= 1.0
    # The cosine ran over the budget's seconds: the learning rate ends near its floor.
    lrs = [r["lr"] for r in records]
    assert max(lrs) == pytest.approx(cfg.lr) and lrs[-1] < 0.3 * cfg.lr and lrs[-1] >= cfg.lr * cfg.min_lr_ratio
    assert not math.isnan(records[-1]["loss"])


_CHILD = """
import os, sys, signal
sys.path.insert(0, {tests!r})
import haed.checkpoint as checkpoint
from haed.recipe import debug_recipe
from haed.train import train

kill_in_write = int(os.environ.get("KILL_IN_WRITE", "0"))
if kill_in_write:
    real_save, calls = checkpoint.save_file, []
    def save_file(weights, path):
        calls.append(path)
        real_save(weights, path)
        if len(calls) == kill_in_write:  # weights written, manifest and rename not yet
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save_file = save_file
recipe = debug_recipe({dataset!r})
recipe.full.steps, recipe.full.ckpt_every, recipe.full.eval_every = 12, 1, 3
resume = os.path.exists(os.path.join({run!r}, "config.json"))
train(None if resume else recipe, "full", {run!r}, resume=resume,
      on_event=lambda e: print(e["event"], e.get("step", ""), flush=True))
"""


def test_kill_9_at_any_moment_then_resume_gives_the_uninterrupted_weights(dataset, tmp_path):
    import subprocess
    import sys

    recipe = debug_recipe(str(dataset))
    recipe.full.steps, recipe.full.ckpt_every, recipe.full.eval_every = 12, 1, 3
    with single_thread():  # as the children run: one thread, on the CPU
        train(recipe, "full", tmp_path / "straight")
    run = tmp_path / "run"
    script = _CHILD.format(tests=str(Path(__file__).parent), dataset=str(dataset), run=str(run))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # Killed inside a checkpoint write (the 3rd), then after the 7th step's log line, then left to finish.
    first = subprocess.run([sys.executable, "-c", script], env={**env, "KILL_IN_WRITE": "3"}, capture_output=True)
    assert first.returncode == -signal.SIGKILL
    assert [p.name for p in step_dirs(run)] == ["step-000001", "step-000002"]
    second = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    for line in second.stdout:
        if line.split() == ["log", "7"]:
            second.kill()
            break
    second.wait()
    assert second.returncode == -signal.SIGKILL
    third = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr
    assert latest_checkpoint(run).name == "step-000012" and not list(run.glob(".*.tmp"))
    a, b = _weights(tmp_path / "straight"), _weights(run)
    assert all(torch.equal(a[n], b[n]) for n in a)

    def train_losses(r):
        return [(m["step"], m["loss"]) for m in read_metrics(r / "metrics.jsonl") if m["split"] == "train"]

    assert train_losses(run) == train_losses(tmp_path / "straight")
