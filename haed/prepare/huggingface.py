"""`haed prepare audio --hf NAME`: the items of a Hugging Face `datasets` audio dataset.

`datasets` is imported only here, and only when a dataset is asked for. Audio is decoded with
soundfile (never torchcodec, whose wheels need CUDA). With no network the Hub is not waited for: the
local cache is used, or the command says in one line that the dataset is not there.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from pathlib import Path
from typing import Callable, Iterator

from haed.data import SPLITS, _one_line
from haed.errors import HaedError
from haed.prepare.common import NETWORK_TIMEOUT_S, hash_split, resolve_host

HF_SPLIT_NAMES = {
    "train": "train",
    "validation": "valid",
    "valid": "valid",
    "dev": "valid",
    "val": "valid",
    "test": "test",
}


def _offline_reason(name: str) -> str | None:
    """Why the Hub cannot be reached (then go offline before `datasets` is imported), or None."""
    if Path(name).exists():
        return None
    if any(
        os.environ.get(v, "0").lower() not in ("0", "", "false", "no")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return None
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    try:
        resolve_host(host, port, NETWORK_TIMEOUT_S)
        socket.create_connection((host, port), timeout=NETWORK_TIMEOUT_S).close()
        return None
    except OSError as e:
        # offline before the first import of datasets / huggingface_hub, so the cache is used and nothing hangs
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        return f"cannot reach {host} ({_one_line(e)})"


def _load(name: str, config: str | None):
    offline_reason = _offline_reason(name)
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
                f"{offline_reason} and the dataset {name} is not in the local cache; with no network, give a SOURCE "
                "folder of audio files instead of --hf"
            ) from None
        raise HaedError(f"cannot load the Hugging Face dataset {name}: {_one_line(e)}") from None
    if isinstance(dsd, datasets.Dataset):
        dsd = datasets.DatasetDict({"train": dsd})
    return datasets, dsd


def _check_own_splits(name: str, hf_splits: list[str]) -> None:
    unknown = [s for s in hf_splits if s not in HF_SPLIT_NAMES]
    if unknown:
        raise HaedError(
            f"dataset {name} has splits {', '.join(hf_splits)}; haed cannot place {', '.join(unknown)} (use "
            "--split-rule hash)"
        )
    missing = [s for s in SPLITS if s not in {HF_SPLIT_NAMES[h] for h in hf_splits}]
    if missing:
        raise HaedError(
            f"dataset {name} has no {' or '.join(missing)} split (it has {', '.join(hf_splits)}); use --split-rule hash"
        )


def hf_items(name: str, config: str | None, rule: str, valid_fraction, test_fraction, fsdd_split: Callable):
    """(items, count, source description) of a Hugging Face audio dataset. Each item is (name, split,
    source) where source is the encoded bytes or a path, for :func:`haed.audio.read_audio_info`."""
    datasets, dsd = _load(name, config)
    hf_splits = list(dsd.keys())
    if rule == "dataset":
        _check_own_splits(name, hf_splits)
    first = dsd[hf_splits[0]]
    cols = [c for c, f in first.features.items() if isinstance(f, datasets.Audio)]
    if not cols:
        raise HaedError(f"dataset {name} has no audio column (columns: {', '.join(first.features)})")
    col = cols[0]
    total = sum(len(dsd[s]) for s in hf_splits)
    if total == 0:
        raise HaedError(f"dataset {name} has no rows")

    def items() -> Iterator[tuple[str, str, object]]:
        for s in hf_splits:
            for i, row in enumerate(dsd[s].cast_column(col, datasets.Audio(decode=False))):
                a = row[col] or {}
                path = a.get("path")
                item_name = f"{s}/{i:07d}" + (f":{Path(path).name}" if path else "")
                if rule == "dataset":
                    split = HF_SPLIT_NAMES[s]
                elif rule == "fsdd":
                    split = fsdd_split(Path(path).name if path else item_name)
                else:
                    split = hash_split(item_name, valid_fraction, test_fraction)
                yield item_name, split, a.get("bytes") if a.get("bytes") is not None else path

    source = {
        "type": "huggingface",
        "description": f"Hugging Face dataset {name}" + (f" ({config})" if config else "") + f", splits "
        f"{', '.join(hf_splits)}",
        "name": name,
        "config": config,
        "audio_column": col,
        "dataset_splits": hf_splits,
    }
    return items(), total, source
