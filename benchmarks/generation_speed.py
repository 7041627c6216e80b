"""Generation speed and samples on the device: warm up, time, then write a text sample and a WAV.

    python3 benchmarks/generation_speed.py --text-run RUN --audio-run RUN --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from haed.generate import generate, load_for_sampling  # noqa: E402


def timed(model, prompt: bytes, n: int, seed: int = 0, **kw):
    generate(model, prompt, 16, seed=seed, **kw)  # warm-up: kernels loaded, caches allocated
    return generate(model, prompt, n, seed=seed, **kw)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--text-run", type=Path)
    p.add_argument("--audio-run", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--audio-seconds", type=float, default=3.0)
    p.add_argument("--budget-s", type=float, default=60.0, help="longest audio generation allowed")
    a = p.parse_args()
    results = {}
    if a.text_run:
        model, recipe, config, _ = load_for_sampling(a.text_run, "cuda")
        g = timed(model, b"<page>\n    <title>", 1000, temperature=0.8, top_p=0.95, context_bytes=recipe.data.seq_len)
        (a.out / "text-sample.txt").write_bytes(g.prompt + g.output)
        results["text"] = {"bytes": len(g.output), "seconds": g.seconds, "bytes_per_second": g.bytes_per_second}
        print(f"text: {g.bytes_per_second:,.0f} bytes/s")
    if a.audio_run:
        from haed.audio import write_wav

        model, recipe, config, _ = load_for_sampling(a.audio_run, "cuda")
        sr = config["dataset"]["sample_rate"]
        probe = timed(model, b"", 400, temperature=1.0, top_p=1.0, context_bytes=recipe.data.seq_len)
        seconds = min(a.audio_seconds, probe.bytes_per_second * a.budget_s / sr)
        g = generate(model, b"", int(seconds * sr), seed=1, temperature=1.0, top_p=1.0, context_bytes=recipe.data.seq_len)
        write_wav(a.out / "audio-sample.wav", list(g.output), sr)
        results["audio"] = {"samples": len(g.output), "seconds_of_audio": len(g.output) / sr, "seconds": g.seconds,
                            "samples_per_second": g.bytes_per_second}
        print(f"audio: {g.bytes_per_second:,.0f} samples/s, {len(g.output) / sr:.2f} s of audio")
    (a.out / "generation.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
