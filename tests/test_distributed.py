"""Training under torchrun with 2 CPU processes (gloo), as users launch it, on the tiny debug recipe.

- 2 ranks give the losses of 1 process on the same global batch (full training, and IEM with the
  candidates of the global batch);
- a 2-rank run killed between checkpoints and resumed ends with the weights of an uninterrupted one;
- checkpoints move between world sizes (2 ranks -> 1 process -> evaluate, and 1 process -> 2 ranks);
- the shards of a checkpoint load without executing anything stored in them.
"""

import contextlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _tiny import make_text_dataset, write_recipe_toml
from conftest import CliResult, single_thread
from safetensors.torch import load_file
from typer.testing import CliRunner

from haed.checkpoint import checkpoint_problem, latest_checkpoint
from haed.data import random_windows
from haed.distributed import World, global_candidates, is_main_process
from haed.errors import HaedError
from haed.model import build_model, unique_patches
from haed.recipe import debug_recipe, load_recipe
from haed.runs import read_metrics
from haed.shard_reader import is_sharded
from haed.steps import make_optimizer
from haed.train import train
from haed_cli.main import app

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
B = 2  # windows per rank and micro-batch; the 1-process runs take 2 x B


def torchrun(*args, cpu: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ARGS` with this checkout importable (on CPU: gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "COLUMNS": "250"}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def losses(run: Path) -> dict:
    return {(r["step"], r["split"]): r for r in read_metrics(run / "metrics.jsonl")}


def weights(run: Path) -> dict:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def one_process(root: Path, path: Path, objective: str, name: str, **kwargs) -> Path:
    """The recipe's run in this process with the whole global batch: 2 x batch_size windows per micro-batch.

    On the CPU it runs with one thread, as each rank does (torchrun's OMP_NUM_THREADS=1), so that the two
    layouts differ only in how the batch is split. (On this project's 2-core machine, 1 and 16 threads gave
    the same losses to the last digit; an H200 host's failure of the comparison was its reference running
    on the GPU, 5.469629 against the CPU's 5.470313 at step 2: conftest keeps CUDA from CPU tests.)"""
    batch_size = getattr(load_recipe(str(path)), objective).batch_size
    recipe = load_recipe(str(path), [f"{objective}.batch_size={2 * batch_size}"])
    with single_thread() if kwargs.get("device", "cpu") == "cpu" else contextlib.nullcontext():
        train(recipe, objective, root / name, **{"device": "cpu", **kwargs})
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run the tests look at: 1-process references here, and two torchrun launches.

    The first launch runs, in the same two processes, `haed train-iem` and `haed train-full`, IEM with
    per-rank candidates, the 2-rank resume of a 1-process checkpoint, and then an IEM run whose
    rank 0 dies after logging step 3 (its last checkpoint is step 2). The second launch is
    `torchrun -m haed_cli.main -- train-iem --resume` of a copy of that killed run.
    """
    root = tmp_path_factory.mktemp("distributed")
    recipe = debug_recipe(str(make_text_dataset(root / "words")))
    recipe.iem.steps = recipe.full.steps = 4
    recipe.iem.batch_size = recipe.full.batch_size = B
    recipe.full.grad_accum = 2
    recipe.decoder.steps = 2
    path = write_recipe_toml(root / "debug.toml", recipe)
    r = {name: root / name for name in ("iem-2", "full-2", "iem-local", "iem-killed", "iem-killed-resumed")}
    r["iem-1"] = one_process(root, path, "iem", "iem-1")
    r["full-1"] = one_process(root, path, "full", "full-1")
    r["iem-1-then-2"] = one_process(root, path, "iem", "iem-1-then-2", stop_after=2)
    plan = {
        "commands": [
            ["train-iem", "--recipe", str(path), "--out", str(r["iem-2"])],
            ["train-full", "--recipe", str(path), "--out", str(r["full-2"])],
            [
                "train-iem",
                "--recipe",
                str(path),
                "--out",
                str(r["iem-local"]),
                "--steps",
                "1",
                "--set",
                "iem.candidates=local",
                "--set",
                "iem.compile_mode=reduce-overhead",
                "--set",
                "iem.fixed_shapes=true",
            ],
            ["train-iem", "--out", str(r["iem-1-then-2"]), "--resume", "--allow-changes", "--batch-size", str(B)],
        ],
        "crash": {"recipe": str(path), "objective": "iem", "run": str(r["iem-killed"]), "after_step": 3},
    }
    (root / "plan.json").write_text(json.dumps(plan))
    first = torchrun(str(TESTS / "_torchrun_commands.py"), str(root / "plan.json"))
    assert re.search(r"exitcode\s*:\s*9\b", first.stderr), (first.stdout + first.stderr)[-4000:]  # rank 0's crash
    shutil.copytree(r["iem-killed"], r["iem-killed-resumed"])  # the killed run itself stays for another test
    resumed = ok(torchrun("-m", "haed_cli.main", "--", "train-iem", "--out", str(r["iem-killed-resumed"]), "--resume"))
    return {"root": root, "recipe": recipe, "path": path, "first": first.stdout, "resumed": resumed, **r}


@pytest.mark.parametrize("objective", ["full", "iem"])
def test_two_ranks_give_the_losses_of_one_process_on_the_global_batch(runs, objective):
    two, one = runs[f"{objective}-2"], runs[f"{objective}-1"]
    a, b = losses(two), losses(one)
    assert a.keys() == b.keys() and {(4, "train"), (4, "valid")} <= a.keys()
    for key in a:
        assert a[key]["loss"] == pytest.approx(b[key]["loss"], rel=1e-5, abs=1e-6), key
        if objective == "iem":  # the distinct patches of the global batch, on both ranks
            assert a[key]["candidates"] == b[key]["candidates"], key
            assert a[key]["patch_accuracy"] == pytest.approx(b[key]["patch_accuracy"], abs=1e-6), key
    wa, wb = weights(two), weights(one)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wb)
    config = json.loads((two / "config.json").read_text())
    accum = 2 if objective == "full" else 1
    assert config["global_batch"] == {
        "windows": 2 * B * accum,
        "bytes": 2 * B * accum * 64,
        "batch_size": B,
        "grad_accum": accum,
        "world_size": 2,
    }
    checkpoint = latest_checkpoint(two)
    assert is_sharded(checkpoint) and checkpoint_problem(checkpoint) is None
    files = set(json.loads((checkpoint / "manifest.json").read_text())["files"])
    assert {"dcp/.metadata", "model.safetensors", "rng/rank-00000.pt", "rng/rank-00001.pt"} <= files
    # The whole weights are gathered into the last step checkpoint (and best/) only, not into earlier ones.
    earlier = set(json.loads((two / "step-000002" / "manifest.json").read_text())["files"])
    assert "dcp/.metadata" in earlier and "model.safetensors" not in earlier
    assert (two / "best" / "model.safetensors").is_file() and not is_sharded(two / "best")
    assert not is_sharded(latest_checkpoint(one))
    assert not list(two.glob(".*.tmp"))
    assert "step 4" in runs["first"]  # rank 0 reports


def test_per_rank_candidates_are_fewer_than_global_ones(runs):
    local = losses(runs["iem-local"])[(1, "train")]["candidates"]
    assert local < losses(runs["iem-2"])[(1, "train")]["candidates"]


def test_a_recipe_asking_for_cuda_graphs_trains_under_torchrun_in_the_default_mode(runs):
    """CUDA graphs (and IEM's fixed shapes) train in one process only: the same recipe under torchrun trains, says
    so in one line each, and its run records the recipe it was given (a one-process resume keeps the graphs)."""
    assert (
        "iem.compile_mode = 'reduce-overhead' (CUDA graphs) trains in one process only: these 2 processes take "
        "torch.compile's default mode" in runs["first"]
    )
    assert (
        "iem.fixed_shapes = true trains in one process only: these 2 processes count their distinct patches on the "
        "host" in runs["first"]
    )
    config = json.loads((runs["iem-local"] / "config.json").read_text())
    assert config["recipe"]["iem"]["compile_mode"] == "reduce-overhead"
    assert config["compiled"] is False and config["compile_mode"] is None  # on CPUs nothing compiles
    assert losses(runs["iem-local"])[(1, "train")]["loss"] > 0


def test_a_killed_two_rank_run_resumes_to_the_weights_of_an_uninterrupted_one(runs):
    killed, resumed, straight = runs["iem-killed"], runs["iem-killed-resumed"], runs["iem-2"]
    assert latest_checkpoint(killed).name == "step-000002" and (3, "train") in losses(killed)
    assert "from step 2" in runs["resumed"]
    a, b = weights(resumed), weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert [r["loss"] for r in read_metrics(resumed / "metrics.jsonl")] == [
        r["loss"] for r in read_metrics(straight / "metrics.jsonl")
    ]


def test_a_two_rank_checkpoint_resumes_on_one_process_and_is_evaluated(runs):
    run = runs["root"] / "iem-killed-on-one"
    shutil.copytree(runs["iem-killed"], run)
    # The 2-rank step-2 checkpoint on one process with the same global batch: the 1-process run's steps.
    whole = load_recipe(str(runs["path"]), [f"iem.batch_size={2 * B}"])
    with single_thread():
        result = train(whole, "iem", run, resume=True, allow_changes=True, device="cpu")
    assert result.step == 4 and not is_sharded(latest_checkpoint(run))
    a, b = losses(run), losses(runs["iem-1"])
    for key in [(3, "train"), (4, "train"), (4, "valid")]:
        assert a[key]["loss"] == pytest.approx(b[key]["loss"], rel=1e-5), key
    wa, wb = weights(run), weights(runs["iem-1"])
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wb)
    cli = CliRunner()
    done = cli.invoke(app, ["train-decoder", "--run", str(run)])
    assert done.exit_code == 0, done.output
    out = runs["root"] / "killed-on-one.json"
    evaluated = cli.invoke(app, ["evaluate", "--run", str(run), "--split", "test", "--json", str(out)])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(out.read_text())["bits_per_byte"] > 0


@pytest.mark.parametrize("checkpoint", ["best", "step-000002"])
def test_haed_evaluate_and_generate_read_a_two_rank_checkpoint(runs, checkpoint):
    """best/ holds the whole weights; step-000002, not the run's last, holds only shards, which evaluate and
    generate read in one process."""
    cli, bits = CliRunner(), {}
    for name in ("full-2", "full-1"):
        out = runs["root"] / f"{name}-{checkpoint}.json"
        args = ["evaluate", "--run", str(runs[name]), "--split", "test", "--json", str(out), "--device", "cpu"]
        result = cli.invoke(app, [*args, "--checkpoint", checkpoint])
        assert result.exit_code == 0, result.output
        bits[name] = json.loads(out.read_text())["bits_per_byte"]
    assert bits["full-2"] == pytest.approx(bits["full-1"], rel=1e-5)
    sample = [
        "generate",
        "--run",
        str(runs["full-2"]),
        "--checkpoint",
        checkpoint,
        "--prompt",
        "the",
        "--device",
        "cpu",
    ]
    generated = CliResult(cli.invoke(app, [*sample, "--max-bytes", "8"]))
    assert generated.exit_code == 0 and generated.stdout.startswith("the"), (generated.stdout, generated.stderr)
    assert checkpoint in generated.stderr


def test_a_one_process_checkpoint_resumes_on_two_ranks(runs):
    run = runs["iem-1-then-2"]
    assert "written by 1 process, this run has 2" in runs["first"]
    assert is_sharded(latest_checkpoint(run))
    a, b = losses(run), losses(runs["iem-1"])
    for key in [(3, "train"), (4, "train"), (4, "valid")]:
        assert a[key]["loss"] == pytest.approx(b[key]["loss"], rel=1e-5), key
    wa, wb = weights(run), weights(runs["iem-1"])
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wb)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_shards_load_without_executing_stored_code(runs, tmp_path):
    checkpoint = tmp_path / "step"
    shutil.copytree(latest_checkpoint(runs["iem-2"]), checkpoint)
    marker = tmp_path / "executed"
    (checkpoint / "dcp" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    recipe = runs["recipe"]
    model = build_model(recipe.model)
    optimizer = make_optimizer(list(model.parameters()), recipe.iem, torch.device("cpu"))
    with pytest.raises(HaedError, match="refusing to load"):
        World(device=torch.device("cpu")).load_training_state(checkpoint, model, optimizer)
    assert not marker.exists()


def test_a_world_of_one_changes_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert is_main_process()
    world = World(device=torch.device("cpu"))
    data = np.arange(1000, dtype=np.uint8)
    assert np.array_equal(
        world.windows(data, 3, 16, np.random.default_rng(5)), random_windows(data, 3, 16, np.random.default_rng(5))
    )
    sums = {"loss": torch.tensor(1.5)}
    assert world.reduce_step(sums, torch.tensor(2.0))[0] is sums and world.agree(3.25) == 3.25
    uniq, inverse, counts = unique_patches(torch.randint(0, 4, (40, 4), dtype=torch.uint8))
    vectors = torch.randn(uniq.shape[0], 8)
    assert all(
        a is b for a, b in zip(global_candidates(uniq, vectors, counts, inverse), (uniq, vectors, counts, inverse))
    )
    with pytest.raises(HaedError, match="global"):
        global_candidates(uniq, vectors, counts, inverse, "everywhere")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()


@pytest.mark.parametrize(
    "args", [["compare", "--time-budget", "1", "--out", "cmp", "--device", "cpu"], ["quickstart", "--device", "cpu"]]
)
def test_compare_and_quickstart_under_torchrun_refuse_in_one_line(args, tmp_path, monkeypatch):
    """Each trains one run after another in one process: under torchrun (here rank 0 of 2, as torchrun sets
    the environment) every rank would run all of it, so it says so and exits before anything is written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = CliResult(CliRunner().invoke(app, args))
    assert result.exit_code == 1, result.stdout
    assert result.error_lines() == [
        f"error: haed {args[0]} runs in one process, not under torchrun (2 processes): run `haed {args[0]} ...` "
        "without torchrun (only the train-* commands take several processes)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_ranks_take_blocks_of_one_global_draw():
    data = np.arange(5000, dtype=np.uint8)
    blocks = [
        World(device=torch.device("cpu"), rank=r, size=3).windows(data, 2, 8, np.random.default_rng(1))
        for r in range(3)
    ]
    assert np.array_equal(np.concatenate(blocks), random_windows(data, 6, 8, np.random.default_rng(1)))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_with_nccl_follow_one_gpu(tmp_path):
    """The same checks on GPUs: NCCL, bf16 FSDP2 (so losses agree to bf16 precision, not exactly),
    a compiled run, and a 2-GPU checkpoint resumed on one GPU."""
    recipe = debug_recipe(str(make_text_dataset(tmp_path / "words")))
    recipe.iem.steps = recipe.full.steps = 4
    recipe.iem.batch_size = recipe.full.batch_size = B
    path = write_recipe_toml(tmp_path / "debug.toml", recipe)
    for objective in ("iem", "full"):
        one_process(tmp_path, path, objective, f"{objective}-1", device="cuda")
    plan = {
        "commands": [
            ["train-iem", "--recipe", str(path), "--out", str(tmp_path / "iem-2")],
            ["train-full", "--recipe", str(path), "--out", str(tmp_path / "full-2")],
            [
                "train-iem",
                "--recipe",
                str(path),
                "--out",
                str(tmp_path / "iem-2-compiled"),
                "--set",
                "iem.compile=true",
            ],
        ]
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    ok(torchrun(str(TESTS / "_torchrun_commands.py"), str(tmp_path / "plan.json"), cpu=False))
    for two, one in (("iem-2", "iem-1"), ("full-2", "full-1"), ("iem-2-compiled", "iem-1")):
        a, b = losses(tmp_path / two), losses(tmp_path / one)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key]["loss"] == pytest.approx(b[key]["loss"], rel=2e-2), (two, key)
        assert is_sharded(latest_checkpoint(tmp_path / two))
    shutil.rmtree(tmp_path / "iem-2" / "step-000004")
    recipe = load_recipe(str(path), [f"iem.batch_size={2 * B}"])
    train(recipe, "iem", tmp_path / "iem-2", resume=True, allow_changes=True, device="cuda")
    assert losses(tmp_path / "iem-2")[(4, "train")]["loss"] == pytest.approx(
        losses(tmp_path / "iem-1")[(4, "train")]["loss"], rel=2e-2
    )
