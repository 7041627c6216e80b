"""`haed prepare audio`: audio files (a folder, an archive, or a Hugging Face dataset) -> 8-bit mu-law,
split by whole file.

Every file is decoded with soundfile (WAV, FLAC, Ogg Vorbis/Opus, MP3, AIFF), averaged to mono,
resampled with soxr when its rate differs, and mu-law encoded; each recording lands whole in one split.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from haed.audio import audio_library
from haed.data import SPLITS, DatasetWriter, check_output_dir
from haed.errors import HaedError
from haed.prepare.common import HASH_SPLIT_RULE, ProgressTask, check_fractions, hash_split
from haed.prepare.sources import Sources, is_archive

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")
ENCODE_BATCH_SAMPLES = 1 << 21
SPLIT_RULES = ("hash", "fsdd", "dataset")
FSDD_NAME = re.compile(r"^(\d+)_([^_/]+)_(\d+)$")


def fsdd_split(name: str) -> str:
    """Free Spoken Digit Dataset rule on ``{digit}_{speaker}_{index}.wav``: the dataset's own rule
    puts indices 0-4 in test (and 5-49 in train); haed takes indices 5-9 out of train as valid."""
    stem = Path(name).name.rsplit(".", 1)[0]
    m = FSDD_NAME.match(stem)
    if not m:
        raise HaedError(
            f"{name} does not look like an FSDD file name {{digit}}_{{speaker}}_{{index}}.wav (needed by "
            "--split-rule fsdd)"
        )
    index = int(m.group(3))
    if index <= 4:
        return "test"
    if index <= 9:
        return "valid"
    return "train"


SPLIT_RULE_TEXT = {
    "hash": HASH_SPLIT_RULE,
    "fsdd": "Free Spoken Digit Dataset, by file name {digit}_{speaker}_{index}: index 0-4 -> test (the dataset's own "
    "rule), "
    "index 5-9 -> valid, index 10 and up -> train",
    "dataset": "the Hugging Face dataset's own splits: train -> train; validation, valid, val, dev -> valid; test -> "
    "test",
}


def is_audio_name(name: str) -> bool:
    return name.lower().endswith(AUDIO_EXTENSIONS)


def collect_audio_files(
    source: str | os.PathLike, include: Iterable[str] = (), exclude: Iterable[str] = (), outside: Path | None = None
) -> Sources:
    """The audio files of a folder or `.tar` archive (recursively), filtered by the patterns."""
    source = Path(source)
    if not source.exists():
        raise HaedError(f"audio source not found: {source}")
    if not source.is_dir() and not is_archive(source):
        raise HaedError(f"{source} is not a folder or a .tar archive; give a folder or archive of audio files")
    if source.is_dir() and not any(source.iterdir()):
        raise HaedError(f"folder {source} is empty")
    return Sources(
        [source],
        include,
        exclude,
        keep=is_audio_name,
        outside=outside,
        what=f"audio files ({', '.join(AUDIO_EXTENSIONS)})",
    )


def _folder_items(sources: Sources, rule: str, valid_fraction: float, test_fraction: float):
    """(items, count): each item is (name, split, what to decode: a path or the file's bytes)."""
    splits = [
        fsdd_split(f.name) if rule == "fsdd" else hash_split(f.name, valid_fraction, test_fraction)
        for f in sources.files
    ]
    empty = [s for s in SPLITS if s not in splits]
    if empty:
        raise HaedError(
            f"the split rule {rule} puts none of the {len(splits):,} files in the {' or '.join(empty)} split; "
            + (
                "use more files or a larger --valid-fraction/--test-fraction"
                if rule == "hash"
                else "use --split-rule hash"
            )
        )

    def items() -> Iterator[tuple[str, str, object]]:
        for (f, fh), split in zip(sources.open_each(), splits):
            yield f.name, split, f.path if f.path is not None else fh.read()

    return items(), len(splits)


def _check_options(source, hf, sample_rate, split_rule, valid_fraction, test_fraction, max_bytes):
    if (source is None) == (hf is None):
        raise HaedError("give either a SOURCE folder or archive, or --hf NAME (exactly one)")
    if not isinstance(sample_rate, int) or sample_rate < 1000 or sample_rate > 384_000:
        raise HaedError(f"--sample-rate must be an integer between 1000 and 384000 Hz (got {sample_rate})")
    rule = split_rule or ("dataset" if hf is not None else "hash")
    if rule not in SPLIT_RULES:
        raise HaedError(f"unknown --split-rule {rule!r}: choose {', '.join(SPLIT_RULES)}")
    if rule == "dataset" and hf is None:
        raise HaedError("--split-rule dataset needs --hf (a folder has no splits of its own; use hash or fsdd)")
    if rule != "hash" and (valid_fraction is not None or test_fraction is not None):
        raise HaedError(f"--valid-fraction and --test-fraction apply only to --split-rule hash, not {rule}")
    if max_bytes is not None and max_bytes < 0:
        raise HaedError(f"--max-bytes must be 0 (no cap) or positive (got {max_bytes})")
    valid_fraction = 0.05 if valid_fraction is None else valid_fraction
    test_fraction = 0.05 if test_fraction is None else test_fraction
    if rule == "hash":
        check_fractions(valid_fraction, test_fraction)
    for mod in ("soundfile", "soxr"):
        audio_library(mod, "prepare audio")
    return rule, valid_fraction, test_fraction


def prepare_audio(
    source: str | os.PathLike | None,
    out,
    *,
    sample_rate: int,
    hf: str | None = None,
    hf_config: str | None = None,
    split_rule: str | None = None,
    valid_fraction: float | None = None,
    test_fraction: float | None = None,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    max_bytes: int | None = None,
    skip_bad: bool = False,
    force: bool = False,
    progress=None,
) -> dict:
    """Audio files -> mono, ``sample_rate`` (soxr), 8-bit mu-law, split by whole file.

    ``source``: a folder or ``.tar`` archive of audio files (recursive; ``include`` / ``exclude``
    patterns filter them), or ``hf``: a Hugging Face datasets name. ``split_rule``: ``hash`` (default
    for folders), ``fsdd``, or ``dataset`` (default for ``hf``). ``max_bytes``: stop after this many
    samples (= bytes; the file that crosses it is cut; None or 0: all).
    """
    rule, valid_fraction, test_fraction = _check_options(
        source, hf, sample_rate, split_rule, valid_fraction, test_fraction, max_bytes
    )
    out = check_output_dir(out, force)
    if hf is None:
        sources = collect_audio_files(source, include, exclude, outside=out)
        items, total = _folder_items(sources, rule, valid_fraction, test_fraction)
        src_meta = {"type": "audio-folder", "description": sources.describe(), "path": Path(source).as_posix()}
        src_meta.update(sources.meta())
    else:
        from haed.prepare.huggingface import hf_items

        items, total, src_meta = hf_items(hf, hf_config, rule, valid_fraction, test_fraction, fsdd_split)
    with DatasetWriter(out, force=force) as w:
        entries, skipped = _encode(w, items, total, sample_rate, skip_bad, max_bytes or None, progress)
        return w.finish(
            _audio_meta(src_meta, sample_rate, rule, valid_fraction, test_fraction, entries, skipped, max_bytes)
        )


def _encode(w: DatasetWriter, items, total: int, sample_rate: int, skip_bad: bool, max_bytes, progress):
    """Decode and mu-law encode every item into its split; (file entries, skipped files)."""
    from haed.audio import encode_to_bytes, read_audio_info

    entries, skipped, pending = [], [], []
    task = ProgressTask(progress, "encoding audio", total)
    position = {s: 0 for s in SPLITS}  # where the next file of each split starts
    taken = pending_samples = 0

    def flush() -> None:  # one mu-law call for many files: far fewer (threaded) torch calls than one per file
        if pending:
            codes = encode_to_bytes(np.concatenate([x for _, x in pending]))
            start = 0
            for split, x in pending:
                w.write(split, codes[start : start + len(x)])
                start += len(x)
            pending.clear()
        return 0

    for name, split, src in items:
        try:
            if src is None:
                raise HaedError(f"cannot read audio file {name}: the row holds neither bytes nor a path")
            samples, src_rate, src_channels = read_audio_info(src, sample_rate, name=name)
        except HaedError as e:
            if not skip_bad:
                raise HaedError(f"{e} (pass --skip-bad to leave such files out)") from None
            skipped.append({"name": name, "error": str(e)})
            task.advance(1)
            continue
        entry = {"name": name, "split": split, "offset": position[split]}
        if max_bytes is not None and taken + len(samples) > max_bytes:
            entry["truncated_from"] = int(samples.shape[0])
            samples = samples[: max_bytes - taken]
        entry.update(length=int(samples.shape[0]), source_sample_rate=src_rate, source_channels=src_channels)
        entries.append(entry)
        pending.append((split, samples))
        position[split] += len(samples)
        taken += len(samples)
        pending_samples += len(samples)
        if pending_samples >= ENCODE_BATCH_SAMPLES:
            pending_samples = flush()
        task.advance(1)
        if max_bytes is not None and taken >= max_bytes:
            break
    flush()
    if not entries:
        raise HaedError(
            f"none of the {total:,} audio files could be read" + (f" (skipped {len(skipped)})" if skipped else "")
        )
    return entries, skipped


def _audio_meta(src_meta, sample_rate, rule, valid_fraction, test_fraction, entries, skipped, max_bytes) -> dict:
    from haed.audio import ENCODING, QUANTIZATION_CHANNELS

    per_split = {s: sum(e["length"] for e in entries if e["split"] == s) for s in SPLITS}
    return {
        "kind": "audio",
        "source": src_meta,
        "sample_rate": sample_rate,
        "encoding": ENCODING,
        "mu_law": {
            "quantization_channels": QUANTIZATION_CHANNELS,
            "formula": "torchaudio mu_law_encoding, input clipped to [-1, 1]",
        },
        "processing": "channels averaged to mono; resampled with soxr (HQ) when the rate differs; 8-bit mu-law",
        "split_rule": {"name": rule, "description": SPLIT_RULE_TEXT[rule]}
        | ({"valid_fraction": valid_fraction, "test_fraction": test_fraction} if rule == "hash" else {}),
        "split_by": "file",
        "max_bytes": max_bytes or None,
        "seconds": {s: per_split[s] / sample_rate for s in SPLITS},
        "file_counts": {s: sum(1 for e in entries if e["split"] == s) for s in SPLITS},
        "files": entries,
        "skipped_count": len(skipped),
        "skipped": skipped,
    }
