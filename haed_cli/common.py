"""Shared CLI plumbing: one console, one way to turn a HaedError into a clean exit, warnings as one line,
and the display of training progress."""

from __future__ import annotations

import functools
import sys
import time
import warnings

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from haed.distributed import is_main_process
from haed.errors import HaedError, HaedWarning

OFF_TERMINAL_WIDTH = 10_000  # columns: no table or line of haed's comes near it
RULE_WIDTH = 80


class WholeConsole(Console):
    """A rich console that, off a terminal (a pipe, a file, a CI log), prints every table and line whole.

    There rich takes 80 columns (or a terminal's width found on another stream), shrinks tables to fit
    them and cuts cells to `…` (`paramete…`, `2,0…`). Off a terminal this console is as wide as what it
    prints: tables take their natural width, lines are not wrapped. On a terminal nothing changes.
    """

    def _size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self.is_terminal or self._width is not None:
            return size
        return ConsoleDimensions(OFF_TERMINAL_WIDTH, size.height)

    size = property(_size, Console.size.fset)

    def rule(self, title="", **kwargs) -> None:
        """A rule as wide as the terminal, or RULE_WIDTH columns off one."""
        from rich.rule import Rule

        self.print(Rule(title, **kwargs), width=None if self.is_terminal else min(self.width, RULE_WIDTH))


console = WholeConsole(quiet=not is_main_process())  # under torchrun only rank 0 prints progress and results
err_console = WholeConsole(stderr=True)


class _HelpSaysWhatToType:
    """--help that says what to type: every option and argument declares its metavar (PATH, N, SECONDS,
    FIELD=VALUE), which Typer shows for an option; an argument's metavar is its name, so the type Typer would
    print beside it (`<list[Path]>`) is left out; and a flag (--compile/--no-compile, --help itself) shows
    none, where Typer would print `<bool>`."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
            if param.param_type_name == "argument" and param.metavar and hasattr(param, "display_type_rich"):
                param.display_type_rich = lambda ctx=None: None
        return params


class Command(_HelpSaysWhatToType, TyperCommand):
    """Every haed command: `app.command(name, cls=Command)`."""


class Group(_HelpSaysWhatToType, TyperGroup):
    """`haed` and `haed prepare`: `typer.Typer(cls=Group)`."""


def print_error(message: str) -> None:
    """The one `error:` line on stderr."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> None:
    print_error(message)
    raise typer.Exit(code)


def user_errors(fn):
    """Run a command body; a HaedError (bad input) becomes one line on stderr and its exit status (1, or
    75 for training stopped by a failed write: `haed.errors.RunStopped`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HaedError as e:
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(130)

    return wrapper


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, HaedWarning):
        err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning
warnings.showwarning = _show_warning


def _format_rate(bytes_per_second: float) -> str:
    if bytes_per_second >= 1e6:
        return f"{bytes_per_second / 1e6:.2f} MB/s"
    return f"{bytes_per_second / 1e3:.1f} kB/s"


def _format_metrics(record: dict) -> str:
    skip = ("event", "step", "split", "candidates", "train_seconds", "lr", "grad_norm", "bytes_per_second")
    return ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in skip and isinstance(v, (int, float)))


class TrainingDisplay:
    """Renders the trainer's events: a live bar on a terminal, one plain line per log interval otherwise.

    Use as a context manager and pass it as `on_event`.
    """

    def __init__(self, out: Console = console):
        self.console = out
        self.live = out.is_terminal
        self.progress = None
        self.task = None
        self.unit = "steps"
        self.total = 0.0
        self.started = time.perf_counter()
        self.completed_at_start = 0.0

    def __enter__(self) -> "TrainingDisplay":
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def _say(self, text: str) -> None:
        (self.progress.console if self.progress is not None else self.console).print(text, highlight=False)

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            self.unit, self.total = event["unit"], float(event["total"])
            self.started, self.completed_at_start = time.perf_counter(), float(event["completed"])
            self._say(f"[bold]{event['objective']}[/] training into {escape(event['run_dir'])}")
            self._say("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in event["parameters"].items()))
            if self.live:
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

                self.progress = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    TextColumn("{task.fields[done]}"),
                    TextColumn("loss {task.fields[loss]}"),
                    TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(),
                    TextColumn("ETA"),
                    TimeRemainingColumn(),
                    console=self.console,
                )
                self.progress.start()
                self.task = self.progress.add_task(
                    event["objective"], total=self.total, completed=event["completed"], loss="-", rate="", done=""
                )
        elif kind == "progress" and self.progress is not None:
            done = event["completed"]
            label = f"{done:.1f}/{self.total:g} s" if self.unit == "seconds" else f"{done}/{self.total:.0f}"
            self.progress.update(self.task, completed=done, done=label)
        elif kind == "log":
            if self.progress is not None:
                self.progress.update(
                    self.task, loss=f"{event['loss']:.4f}", rate=_format_rate(event["bytes_per_second"])
                )
            else:
                self._say(self._plain_line(event))
        elif kind == "valid":
            self._say(f"step {event['step']} valid: {_format_metrics(event)}")
        elif kind == "best" and not self.live:
            self._say(
                f"step {event['step']}: best {event['metric']} so far ({event['value']:.4f}) kept in {event['path']}"
            )
        elif kind == "message":
            self._say(event["text"])
        elif kind == "end":
            self.__exit__()

    def _plain_line(self, event: dict) -> str:
        done = event["train_seconds"] if self.unit == "seconds" else event["step"]
        fraction = (done - self.completed_at_start) / max(self.total - self.completed_at_start, 1e-9)
        elapsed = time.perf_counter() - self.started
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
        where = (
            f"{event['train_seconds']:.1f}/{self.total:g} s"
            if self.unit == "seconds"
            else f"{event['step']}/{self.total:.0f}"
        )
        return (
            f"step {event['step']} ({where}): loss {event['loss']:.4f}, {_format_rate(event['bytes_per_second'])}, "
            f"ETA {eta:.0f} s"
        )


class TaskDisplay:
    """Renders a sweep's events ("start", "task", "done", "end"): a live bar on a terminal, the result
    line of each finished task either way. Use as a context manager and pass it as `on_event`."""

    def __init__(self, out: Console = console):
        self.console = out
        self.progress = None
        self.task = None

    def __enter__(self) -> "TaskDisplay":
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start" and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task(event["label"], total=event["total"])
        elif kind == "task" and self.progress is not None:
            self.progress.update(self.task, description=event["label"])
        elif kind == "done":
            (self.progress.console if self.progress is not None else self.console).print(event["text"], highlight=False)
            if self.progress is not None:
                self.progress.advance(self.task)
        elif kind == "end":
            self.__exit__()
