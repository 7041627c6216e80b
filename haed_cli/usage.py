"""Usage errors (a bad option value, an unknown command or option, a missing argument) in haed's own
format: one `error:` line naming the problem and where help is, exit status 2, instead of the command
line library's boxed usage panel."""

from __future__ import annotations

import sys

import typer

try:  # typer >= 0.16 carries its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer over click
    from click import exceptions as click_exceptions

from haed_cli.common import Group, print_error

_NO_ARGS_IS_HELP = getattr(click_exceptions, "NoArgsIsHelpError", ())


def usage_message(e) -> str:
    """One line for a usage error: its message, lower-cased at the start, and the help command."""
    text = " ".join(e.format_message().split()).rstrip(".")
    if text[:1].isupper() and text[1:2].islower():
        text = text[0].lower() + text[1:]
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else "haed"
    return f"{text} (see `{where} --help`)"


class HaedGroup(Group):
    """The `haed` command group: as typer's (with common.Group's help), but a usage error is one `error:`
    line with exit status 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        run = super().main
        if not standalone_mode:
            return run(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        try:
            rv = run(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as e:  # `haed` alone, `haed prepare` alone: the help, as before
            e.show()
            sys.exit(e.exit_code)
        except click_exceptions.ClickException as e:
            print_error(usage_message(e) if isinstance(e, click_exceptions.UsageError) else e.format_message())
            sys.exit(e.exit_code)
        except typer.Abort:
            print_error("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)  # a command's exit status (typer.Exit), else success
