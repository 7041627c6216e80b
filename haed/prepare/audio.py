"""`haed prepare audio`: a folder of WAV/FLAC files or a Hugging Face dataset -> 8-bit mu-law, split by whole file."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from haed.data import SPLITS, DatasetWriter, _one_line, check_output_dir
from haed.errors import HaedError
from haed.prepare.common import NETWORK_TIMEOUT_S, ProgressTask, check_fractions, resolve_host, walk_files

AUDIO_EXTENSIONS = (".wav", ".flac")
ENCODE_BATCH_SAMPLES = 1 << 21
SPLIT_RULES = ("hash", "fsdd", "dataset")
FSDD_NAME = re.compile(r"^(\d+)_([^_/]+)_(\d+)$")
HF_SPLIT_NAMES = {
    "train": "train",
    "validation": "valid",
    "valid": "valid",
    "dev": "valid",
    "val": "valid",
    "test": "test",
}


def hash_split(name: str, valid_fraction: float, test_fraction: float) -> str:
    """The default audio split rule: u = first 8 bytes of sha256(name) / 2^64;
    u < test_fraction -> test, u < test_fraction + valid_fraction -> valid, else train."""
    u = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + valid_fraction:
        return "valid"
    return "train"


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
    "hash": "by file: u = (first 8 bytes of sha256 of the file's relative path, UTF-8, as a big-endian integer) / "
    "2^64; "
    "u < test_fraction -> test, u < test_fraction + valid_fraction -> valid, else train",
    "fsdd": "Free Spoken Digit Dataset, by file name {digit}_{speaker}_{index}: index 0-4 -> test (the dataset's own "
    "rule), "
    "index 5-9 -> valid, index 10 and up -> train",
    "dataset": "the Hugging Face dataset's own splits: train -> train; validation, valid, val, dev -> valid; test -> "
    "test",
}


def collect_audio_files(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    folder = Path(folder)
    if not folder.exists():
        raise HaedError(f"audio source not found: {folder}")
    if not folder.is_dir():
        raise HaedError(f"{folder} is not a folder; give a folder of WAV/FLAC files")
    everything = walk_files(folder)
    if not everything and not any(folder.iterdir()):
        raise HaedError(f"folder {folder} is empty")
    files = [(p, n) for p, n in everything if p.suffix.lower() in AUDIO_EXTENSIONS]
    if not files:
        raise HaedError(f"no WAV or FLAC files found under {folder} (searched recursively)")
    return files


@dataclass
class _AudioItem:
    name: str
    split: str
    load: Callable[[], tuple]  # -> (float32 mono at the target rate, source rate, source channels)


def _hf_items(
    name: str, config: str | None, sample_rate: int, rule: str, valid_fraction, test_fraction
) -> tuple[Iterator[_AudioItem], int, dict]:
    """Items of a Hugging Face ``datasets`` audio dataset, decoded with soundfile (never torchcodec)."""
    local = Path(name).exists()
    offline_reason = None
    if (
        not local
        and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("0", "", "false", "no")
        and os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("0", "", "false", "no")
    ):
        endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
        try:
            resolve_host(host, port, NETWORK_TIMEOUT_S)
            socket.create_connection((host, port), timeout=NETWORK_TIMEOUT_S).close()
        except OSError as e:
            offline_reason = f"cannot reach {host} ({_one_line(e)})"
            # go offline before the first import of datasets / huggingface_hub, so the cache is used and nothing hangs
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError:
        raise HaedError("--hf needs the `datasets` package: pip install 'haed[hf]'") from None
    if offline_reason is not None:
        try:  # in case datasets was already imported in this process
            datasets.config.HF_HUB_OFFLINE = True
            datasets.config.HF_DATASETS_OFFLINE = True
        except AttributeError:
            pass
    try:
        dsd = datasets.load_dataset(name, config) if config else datasets.load_dataset(name)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; all mean "could not load"
        if offline_reason is not None:
            raise HaedError(
                f"{offline_reason} and the dataset {name} is not in the local cache; with no network, give a folder "
                "of WAV/FLAC files instead"
            ) from None
        raise HaedError(f"cannot load the Hugging Face dataset {name}: {_one_line(e)}") from None
    if isinstance(dsd, datasets.Dataset):
        dsd = datasets.DatasetDict({"train": dsd})
    hf_splits = list(dsd.keys())
    if rule == "dataset":
        unknown = [s for s in hf_splits if s not in HF_SPLIT_NAMES]
        if unknown:
            raise HaedError(
                f"dataset {name} has splits {', '.join(hf_splits)}; haed cannot place {', '.join(unknown)} (use "
                "--split-rule hash)"
            )
        missing = [s for s in SPLITS if s not in {HF_SPLIT_NAMES[h] for h in hf_splits}]
        if missing:
            raise HaedError(
                f"dataset {name} has no {' or '.join(missing)} split (it has {', '.join(hf_splits)}); use "
                "--split-rule hash"
            )
    first = dsd[hf_splits[0]]
    cols = [c for c, f in first.features.items() if isinstance(f, datasets.Audio)]
    if not cols:
        raise HaedError(f"dataset {name} has no audio column (columns: {', '.join(first.features)})")
    col = cols[0]
    total = sum(len(dsd[s]) for s in hf_splits)
    if total == 0:
        raise HaedError(f"dataset {name} has no rows")

    from haed.audio import read_audio_info

    def items() -> Iterator[_AudioItem]:
        for s in hf_splits:
            ds = dsd[s].cast_column(col, datasets.Audio(decode=False))
            for i, row in enumerate(ds):
                a = row[col] or {}
                path = a.get("path")
                item_name = f"{s}/{i:07d}" + (f":{Path(path).name}" if path else "")
                if rule == "dataset":
                    split = HF_SPLIT_NAMES[s]
                elif rule == "fsdd":
                    split = fsdd_split(Path(path).name if path else item_name)
                else:
                    split = hash_split(item_name, valid_fraction, test_fraction)
                data = a.get("bytes")
                src = data if data is not None else path
                if src is None:

                    def load(n=item_name):
                        raise HaedError(f"cannot read audio file {n}: the row holds neither bytes nor a path")
                else:

                    def load(src=src, n=item_name):
                        return read_audio_info(src, sample_rate, name=n)

                yield _AudioItem(item_name, split, load)

    source = {
        "type": "huggingface",
        "description": f"Hugging Face dataset {name}"
        + (f" ({config})" if config else "")
        + f", splits {', '.join(hf_splits)}",
        "name": name,
        "config": config,
        "audio_column": col,
        "dataset_splits": hf_splits,
    }
    return items(), total, source


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
    skip_bad: bool = False,
    force: bool = False,
    progress=None,
) -> dict:
    """Audio files -> mono, ``sample_rate`` (soxr), 8-bit mu-law, split by whole file.

    ``source``: a folder of WAV/FLAC files (recursive), or ``hf``: a Hugging Face datasets name.
    ``split_rule``: ``hash`` (default for folders), ``fsdd``, or ``dataset`` (default for ``hf``).
    """
    if (source is None) == (hf is None):
        raise HaedError("give either a SOURCE folder or --hf NAME (exactly one)")
    if not isinstance(sample_rate, int) or sample_rate < 1000 or sample_rate > 384_000:
        raise HaedError(f"--sample-rate must be an integer between 1000 and 384000 Hz (got {sample_rate})")
    rule = split_rule or ("dataset" if hf is not None else "hash")
    if rule not in SPLIT_RULES:
        raise HaedError(f"unknown --split-rule {rule!r}: choose {', '.join(SPLIT_RULES)}")
    if rule == "dataset" and hf is None:
        raise HaedError("--split-rule dataset needs --hf (a folder has no splits of its own; use hash or fsdd)")
    if rule != "hash" and (valid_fraction is not None or test_fraction is not None):
        raise HaedError(f"--valid-fraction and --test-fraction apply only to --split-rule hash, not {rule}")
    valid_fraction = 0.05 if valid_fraction is None else valid_fraction
    test_fraction = 0.05 if test_fraction is None else test_fraction
    if rule == "hash":
        check_fractions(valid_fraction, test_fraction)
    out = check_output_dir(out, force)
    for mod in ("soundfile", "soxr"):
        try:
            __import__(mod)
        except ImportError:
            raise HaedError(f"prepare audio needs the `{mod}` package: pip install 'haed[audio]'") from None
    from haed.audio import ENCODING, QUANTIZATION_CHANNELS, encode_to_bytes, read_audio_info

    if hf is None:
        folder = Path(source)
        files = collect_audio_files(folder)
        items_list = []
        for p, n in files:
            split = fsdd_split(n) if rule == "fsdd" else hash_split(n, valid_fraction, test_fraction)
            items_list.append(_AudioItem(n, split, lambda p=p, n=n: read_audio_info(p, sample_rate, name=n)))
        counts = {s: sum(1 for it in items_list if it.split == s) for s in SPLITS}
        empty = [s for s in SPLITS if counts[s] == 0]
        if empty:
            raise HaedError(
                f"the split rule {rule} puts none of the {len(items_list):,} files in the {' or '.join(empty)} split; "
                + ("use more files or larger fractions" if rule == "hash" else "use --split-rule hash")
            )
        items: Iterable[_AudioItem] = items_list
        total = len(items_list)
        src_meta = {
            "type": "audio-folder",
            "description": f"{total:,} WAV/FLAC files under {folder.as_posix()}",
            "path": folder.as_posix(),
        }
    else:
        items, total, src_meta = _hf_items(hf, hf_config, sample_rate, rule, valid_fraction, test_fraction)

    entries = []
    skipped = []
    with DatasetWriter(out, force=force) as w:
        task = ProgressTask(progress, "encoding audio", total)
        position = {s: 0 for s in SPLITS}
        pending: list[tuple[str, np.ndarray]] = []
        pending_samples = 0

        def flush() -> None:
            # one mu-law call for many files: far fewer (threaded) torch calls than one per file
            nonlocal pending, pending_samples
            if not pending:
                return
            codes = encode_to_bytes(np.concatenate([x for _, x in pending]))
            start = 0
            for split, x in pending:
                w.write(split, codes[start : start + len(x)])
                start += len(x)
            pending, pending_samples = [], 0

        for it in items:
            try:
                samples, src_rate, src_channels = it.load()
            except HaedError as e:
                if not skip_bad:
                    raise HaedError(f"{e} (pass --skip-bad to leave such files out)") from None
                skipped.append({"name": it.name, "error": str(e)})
                task.advance(1)
                continue
            entries.append(
                {
                    "name": it.name,
                    "split": it.split,
                    "offset": position[it.split],
                    "length": int(samples.shape[0]),
                    "source_sample_rate": src_rate,
                    "source_channels": src_channels,
                }
            )
            position[it.split] += int(samples.shape[0])
            pending.append((it.split, samples))
            pending_samples += samples.shape[0]
            if pending_samples >= ENCODE_BATCH_SAMPLES:
                flush()
            task.advance(1)
        flush()
        assert all(position[s] == w.bytes_written(s) for s in SPLITS)
        if not entries:
            raise HaedError(
                f"none of the {total:,} audio files could be read" + (f" (skipped {len(skipped)})" if skipped else "")
            )
        per_split = {s: sum(e["length"] for e in entries if e["split"] == s) for s in SPLITS}
        return w.finish(
            {
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
                "seconds": {s: per_split[s] / sample_rate for s in SPLITS},
                "file_counts": {s: sum(1 for e in entries if e["split"] == s) for s in SPLITS},
                "files": entries,
                "skipped_count": len(skipped),
                "skipped": skipped,
            }
        )
