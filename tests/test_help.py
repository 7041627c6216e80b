"""`haed <command> --help` reads like a person wrote it, for every command and `haed prepare` sub-command:
metavars say what to type (PATH, N, SECONDS), never Typer's type labels (<list[Path]>, <bool>, <str>);
boolean flags show both forms (--compile/--no-compile); a command with more than eight options groups
them in panels."""

import re

import pytest
import typer.main
from typer.testing import CliRunner

from haed_cli.main import app

TYPE_LABEL = re.compile(r"<[a-z]+(\[[^\]]*\])?>", re.IGNORECASE)  # <str>, <bool>, <list[Path]>, <path>


def _commands(command, path=()):
    """(path, click command) for every leaf command under `command`."""
    children = getattr(command, "commands", None)
    if children is None:
        return [(path, command)]
    return [leaf for name, child in children.items() for leaf in _commands(child, (*path, name))]


COMMANDS = _commands(typer.main.get_command(app))
ALL_PATHS = [(), ("prepare",), *[path for path, _ in COMMANDS]]


def test_every_command_is_checked():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"train-iem", "evaluate", "generate", "compare", "profile-memory", "prepare audio"} <= names


@pytest.mark.parametrize("path", ALL_PATHS, ids=lambda p: " ".join(p) or "haed")
def test_help_shows_no_type_labels(path):
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert not TYPE_LABEL.search(result.output), TYPE_LABEL.findall(result.output)


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_options_say_what_to_type_and_are_grouped(path, command):
    options = [p for p in command.params if p.param_type_name == "option"]
    for param in options:
        name = param.opts[0]
        if param.is_flag:
            assert param.secondary_opts, f"{name}: a flag shows both forms, e.g. --compile/--no-compile"
        else:
            assert param.metavar, f"{name} has no metavar saying what to type"
    for param in command.params:
        if param.param_type_name == "argument":
            assert param.metavar, f"argument {param.name} has no metavar"
    if len(options) > 8:
        ungrouped = [p.opts[0] for p in options if not getattr(p, "rich_help_panel", None)]
        assert not ungrouped, f"{' '.join(path)} has {len(options)} options; these are in no panel: {ungrouped}"
