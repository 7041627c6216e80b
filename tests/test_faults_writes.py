"""Full disks and read-only folders (issue 26, classes 3 and 4): every write path fails in one line naming
the path and the cause, leaves no temporary and no partial output, and training keeps its resume point.

Each fault runs on a real small disk (a tmpfs, where the tests may mount one: root, and a kernel that
allows it; skipped otherwise) and through a writer patched to fail as that disk does."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
from _faults import cli, failing_open, fill, one_error, small_disk, temporaries
from safetensors.torch import load_file

import haed.atomic
import haed.audio
import haed.checkpoint
import haed.data
from haed.data import DatasetWriter
from haed.errors import HaedError, RunStopped
from haed.recipe import debug_recipe
from haed.train import train

RATE = 1000


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_run):
    """A finished text run (step-000002, step-000004, best) and a tiny audio run."""
    import numpy as np

    root = tmp_path_factory.mktemp("writes")
    with DatasetWriter(root / "tone") as w:
        for split, n in (("train", 3000), ("valid", 400), ("test", 400)):
            w.write(split, (128 + 20 * np.sin(np.arange(n) / 3)).astype(np.uint8).tobytes())
        w.finish({"kind": "audio", "sample_rate": RATE, "encoding": "mu-law-8", "source": {"description": "tone"}})
    recipe = debug_recipe(str(root / "tone"))
    recipe.full.steps = 2
    train(recipe, "full", root / "audio", device="cpu")
    return {"text": text_run / "run", "audio": root / "audio", "words": text_run / "words", "root": root}


def _resumable_copy(runs, folder):
    """The text run as it stood after step 2 (step-000004 not yet written)."""
    run = folder / "run"
    shutil.copytree(runs["text"], run, ignore=shutil.ignore_patterns(".lock", "step-000004"))
    return run


def test_a_checkpoint_write_that_fails_stops_training_in_one_line_and_resume_continues(runs, tmp_path, monkeypatch):
    run = _resumable_copy(runs, tmp_path)
    real = haed.checkpoint.save_file

    def save_file(weights, path):
        if "step-000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(weights, path)

    monkeypatch.setattr(haed.checkpoint, "save_file", save_file)
    line = one_error(cli("train-full", "--out", run, "--resume"), "no space left on device", "step-000002", code=75)
    assert "step-000004" in line and not temporaries(run) and not (run / "step-000004").exists()
    monkeypatch.setattr(haed.checkpoint, "save_file", real)
    assert cli("train-full", "--out", run, "--resume").exit_code == 0  # once there is room
    a, b = (load_file(str(r / "step-000004" / "model.safetensors")) for r in (runs["text"], run))
    assert all((a[k] == b[k]).all() for k in a)  # the uninterrupted run's weights


def test_a_disk_that_fills_mid_run_stops_training_with_its_resume_point(runs, tmp_path):
    with small_disk(tmp_path / "disk", "8m") as disk:
        run = _resumable_copy(runs, disk)

        def on_event(event):
            if event["event"] == "start":
                fill(disk)  # the next checkpoint meets a full disk

        with pytest.raises(RunStopped, match="no space left on device.*step-000002 is where --resume continues") as e:
            train(None, "full", run, resume=True, on_event=on_event)
        assert e.value.exit_code == 75
        assert not temporaries(disk) and [p.name for p in run.glob("step-*")] == ["step-000002"]


@pytest.mark.parametrize("disk", ["patched", "tmpfs"])
def test_prepare_on_a_full_disk_says_it_cannot_write(disk, tmp_path, monkeypatch, prepare_cli, assert_clean_failure):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("the cat sat on the mat " * 2000)
    if disk == "patched":
        monkeypatch.setattr(haed.data, "open", failing_open(errno.ENOSPC, after=1000), raising=False)
        out = tmp_path / "ds"
        assert_clean_failure(prepare_cli("text", src, "--out", out), out, "cannot write the dataset", "no space left")
    else:
        with small_disk(tmp_path / "disk", "1m") as mounted:
            fill(mounted)
            out = mounted / "ds"
            line = assert_clean_failure(prepare_cli("text", src, "--out", out), out, "cannot write", "free space")
            assert "cannot read" not in line


def test_prepare_audio_on_a_full_disk_leaves_nothing(
    fsdd_dir, tmp_path, monkeypatch, prepare_cli, assert_clean_failure
):
    wavs = tmp_path / "wavs"
    wavs.mkdir()
    for index in range(12):  # indices 0-4 test, 5-9 valid, the rest train
        shutil.copy(fsdd_dir / f"0_george_{index}.wav", wavs / f"0_george_{index}.wav")
    monkeypatch.setattr(haed.data, "open", failing_open(errno.ENOSPC, after=2000), raising=False)
    out = tmp_path / "ds"
    result = prepare_cli("audio", wavs, "--out", out, "--sample-rate", "8000", "--split-rule", "fsdd")
    assert_clean_failure(result, out, "no space left on device")


@pytest.mark.parametrize("disk", ["patched", "tmpfs"])
def test_generate_and_evaluate_outputs_on_a_full_disk(runs, disk, tmp_path, monkeypatch):
    if disk == "patched":
        folder = tmp_path

        def no_room(*args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(haed.atomic.os, "replace", no_room)
        monkeypatch.setattr(haed.audio, "open", failing_open(errno.ENOSPC, after=44), raising=False)
    else:
        folder = tmp_path / "disk"
        mounted = small_disk(folder, "1m")
        mounted.__enter__()
        fill(folder)
    try:
        one_error(cli("generate", "--run", runs["text"], "--max-bytes", "8", "--out", folder / "g.txt"), "g.txt")
        one_error(cli("evaluate", "--run", runs["text"], "--json", folder / "e.json"), "e.json", "no space left")
        one_error(cli("generate", "--run", runs["audio"], "--max-bytes", "300", "--out", folder / "a.wav"), "a.wav")
        assert not [p.name for p in folder.iterdir() if not p.name.startswith("filler")]  # no partial output
    finally:
        if disk == "tmpfs":
            mounted.__exit__(None, None, None)


@pytest.fixture(params=["permissions", "tmpfs", "patched"])
def read_only(request, tmp_path, monkeypatch):
    """A folder that refuses new files: by its permissions (not as root: root writes through them), a
    read-only tmpfs, or writers patched to fail as a read-only file system does."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if request.param == "permissions":
        if os.geteuid() == 0:
            pytest.skip("as root, permissions do not stop writes")
        folder.chmod(0o555)
        yield folder, "permission denied"
        folder.chmod(0o755)
    elif request.param == "tmpfs":
        with small_disk(folder, "1m", read_only=True) as mounted:
            yield mounted, "read-only file system"
    else:
        fake = failing_open(errno.EROFS, after=0)
        for module in (haed.atomic, haed.audio, haed.data, haed.checkpoint):
            monkeypatch.setattr(module, "open", fake, raising=False)
        real_mkdir = type(folder).mkdir

        def mkdir(self, *args, **kwargs):
            if str(self).startswith(str(folder)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(type(folder), "mkdir", mkdir)
        yield folder, "read-only file system"


def test_outputs_into_a_read_only_folder_are_refused_before_any_work(runs, read_only, prepare_cli):
    read_only, cause = read_only
    one_error(cli("generate", "--run", runs["text"], "--max-bytes", "8", "--out", read_only / "g.txt"), cause)
    one_error(cli("evaluate", "--run", runs["text"], "--json", read_only / "e.json"), "--json", cause)
    one_error(cli("generate", "--run", runs["audio"], "--max-bytes", "30", "--out", read_only / "a.wav"), cause)
    one_error(prepare_cli("text", runs["words"] / "train.bin", "--out", read_only / "ds"), cause)
    one_error(
        cli("train-full", "--dataset", runs["words"], "--out", read_only / "run", "--seq-len", "64"), "run", cause
    )
    assert not list(read_only.iterdir())


def test_a_run_lock_that_cannot_be_written_is_one_line(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(haed.checkpoint, "open", failing_open(errno.ENOSPC, after=0), raising=False)
    run = _resumable_copy(runs, tmp_path)
    with pytest.raises(HaedError, match=r"cannot write .*\.lock: no space left on device"):
        train(None, "full", run, resume=True)
