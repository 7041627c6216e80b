"""Sample a WAV on the CPU from the FSDD run trained on the H100 (weights fetched in bf16 shards).

The device session's time ran out before a WAV could be written there (soundfile is not on the GPU
image), so the run's decoder-phase weights came back as bf16 safetensors shards plus config.json:

    python benchmarks/audio_sample_cpu.py .dev/audio-weights docs/gpu-2026-11-23/audio-sample.wav --seconds 2.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from haed.audio import write_wav  # noqa: E402
from haed.generate import generate  # noqa: E402
from generation_speed import load as load_weights  # noqa: E402  (this folder; weight shards + audio-config.json)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("weights", type=Path, help="folder with w*.safetensors shards and audio-config.json")
    p.add_argument("out", type=Path)
    p.add_argument("--seconds", type=float, default=2.5)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    model, recipe, config, _ = load_weights(a.weights, torch.device("cpu"))
    sr = config["dataset"]["sample_rate"]
    torch.set_num_threads(2)
    t = time.perf_counter()
    g = generate(model, b"", int(a.seconds * sr), temperature=1.0, top_p=1.0, seed=a.seed, context_bytes=recipe.data.seq_len)
    write_wav(a.out, list(g.output), sr)
    print(json.dumps({"samples": len(g.output), "seconds_of_audio": len(g.output) / sr, "wall_s": time.perf_counter() - t,
                      "samples_per_second": g.bytes_per_second, "device": "cpu"}))


if __name__ == "__main__":
    main()
