"""Reading the DCP shards of a multi-process checkpoint without executing code, in any process.

DCP's metadata file is a pickle: it is unpickled through an allow-list of DCP's own record types, and the
shards must hold tensors only (a pickled object in their place is refused, not loaded). The weights of a
step checkpoint that has no model.safetensors load from its shards in one process, without a process
group (`load_model_from_shards`); `haed.sharded` loads model and optimizer onto several ranks with the
same reader. Nothing here writes or knows the checkpoint files around the shards (`haed.checkpoint`).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from haed.errors import HaedError

SHARDS = "dcp"  # the DCP directory inside a step checkpoint of a multi-process run


def is_sharded(checkpoint: Path) -> bool:
    """Whether a step checkpoint was written by several processes (DCP shards)."""
    return (Path(checkpoint) / SHARDS).is_dir()


def load_model_from_shards(checkpoint: Path, model) -> None:
    """The model's weights from a sharded checkpoint's DCP shards, read whole by this process alone (no
    process group): a step checkpoint of a multi-process run that holds no model.safetensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    shard_reader(checkpoint / SHARDS).read_metadata()  # refused here, with its reason, if it names anything else
    state = get_model_state_dict(model)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                {"model": state},
                storage_reader=shard_reader(checkpoint / SHARDS),
                planner=tensors_only_planner(),
                no_dist=True,
            )
    except HaedError:
        raise
    except Exception as e:  # noqa: BLE001 - DCP raises its own kinds for a foreign or damaged checkpoint
        text = str(e).strip().splitlines()
        raise HaedError(f"cannot read the weights in the shards of {checkpoint}: {text[0] if text else e!r}") from None
    set_model_state_dict(model, state)


# -- loading DCP shards without executing code ---------------------------------------------------

# What DCP's metadata file may name: its own record types, torch sizes, dtypes and layouts, paths.
_METADATA_MODULES = {"torch.distributed.checkpoint.metadata"}
_METADATA_NAMES = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = (
            module in _METADATA_MODULES
            or (module, name) in _METADATA_NAMES
            or (
                module == "torch"
                and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
            )
        )
        if not allowed:
            raise HaedError(f"the checkpoint's shard metadata names {module}.{name}: refusing to load it")
        return super().find_class(module, name)


def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class ShardReader(FileSystemReader):
        """DCP's file reader, with its metadata unpickled through an allow-list."""

        def read_metadata(self, *args, **kwargs):
            path = self._get_metadata_path(kwargs.get("rank"))
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except HaedError:
                raise
            except Exception as e:
                raise HaedError(f"cannot read the shard metadata {path}: {e}") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return ShardReader


def shard_reader(path: Path):
    return _reader_class()(str(path))


def tensors_only_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorsOnlyPlanner(DefaultLoadPlanner):
        """haed's shards hold tensors only: a pickled object in their place is refused, not loaded."""

        def load_bytes(self, read_item, value):
            raise HaedError(
                f"the checkpoint shards hold a pickled object for {read_item.dest_index.fqn}: refusing to load it"
            )

    return TensorsOnlyPlanner()
