"""`haed generate` through the CLI: every option checked, many streams, streamed text and WAV."""

from __future__ import annotations

import sys
import wave

import numpy as np
import pytest
from _tiny import make_text_dataset
from conftest import CliResult
from typer.testing import CliRunner

from haed.data import DatasetWriter
from haed.errors import HaedError
from haed.generate_job import plan_generation
from haed.recipe import debug_recipe
from haed.train import train
from haed_cli.main import app

runner = CliRunner()
RATE = 1000  # the tiny audio dataset's sample rate: a streamed WAV grows by 100 samples (0.1 s) per chunk


def _train(dataset, run_dir):
    recipe = debug_recipe(str(dataset))
    train(recipe, "full", run_dir, device="cpu")
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    text = _train(make_text_dataset(root / "text-data"), root / "text-run")
    rng = np.random.default_rng(0)
    with DatasetWriter(root / "audio-data") as w:
        for split, n in (("train", 4000), ("valid", 500), ("test", 500)):
            w.write(split, (128 + 20 * np.sin(np.arange(n) / 3) + rng.integers(-3, 4, n)).astype(np.uint8).tobytes())
        w.finish(
            {"kind": "audio", "sample_rate": RATE, "encoding": "mu-law-8", "source": {"description": "synthetic tone"}}
        )
    audio = _train(root / "audio-data", root / "audio-run")
    from haed.audio import write_wav

    wav = write_wav(root / "prompt.wav", np.sin(np.arange(30) / 2.0) * 0.5, RATE)  # 30 samples: ends mid-patch
    (root / "prompt.txt").write_bytes(b"the cat ")
    return {"text": text, "audio": audio, "wav": wav, "txt": root / "prompt.txt", "root": root}


def _invoke(*args) -> CliResult:
    return CliResult(runner.invoke(app, ["generate", *[str(a) for a in args]]))


def _ok(*args) -> CliResult:
    r = _invoke(*args)
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    return r


BAD_TEXT = [
    (["--temperature", "-1"], "--temperature must be a number >= 0"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0"),
    (["--top-p", "0"], "--top-p must lie in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must lie in (0, 1]"),
    (["--max-bytes", "0"], "--max-bytes must be a positive integer"),
    (["--max-bytes", "-5"], "--max-bytes must be a positive integer"),
    (["--num-samples", "0"], "--num-samples must be an integer >= 1"),
    (["--seconds", "1"], "--seconds is for audio runs"),
    (["--seconds", "-1"], "--seconds is for audio runs"),
    (["--prompt-file", "{wav}"], "is an audio file, but this is a text run"),
    (["--prompt", "a", "--prompt-file", "{txt}"], "give --prompt or --prompt-file, not both"),
    (["--prompt-file", "{root}/missing.txt"], "does not exist"),
    (["--stream", "--num-samples", "2"], "--stream writes one stream to stdout"),
    (["--stream", "--out", "a.txt"], "--stream writes the text to stdout: leave out --out"),
    (["--num-samples", "2", "--out", "a.txt"], "--out names a folder"),
]
BAD_AUDIO = [
    (["--prompt", "hi"], "this is an audio run"),
    (["--seconds", "0"], "--seconds must be positive"),
    (["--seconds", "-2"], "--seconds must be positive"),
    (["--seconds", "0.0001"], "less than one sample at 1000 Hz"),
    (["--seconds", "1", "--max-bytes", "10"], "give --seconds or --max-bytes, not both"),
    (["--max-bytes", "0"], "--max-bytes must be a positive integer"),
    (["--temperature", "-0.5"], "--temperature must be a number >= 0"),
    (["--top-p", "-0.1"], "--top-p must lie in (0, 1]"),
    (["--num-samples", "-1"], "--num-samples must be an integer >= 1"),
    (["--prompt-file", "{root}/missing.wav"], "audio file not found"),
    (["--num-samples", "3", "--out", "many.wav"], "--out names a folder"),
    (["--decoder-kernels", "--device", "cpu"], "--decoder-kernels: the Triton decoder kernels cannot run here: CUDA"),
]


@pytest.mark.parametrize(
    "kind, args, message", [("text", a, m) for a, m in BAD_TEXT] + [("audio", a, m) for a, m in BAD_AUDIO]
)
def test_bad_options_are_one_error_line_and_write_nothing(runs, kind, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a.format(**{k: v for k, v in runs.items() if k != kind}) for a in args]
    r = _invoke("--run", runs[kind], *args)
    assert r.exit_code == 1, (r.stdout, r.stderr)
    lines = r.error_lines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert message in lines[0], lines[0]
    assert "Traceback" not in r.stdout + r.stderr and r.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no sample.wav, no folder, nothing half-written


def test_a_wav_prompt_without_soundfile_is_one_error_line(runs, tmp_path, monkeypatch):
    """soundfile is the optional `audio` extra (a GPU image may lack it): reading a prompt then says
    what to install, in one line, instead of a traceback."""
    monkeypatch.setitem(sys.modules, "soundfile", None)  # `import soundfile` raises ImportError
    monkeypatch.chdir(tmp_path)
    r = _invoke("--run", runs["audio"], "--prompt-file", runs["wav"], "--seconds", 0.1)
    assert r.exit_code == 1 and r.stdout == "", (r.stdout, r.stderr, r.exception)
    assert r.error_lines() == [
        f"error: reading audio file {runs['wav']} needs the `soundfile` package: pip install 'haed[audio]'"
    ]
    assert list(tmp_path.iterdir()) == []


def test_recipe_defaults_are_checked_and_named():
    recipe = debug_recipe()
    recipe.generate.top_p = 0.0
    with pytest.raises(HaedError, match=r"generate\.top_p of the run's recipe must lie in \(0, 1\]"):
        plan_generation(recipe, {"kind": "text"})
    recipe.generate.top_p, recipe.generate.max_bytes = 0.9, 0
    with pytest.raises(HaedError, match=r"generate\.max_bytes of the run's recipe must be a positive integer"):
        plan_generation(recipe, {"kind": "text"})


def test_text_streams_are_blocks_equal_to_single_runs(runs):
    many = _ok("--run", runs["text"], "--prompt", "the", "--max-bytes", 16, "--seed", 4, "--num-samples", 3)
    blocks = many.stdout.split("\n\n")
    assert len(blocks) == 3
    for i, block in enumerate(blocks):
        header, text = block.split("\n", 1)
        assert header == f"--- sample {i} (seed {4 + i}) ---"
        single = _ok("--run", runs["text"], "--prompt", "the", "--max-bytes", 16, "--seed", 4 + i)
        assert text.rstrip("\n") == single.stdout.rstrip("\n")
    assert "aggregate over 3 streams" in many.stderr and "seeds 4..6" in many.stderr


def test_text_streams_to_a_folder_and_streamed_stdout(runs, tmp_path):
    _ok(
        "--run",
        runs["text"],
        "--prompt-file",
        runs["txt"],
        "--max-bytes",
        21,
        "--seed",
        9,
        "--num-samples",
        2,
        "--out",
        tmp_path / "many",
    )
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["sample-000.txt", "sample-001.txt"]
    for i in range(2):
        _ok(
            "--run",
            runs["text"],
            "--prompt-file",
            runs["txt"],
            "--max-bytes",
            21,
            "--seed",
            9 + i,
            "--out",
            tmp_path / f"one-{i}.txt",
        )
        data = (tmp_path / f"one-{i}.txt").read_bytes()
        assert data.startswith(b"the cat ") and len(data) == 8 + 21
        assert (tmp_path / "many" / f"sample-00{i}.txt").read_bytes() == data
    streamed = _ok("--run", runs["text"], "--prompt", "the", "--max-bytes", 30, "--seed", 2, "--stream")
    plain = _ok("--run", runs["text"], "--prompt", "the", "--max-bytes", 30, "--seed", 2)
    assert streamed.stdout == plain.stdout and streamed.stdout.startswith("the")


def _frames(path):
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE)
        return w.getnframes(), w.readframes(w.getnframes())


