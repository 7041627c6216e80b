"""`haed prepare ...`: thin shells over haed.prepare that add progress bars and a summary table."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from haed_cli.common import Command, Group, console, user_errors

PREPARE_APP = dict(
    help=(
        "Turn enwik8, text files, the offline stdlib corpus or audio into a dataset directory "
        "(example: haed prepare stdlib --out data/stdlib)."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    epilog=(
        "Examples:\n\n"
        "  haed prepare stdlib --out data/stdlib\n\n"
        "  haed prepare enwik8 --out data/enwik8\n\n"
        "  haed prepare text notes/ book.txt --out data/notes\n\n"
        "  haed prepare audio ../shared/data/fsdd --out data/fsdd-8k --sample-rate 8000 --split-rule fsdd"
    ),
)

INCLUDE_HELP = (
    "Keep only files whose path inside the folder or archive (or whose name) matches this shell pattern, e.g. "
    "'*.c'; repeat for more."
)
EXCLUDE_HELP = "Leave out files whose path or name matches this shell pattern; repeat for more."
OUT_HELP = "Dataset directory to create (train.bin, valid.bin, test.bin, meta.json)."
FORCE_HELP = "Replace --out if it already holds a haed dataset (only after the new one is complete)."


class PlainProgress:
    """The part of rich's Progress that haed.prepare uses, as plain lines for logs: one line per task at
    most every `every` seconds, and one when it completes."""

    def __init__(self, every: float = 15.0):
        self.every, self.tasks = every, {}

    def add_task(self, description: str, total=None) -> int:
        self.tasks[len(self.tasks)] = {"description": description, "total": total, "done": 0, "said": time.monotonic()}
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, advance: float = 0, **_) -> None:
        t = self.tasks[task]
        t["done"] += advance
        now, total = time.monotonic(), t["total"]
        if now - t["said"] >= self.every or (total and t["done"] >= total and t["said"] != -1):
            t["said"] = -1 if total and t["done"] >= total else now
            of = f" of {total:,.0f} ({100 * t['done'] / total:.0f}%)" if total else ""
            console.print(f"{t['description']}: {t['done']:,.0f}{of}", highlight=False, markup=False)


@contextlib.contextmanager
def _progress(bytes_mode: bool):
    """A transient progress display on a terminal; plain lines every few seconds when output is redirected."""
    if not console.is_terminal:
        yield PlainProgress()
        return
    columns = [TextColumn("{task.description}"), BarColumn()]
    columns.append(DownloadColumn() if bytes_mode else MofNCompleteColumn())
    columns.append(TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as p:
        yield p


def _sha(meta: dict, s: str) -> str:
    return meta["splits"][s]["sha256"][:16]


def print_summary(meta: dict, out: Path) -> None:
    audio = meta["kind"] == "audio"
    table = Table(title=f"{meta['kind']} dataset written to {escape(str(out))}", title_justify="left")
    table.add_column("split")
    if audio:
        table.add_column("files", justify="right")
    table.add_column("bytes", justify="right")
    if audio:
        table.add_column("seconds", justify="right")
    table.add_column("sha256 (prefix)")
    for s in ("train", "valid", "test"):
        row = [s]
        if audio:
            row.append(f"{meta['file_counts'][s]:,}")
        row.append(f"{meta['splits'][s]['bytes']:,}")
        if audio:
            row.append(f"{meta['seconds'][s]:,.1f}")
        row.append(_sha(meta, s))
        table.add_row(*row)
    total = ["total"]
    if audio:
        total.append(f"{len(meta['files']):,}")
    total.append(f"{meta['total_bytes']:,}")
    if audio:
        total.append(f"{sum(meta['seconds'].values()):,.1f}")
    total.append("")
    table.add_row(*total, style="bold")
    console.print(table)
    console.print(f"source: {meta['source']['description']}", highlight=False, markup=False)
    if audio:
        console.print(
            f"audio: {meta['sample_rate']} Hz, {meta['encoding']}, split rule {meta['split_rule']['name']}",
            highlight=False,
        )
        if meta.get("skipped_count"):
            console.print(
                f"[yellow]skipped {meta['skipped_count']} unreadable file(s)[/] (listed in meta.json), e.g. "
                f"{escape(meta['skipped'][0]['name'])}",
                highlight=False,
            )
    elif "files" in meta:
        console.print(f"{len(meta['files']):,} file(s), concatenated in the order listed in meta.json", highlight=False)


Out = Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help=OUT_HELP)]
MaxBytes = Annotated[
    int,
    typer.Option("--max-bytes", metavar="N", help="Cap: the first N bytes of the concatenated sources (0: no cap)."),
]
ValidFraction = Annotated[
    float, typer.Option("--valid-fraction", metavar="F", help="Fraction of the bytes for valid (taken after train).")
]
TestFraction = Annotated[
    float, typer.Option("--test-fraction", metavar="F", help="Fraction of the bytes for test (the end of the stream).")
]
Force = Annotated[bool, typer.Option("--force/--no-force", help=FORCE_HELP)]


def stdlib(
    out: Out = ...,
    max_bytes: MaxBytes = 4_000_000,
    valid_fraction: ValidFraction = 0.05,
    test_fraction: TestFraction = 0.05,
    force: Force = False,
):
    """Make the offline default text corpus from the Python standard library's own .py files.

    The files are taken in sorted order (site-packages and test folders left out), concatenated, cut at --max-bytes
    and split at the end of the stream. Needs no network; the content depends on the Python version, which meta.json
    records.
    """
    from haed.prepare import prepare_stdlib

    with _progress(bytes_mode=True) as p:
        meta = prepare_stdlib(
            out,
            max_bytes=max_bytes,
            valid_fraction=valid_fraction,
            test_fraction=test_fraction,
            force=force,
            progress=p,
        )
    print_summary(meta, out)


Paths = Annotated[
    List[Path],
    typer.Argument(
        help="Files, folders (read recursively) and .tar archives (.tar, .tar.gz, .tar.bz2, .tar.xz).",
        show_default=False,
        metavar="PATH...",
    ),
]
Include = Annotated[List[str], typer.Option("--include", help=INCLUDE_HELP, metavar="PATTERN", show_default=False)]
Exclude = Annotated[List[str], typer.Option("--exclude", help=EXCLUDE_HELP, metavar="PATTERN", show_default=False)]
SplitRule = Annotated[
    str,
    typer.Option(
        "--split-rule",
        help="stream: the concatenation cut at its end (train, valid, test); hash: each whole file to one split by "
        "a hash of its path, so that no file is in two splits (test files are never trained on).",
        metavar="stream|hash",
    ),
]
TextMaxBytes = Annotated[
    int,
    typer.Option(
        "--max-bytes",
        help="Take files in order up to N bytes in all (the last one cut); 0: everything.",
        metavar="N",
    ),
]
TextValidFraction = Annotated[
    float,
    typer.Option("--valid-fraction", help="Fraction of the bytes (stream) or files (hash) for valid.", metavar="F"),
]
TextTestFraction = Annotated[
    float, typer.Option("--test-fraction", help="Fraction of the bytes (stream) or files (hash) for test.", metavar="F")
]


def text(
    paths: Paths = ...,
    out: Out = ...,
    include: Include = [],
    exclude: Exclude = [],
    split_rule: SplitRule = "stream",
    max_bytes: TextMaxBytes = 0,
    valid_fraction: TextValidFraction = 0.05,
    test_fraction: TextTestFraction = 0.05,
    force: Force = False,
):
    """Concatenate files, folders and archives into one byte stream, then split it.

    Order: the paths as given; a folder gives every file below it sorted by relative path (names starting with '.'
    skipped), an archive its files in stored order; --include / --exclude filter both. --split-rule stream cuts the
    stream into train, then valid, then test; hash sends each whole file to one split. meta.json lists every file's
    split, offset and length.
    """
    from haed.prepare import prepare_text

    with _progress(bytes_mode=True) as p:
        meta = prepare_text(
            paths,
            out,
            valid_fraction=valid_fraction,
            test_fraction=test_fraction,
            include=include,
            exclude=exclude,
            split_rule=split_rule,
            max_bytes=max_bytes,
            force=force,
            progress=p,
        )
    print_summary(meta, out)


Source = Annotated[
    Optional[Path],
    typer.Option("--source", metavar="FILE", help="Local enwik8.zip or extracted enwik8 (otherwise it is downloaded)."),
]


def enwik8(
    out: Out = ...,
    source: Source = None,
    force: Force = False,
):
    """The Hutter Prize enwik8 benchmark, split in order 90M / 5M / 5M bytes.

    Without --source the standard enwik8.zip is downloaded (about 36 MB); offline, the command says so within seconds.
    The data must be exactly 100,000,000 bytes.
    """
    from haed.prepare import prepare_enwik8

    with _progress(bytes_mode=True) as p:
        meta = prepare_enwik8(out, source=source, force=force, progress=p)
    print_summary(meta, out)


AUDIO, SPLIT, OUTPUT = "Audio source", "Split", "Output"  # prepare audio's help panels


AudioSource = Annotated[
    Optional[Path],
    typer.Argument(
        help="Folder or .tar archive of audio files (searched recursively): WAV, FLAC, Ogg Vorbis/Opus, MP3, AIFF.",
        show_default=False,
        metavar="SOURCE",
    ),
]
AudioOut = Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help=OUT_HELP, rich_help_panel=OUTPUT)]
SampleRate = Annotated[
    int,
    typer.Option(
        "--sample-rate",
        metavar="HZ",
        help="Target sample rate in Hz (resampled with soxr when a file differs).",
        rich_help_panel=AUDIO,
    ),
]
Hf = Annotated[
    Optional[str],
    typer.Option(
        "--hf",
        metavar="NAME",
        help="A Hugging Face datasets audio dataset (name or local path) instead of SOURCE.",
        rich_help_panel=AUDIO,
    ),
]
HfConfig = Annotated[
    Optional[str],
    typer.Option("--hf-config", metavar="NAME", help="Configuration name of the --hf dataset.", rich_help_panel=AUDIO),
]
AudioSplitRule = Annotated[
    Optional[str],
    typer.Option(
        "--split-rule",
        metavar="hash|fsdd|dataset",
        help="hash (default for folders: sha256 of the relative file name against the fractions), "
        "fsdd (index 0-4 test, 5-9 valid, rest train), dataset (the --hf dataset's own splits; its default).",
        rich_help_panel=SPLIT,
    ),
]
AudioValidFraction = Annotated[
    Optional[float],
    typer.Option(
        "--valid-fraction",
        metavar="F",
        help="hash rule: fraction of files for valid \\[default: 0.05].",
        rich_help_panel=SPLIT,
    ),
]
AudioTestFraction = Annotated[
    Optional[float],
    typer.Option(
        "--test-fraction",
        metavar="F",
        help="hash rule: fraction of files for test \\[default: 0.05].",
        rich_help_panel=SPLIT,
    ),
]
AudioInclude = Annotated[
    List[str],
    typer.Option("--include", help=INCLUDE_HELP, metavar="PATTERN", show_default=False, rich_help_panel=AUDIO),
]
AudioExclude = Annotated[
    List[str],
    typer.Option("--exclude", help=EXCLUDE_HELP, metavar="PATTERN", show_default=False, rich_help_panel=AUDIO),
]
AudioMaxBytes = Annotated[
    int,
    typer.Option(
        "--max-bytes",
        help="Stop after N samples in all (one byte each; 3600 x the rate is an hour; the last file cut); 0: all.",
        metavar="N",
        rich_help_panel=AUDIO,
    ),
]
SkipBad = Annotated[
    bool,
    typer.Option(
        "--skip-bad/--no-skip-bad",
        help="Leave out unreadable files (counted and listed in meta.json) instead of failing.",
        rich_help_panel=AUDIO,
    ),
]
AudioForce = Annotated[bool, typer.Option("--force/--no-force", help=FORCE_HELP, rich_help_panel=OUTPUT)]


def audio(
    source: AudioSource = None,
    out: AudioOut = ...,
    sample_rate: SampleRate = ...,
    hf: Hf = None,
    hf_config: HfConfig = None,
    split_rule: AudioSplitRule = None,
    valid_fraction: AudioValidFraction = None,
    test_fraction: AudioTestFraction = None,
    include: AudioInclude = [],
    exclude: AudioExclude = [],
    max_bytes: AudioMaxBytes = 0,
    skip_bad: SkipBad = False,
    force: AudioForce = False,
):
    """Raw audio as 8-bit mu-law bytes: mono downmix, soxr resampling, split by whole file.

    Every recording lands in exactly one split; meta.json gives each file's split, offset and length (in samples =
    bytes).
    """
    from haed.prepare import prepare_audio

    with _progress(bytes_mode=False) as p:
        meta = prepare_audio(
            source,
            out,
            sample_rate=sample_rate,
            hf=hf,
            hf_config=hf_config,
            split_rule=split_rule,
            valid_fraction=valid_fraction,
            test_fraction=test_fraction,
            include=include,
            exclude=exclude,
            max_bytes=max_bytes,
            skip_bad=skip_bad,
            force=force,
            progress=p,
        )
    print_summary(meta, out)


def register(app: typer.Typer) -> None:
    """`haed prepare SOURCE`: one sub-command per data source."""
    sub = typer.Typer(cls=Group, **PREPARE_APP)
    sub.command(
        "stdlib",
        cls=Command,
        short_help="Offline default corpus: this Python's standard-library sources. Example: haed prepare stdlib "
        "--out data/stdlib",
        epilog="Example: haed prepare stdlib --out data/stdlib",
    )(user_errors(stdlib))
    sub.command(
        "text",
        cls=Command,
        short_help="Files, folders and .tar archives of text. Example: haed prepare text notes/ --out data/notes",
        epilog=(
            "Examples:\n\n  haed prepare text notes/ book.txt --out data/notes\n\n"
            "  haed prepare text linux-source-6.1.tar.xz --include '*.c' --include '*.h' --split-rule hash "
            "--max-bytes 300000000 --out data/code"
        ),
    )(user_errors(text))
    sub.command(
        "enwik8",
        cls=Command,
        short_help="enwik8 (100,000,000 bytes) split 90M/5M/5M. Example: haed prepare enwik8 --out data/enwik8",
        epilog="Examples:\n\n  haed prepare enwik8 --out data/enwik8\n\n  haed prepare enwik8 --source ~/enwik8.zip "
        "--out data/enwik8",
    )(user_errors(enwik8))
    sub.command(
        "audio",
        cls=Command,
        short_help="Audio folder or archive (or --hf dataset) to 8-bit mu-law. Example: haed prepare audio wavs/ --out "
        "data/speech --sample-rate 16000",
        epilog=(
            "Examples:\n\n  haed prepare audio ../shared/data/fsdd --out data/fsdd-8k --sample-rate 8000 "
            "--split-rule fsdd\n\n"
            "  haed prepare audio usr/share/games/wesnoth/1.16/data/core/music --include '*.ogg' --sample-rate 16000 "
            "--max-bytes 57600000 --valid-fraction 0.1 --test-fraction 0.1 --out data/music\n\n"
            "  haed prepare audio --hf NAME --out data/speech --sample-rate 16000"
        ),
    )(user_errors(audio))
    app.add_typer(sub, name="prepare")
