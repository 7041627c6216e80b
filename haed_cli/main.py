"""The `haed` command: a thin Typer shell over the library in `haed/`. Each command declares its options as
`Annotated` aliases just above its function; the training commands and `haed compare` share theirs (training.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from haed import __version__
from haed_cli.usage import HaedGroup

app = typer.Typer(
    name="haed",
    cls=HaedGroup,  # usage errors as one `error:` line, exit status 2
    help="Train and sample hierarchical (HAED) byte models of text and raw audio, with IEM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    epilog=(
        "Examples:\n\n"
        "haed quickstart\n\n"
        "haed prepare stdlib --out data/stdlib\n\n"
        "haed train-iem --recipe tiny --dataset data/stdlib --out runs/tiny\n\n"
        "haed train-decoder --run runs/tiny\n\n"
        "haed evaluate --run runs/tiny --split test\n\n"
        'haed generate --run runs/tiny --prompt "def " --max-bytes 300\n\n'
        "haed compare --recipe tiny --dataset data/stdlib --time-budget 120\n\n"
        "haed profile-memory --recipe enwik8 --compare-full"
    ),
)


def _version(value: bool):
    if value:
        typer.echo(f"haed {__version__}")
        raise typer.Exit()


Version = Annotated[
    bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
]


@app.callback()
def main(
    version: Version = False,
):
    """Train and sample hierarchical (HAED) byte models of text and raw audio, with IEM."""


from haed_cli import commands, prepare, profile, training  # noqa: E402  (after `app`: each registers its commands)

for _module in (prepare, training, commands, profile):
    _module.register(app)

if __name__ == "__main__":
    app()