def test_streamed_wav_is_valid_after_every_chunk(runs, tmp_path, monkeypatch):
    """While it is generated, the WAV on disk parses with the standard library's `wave` after every
    chunk and holds exactly the samples written so far; the final file holds prompt + sample."""
    pytest.importorskip("soundfile")  # the prompt is read through soundfile
    from haed import audio

    seen = []
    write = audio.WavWriter.write

    def checked_write(self, codes):
        write(self, codes)
        frames, _ = _frames(self.path)
        seen.append(frames)
        assert frames == self.frames

    monkeypatch.setattr(audio.WavWriter, "write", checked_write)
    monkeypatch.chdir(tmp_path)
    r = _ok("--run", runs["audio"], "--prompt-file", runs["wav"], "--seconds", 0.35, "--seed", 1)
    assert seen == [30, 130, 230, 330, 380]  # the prompt, then 0.1 s chunks of 100 samples and the rest
    assert _frames(tmp_path / "sample.wav")[0] == 380
    assert "real-time factor" in r.stderr and "wrote sample.wav" in r.stderr


def test_audio_streams_are_files_equal_to_single_runs(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _ok("--run", runs["audio"], "--max-bytes", 150, "--seed", 3, "--num-samples", 2, "--out", "many")
    assert "aggregate over 2 streams" in r.stderr and "for all 2" in r.stderr
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["sample-000.wav", "sample-001.wav"]
    for i in range(2):
        _ok("--run", runs["audio"], "--max-bytes", 150, "--seed", 3 + i, "--out", f"one-{i}.wav")
        frames, data = _frames(tmp_path / "many" / f"sample-00{i}.wav")
        assert frames == 150 and _frames(tmp_path / f"one-{i}.wav") == (frames, data)
    _ok("--run", runs["audio"], "--max-bytes", 20, "--num-samples", 3)  # default: sample-000.wav .. here
    assert all((tmp_path / f"sample-00{i}.wav").is_file() for i in range(3))


def test_generate_names_the_checkpoint_and_takes_another(runs):
    result = _ok("--run", runs["text"], "--prompt", "the ", "--max-bytes", "8", "--checkpoint", "last")
    assert "weights " in result.stderr and "step-000004" in result.stderr
    assert "best" in _ok("--run", runs["text"], "--prompt", "the ", "--max-bytes", "8").stderr
    bad = _invoke("--run", runs["text"], "--prompt", "the ", "--checkpoint", "step-999")
    assert bad.exit_code == 1 and "no checkpoint step-999" in bad.stderr
