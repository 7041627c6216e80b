"""The training, evaluation and sampling commands end to end on a tiny recipe (CPU, seconds)."""

import json
import tomllib

import pytest
from _tiny import make_text_dataset
from typer.testing import CliRunner

from haed.recipe import debug_recipe
from haed_cli.main import app

runner = CliRunner()


def _write_recipe(path, dataset):
    recipe = debug_recipe(str(dataset)).to_dict()

    def toml(d, prefix=""):
        lines, tables = [], []
        for k, v in d.items():
            if isinstance(v, dict):
                tables.append((k, v))
            elif isinstance(v, str):
                lines.append(f'{k} = "{v}"')
            elif isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            else:
                lines.append(f"{k} = {v}")
        out = "\n".join(lines) + "\n"
        for k, v in tables:
            out += f"\n[{prefix}{k}]\n" + toml(v, f"{prefix}{k}.")
        return out

    path.write_text(toml(recipe))
    tomllib.loads(path.read_text())
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    dataset = make_text_dataset(root / "data")
    return root, _write_recipe(root / "debug.toml", dataset)


def _ok(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_iem_then_decoder_then_evaluate_then_generate(setup):
    root, recipe = setup
    run = root / "run"
    out = _ok(["train-iem", "--recipe", str(recipe), "--out", str(run), "--set", "main.layers=1", "--steps", "3"])
    assert "iem" in out and (run / "step-000003").is_dir()
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"]["model"]["main"]["layers"] == 1 and config["recipe"]["iem"]["steps"] == 3

    result = runner.invoke(app, ["evaluate", "--run", str(run)])
    assert result.exit_code == 1 and "train-decoder" in result.output  # IEM alone has no trained decoder

    _ok(["train-decoder", "--run", str(run), "--steps", "2"])
    assert (run / "decoder" / "step-000002").is_dir()

    out = _ok(["evaluate", "--run", str(run), "--split", "test", "--json", str(root / "eval.json")])
    result = json.loads((root / "eval.json").read_text())
    assert 0 < result["bits_per_byte"] < 9 and result["split"] == "test"
    assert "non-overlapping" in out

    result = runner.invoke(app, ["generate", "--run", str(run), "--prompt", "the cat", "--max-bytes", "20"])
    assert result.exit_code == 0 and result.stdout.startswith("the cat") and "bytes/s" in result.stderr
    _ok(
        [
            "generate",
            "--run",
            str(run),
            "--prompt",
            "the cat",
            "--max-bytes",
            "20",
            "--seed",
            "3",
            "--out",
            str(root / "a.txt"),
        ]
    )
    _ok(
        [
            "generate",
            "--run",
            str(run),
            "--prompt",
            "the cat",
            "--max-bytes",
            "20",
            "--seed",
            "3",
            "--out",
            str(root / "b.txt"),
            "--no-cuda-graphs",
        ]
    )  # the same fixed-shape steps, run eagerly (on a CPU they always are)
    assert (root / "a.txt").read_bytes() == (root / "b.txt").read_bytes()
    assert len((root / "a.txt").read_bytes()) == len(b"the cat") + 20


def test_full_and_flat_baselines_and_resume(setup):
    root, recipe = setup
    _ok(["train-full", "--recipe", str(recipe), "--out", str(root / "full"), "--steps", "2"])
    _ok(["train-full", "--recipe", str(recipe), "--arch", "flat", "--out", str(root / "flat"), "--steps", "2"])
    assert json.loads((root / "flat" / "config.json").read_text())["objective"] == "flat"
    _ok(["evaluate", "--run", str(root / "flat"), "--max-bytes", "100"])
    result = runner.invoke(app, ["train-full", "--recipe", str(recipe), "--out", str(root / "full"), "--steps", "2"])
    assert result.exit_code == 1 and "--resume" in result.output
    # Resuming takes the run's own recipe; a different value is refused unless allowed explicitly.
    result = runner.invoke(app, ["train-full", "--out", str(root / "full"), "--steps", "4", "--resume"])
    assert result.exit_code == 1 and "full.steps: 2 -> 4" in result.output and "--allow-changes" in result.output
    _ok(["train-full", "--out", str(root / "full"), "--steps", "4", "--resume", "--allow-changes"])
    assert (root / "full" / "step-000004").is_dir()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train-iem", "--recipe", "no-such-recipe"], "no recipe"),
        (["train-iem", "--recipe", "tiny", "--dataset", "/nonexistent/data"], "dataset not found"),
        (["train-iem", "--recipe", "tiny", "--set", "main.no_such_field=3"], "unknown recipe field"),
        (["train-iem", "--recipe", "tiny", "--set", "model.patch_size=3"], "multiple of model.patch_size"),
        (["train-iem", "--recipe", "tiny", "--set", "iem.recompute=main,head"], "iem.recompute names unknown stacks"),
        (["evaluate", "--run", "/nonexistent/run"], "not a haed run directory"),
        (["train-decoder", "--run", "/nonexistent/run"], "not a haed run directory"),
    ],
)
def test_bad_input_is_one_clear_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_help_lists_working_commands():
    out = _ok(["--help"])
    for command in ("prepare", "train-iem", "train-decoder", "train-full", "evaluate", "generate", "quickstart"):
        assert command in out
    for command in ("train-iem", "train-decoder", "evaluate", "generate", "quickstart"):
        assert "Example" in _ok([command, "--help"])


def test_quickstart_pipeline_runs_and_skips_finished_steps(tmp_path):
    from haed.pipeline import quickstart

    recipe = debug_recipe()
    recipe.name = "debug"
    first = quickstart(tmp_path, recipe, prompt=b"def ")
    assert (tmp_path / "data" / "stdlib" / "meta.json").is_file()
    assert (tmp_path / "runs" / "debug" / "decoder" / "step-000004").is_dir()
    assert 0 < first.evaluation["bits_per_byte"] < 9 and first.evaluation["split"] == "test"
    assert len(first.sample.output) == recipe.generate.max_bytes
    second = quickstart(tmp_path, recipe, prompt=b"def ")  # everything finished: nothing retrained
    assert second.evaluation["bits_per_byte"] == first.evaluation["bits_per_byte"]
    assert second.sample.output == first.sample.output
