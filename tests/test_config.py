"""Recipes: built-in ones shipped as package data, every field type- and range-checked, typed CLI
options set as values (never re-parsed as TOML)."""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.resources
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from _tiny import make_text_dataset
from conftest import CliResult
from typer.testing import CliRunner

from haed.config import DataConfig, GenerateConfig, ModelConfig, StackConfig, TrainConfig, check_fields, field_types
from haed.errors import HaedError
from haed.recipe import RECIPES_DIR, Recipe, load_recipe, recipe_from_dict
from haed_cli.main import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_builtin_recipes_are_package_data():
    recipes = importlib.resources.files("haed") / "recipes"
    assert sorted(p.name for p in recipes.iterdir() if p.name.endswith(".toml")) == [
        "code.toml",
        "enwik8.toml",
        "music.toml",
        "speech.toml",
        "tiny.toml",
    ]
    assert Path(str(recipes)) == RECIPES_DIR
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["haed"]
    for path in RECIPES_DIR.iterdir():  # every file there is shipped by a non-editable install
        assert any(fnmatch.fnmatch(f"recipes/{path.name}", pattern) for pattern in package_data), path.name


def test_builtin_recipe_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("tiny", "enwik8", "speech", "code", "music"):
        assert load_recipe(name).name == name


def test_every_field_has_a_checked_type():
    for cls in (Recipe, DataConfig, ModelConfig, StackConfig, TrainConfig, GenerateConfig):
        for name, kind in field_types(cls).items():
            assert kind in (int, float, bool, str) or dataclasses.is_dataclass(kind), f"{cls.__name__}.{name}: {kind}"


def test_types_are_checked_from_the_annotations():
    recipe = recipe_from_dict({"iem": {"lr": 1, "tau": 2}})
    assert type(recipe.iem.lr) is float and recipe.iem.lr == 1.0  # a float field accepts an int
    for values, message in [
        ({"iem": {"steps": True}}, "iem.steps must be an integer"),  # bool is not an int
        ({"iem": {"steps": 2.5}}, "iem.steps must be an integer"),
        ({"iem": {"logq": 1}}, "iem.logq must be true or false"),
        ({"data": {"dataset": 3}}, "data.dataset must be a string"),
        ({"iem": {"lr": "fast"}}, "iem.lr must be a finite number"),
    ]:
        with pytest.raises(HaedError, match=message):
            recipe_from_dict(values)

    @dataclass
    class Later:  # a field added later is checked with no other change
        budget: float = 0.0
        keep: int = 1

    check_fields(Later(budget=3))
    with pytest.raises(HaedError, match="phase.budget must be a finite number, not 'soon'"):
        check_fields(Later(budget="soon"), "phase.")


def test_set_of_a_string_field_keeps_the_text():
    assert load_recipe("tiny", ["data.dataset=2024"]).data.dataset == "2024"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_text_dataset(tmp_path_factory.mktemp("data") / "words")


@pytest.mark.parametrize(
    "args, field",
    [
        (["--set", "main.layers=abc"], "model.main.layers"),
        (["--set", "main.heads=0"], "model.main.heads"),
        (["--set", "encoder.dim=-8"], "model.encoder.dim"),
        (["--set", "heads=0"], "heads"),
        (["--set", "dim=-8"], "dim"),
        (["--steps", "0"], "iem.steps"),
        (["--steps", "-3"], "iem.steps"),
        (["--batch-size", "0"], "iem.batch_size"),
        (["--set", "main.recompute=1"], "model.main.recompute"),
        (["--set", "iem.lr=0"], "iem.lr"),
        (["--set", "main.dropout=1"], "model.main.dropout"),
        (["--set", "iem.min_lr_ratio=1.5"], "iem.min_lr_ratio"),
        (["--set", "iem.logits_chunk=0"], "iem.logits_chunk"),
        (["--set", "iem.eval_every=-1"], "iem.eval_every"),
    ],
)
def test_bad_value_is_one_line_naming_the_field(args, field, dataset, tmp_path):
    run = tmp_path / "run"
    small = [
        "--set",
        "iem.steps=2",
        "--set",
        "iem.batch_size=2",
        "--set",
        "iem.eval_batches=1",
    ]  # seconds, were it accepted
    result = CliResult(
        runner.invoke(
            app, ["train-iem", "--recipe", "tiny", "--dataset", str(dataset), "--out", str(run), *small, *args]
        )
    )
    assert result.exit_code == 1, result.stdout
    lines = result.error_lines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], lines
    assert "Traceback" not in result.stdout + result.stderr
    assert not run.exists()


def test_dataset_path_with_quote_and_backslash(tmp_path):
    odd = make_text_dataset(tmp_path / 'my "data" \\ here')
    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train-iem",
            "--recipe",
            "tiny",
            "--dataset",
            str(odd),
            "--out",
            str(run),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--set",
            "iem.eval_batches=1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["recipe"]["data"]["dataset"] == str(odd)


def test_a_recipe_from_before_the_rename_of_checkpoint_to_recompute_still_loads():
    from haed.recipe import Recipe, recipe_from_dict

    old = Recipe().to_dict()
    for stack in ("encoder", "main", "decoder"):
        old["model"][stack]["checkpoint"] = old["model"][stack].pop("recompute")
    old["model"]["main"]["checkpoint"] = True
    recipe = recipe_from_dict(old)
    assert recipe.model.main.recompute is True and recipe.model.encoder.recompute is False
