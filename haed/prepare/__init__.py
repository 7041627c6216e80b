"""Data preparation: one module per source, over shared helpers.

- :mod:`haed.prepare.text`: files and folders of text, and the offline standard-library corpus;
- :mod:`haed.prepare.enwik8`: enwik8 (downloaded, or from a local zip or file);
- :mod:`haed.prepare.audio`: folders and archives of audio files (WAV, FLAC, Ogg, ...);
- :mod:`haed.prepare.huggingface`: Hugging Face audio datasets (``datasets`` imported only there);
- :mod:`haed.prepare.sources`: files, folders and ``.tar`` archives filtered by include/exclude patterns;
- :mod:`haed.prepare.common`: progress, splitting a byte stream or by file, walking folders, downloading.

Every ``prepare_*`` function writes one dataset directory (see :mod:`haed.data`) through
:class:`haed.data.DatasetWriter` (temporary sibling, renamed on success) and returns the
``meta.json`` it wrote. Bad input raises :class:`haed.errors.HaedError` with a one-line message
before or instead of leaving anything on disk.

``progress`` is an optional ``rich.progress.Progress`` (the CLI passes one); library callers may
leave it out.
"""

from haed.prepare.audio import (
    AUDIO_EXTENSIONS,
    SPLIT_RULE_TEXT,
    SPLIT_RULES,
    collect_audio_files,
    fsdd_split,
    prepare_audio,
)
from haed.prepare.common import HASH_SPLIT_RULE, NETWORK_TIMEOUT_S, check_fractions, download, hash_split, split_sizes
from haed.prepare.enwik8 import ENWIK8_BYTES, ENWIK8_SPLIT, ENWIK8_URL, prepare_enwik8
from haed.prepare.sources import ARCHIVE_SUFFIXES, SourceFile, Sources
from haed.prepare.text import (
    STDLIB_DEFAULT_MAX_BYTES,
    STDLIB_ORDER_RULE,
    STDLIB_SKIP_DIRS,
    TEXT_ORDER_RULE,
    TEXT_SPLIT_RULES,
    prepare_stdlib,
    prepare_text,
    stdlib_files,
    stdlib_root,
)

__all__ = [
    "ARCHIVE_SUFFIXES",
    "HASH_SPLIT_RULE",
    "SourceFile",
    "Sources",
    "TEXT_SPLIT_RULES",
    "AUDIO_EXTENSIONS",
    "ENWIK8_BYTES",
    "ENWIK8_SPLIT",
    "ENWIK8_URL",
    "NETWORK_TIMEOUT_S",
    "SPLIT_RULES",
    "SPLIT_RULE_TEXT",
    "STDLIB_DEFAULT_MAX_BYTES",
    "STDLIB_ORDER_RULE",
    "STDLIB_SKIP_DIRS",
    "TEXT_ORDER_RULE",
    "check_fractions",
    "collect_audio_files",
    "download",
    "fsdd_split",
    "hash_split",
    "prepare_audio",
    "prepare_enwik8",
    "prepare_stdlib",
    "prepare_text",
    "split_sizes",
    "stdlib_files",
    "stdlib_root",
]
