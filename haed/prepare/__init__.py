"""Data preparation: one module per source, over shared helpers.

- :mod:`haed.prepare.text`: files and folders of text, and the offline standard-library corpus;
- :mod:`haed.prepare.enwik8`: enwik8 (downloaded, or from a local zip or file);
- :mod:`haed.prepare.audio`: WAV/FLAC folders and Hugging Face audio datasets;
- :mod:`haed.prepare.common`: progress, splitting a byte stream, walking folders, downloading.

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
    hash_split,
    prepare_audio,
)
from haed.prepare.common import NETWORK_TIMEOUT_S, check_fractions, download, split_sizes
from haed.prepare.enwik8 import ENWIK8_BYTES, ENWIK8_SPLIT, ENWIK8_URL, prepare_enwik8
from haed.prepare.text import (
    STDLIB_DEFAULT_MAX_BYTES,
    STDLIB_ORDER_RULE,
    STDLIB_SKIP_DIRS,
    TEXT_ORDER_RULE,
    collect_text_files,
    prepare_stdlib,
    prepare_text,
    stdlib_files,
    stdlib_root,
)

__all__ = [
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
    "collect_text_files",
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
