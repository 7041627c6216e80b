#!/usr/bin/env bash
# Device call 3 (nvidia-h100-x1, 2026-11-23 session 2): CUDA-only tests, generation speed with and
# without CUDA graphs, and where the time of a training step goes (torch.profiler), before/after the
# embedding-backward gather. Carry .whl and .dev (.dev/enwik8-head, .dev/audio-weights).
set -u
source benchmarks/device_setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
echo "== CUDA tests"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_generate.py tests/test_model.py tests/test_iem.py 2>&1 | tail -n 4
echo "== generation"
timeout 170 python3 benchmarks/generation_speed.py --model audio=.dev/audio-weights \
  --model text=docs/gpu-2026-11-23/text-config.json --out $OUT/generation --wav audio --bytes 3000 2>&1 | tail -n 8
echo "== training step: eager, legacy gather vs embedding gather"
for g in --legacy-gather ""; do
  timeout 100 python3 benchmarks/trace_step.py --dataset .dev/enwik8-head --objectives iem,full --no-compile $g \
    --out $OUT/trace 2>&1 | grep -v Warning | tail -n 3
done
echo "== training step: compiled"
timeout 300 python3 benchmarks/trace_step.py --dataset .dev/enwik8-head --objectives iem,decoder,full \
  --out $OUT/trace 2>&1 | grep -v Warning | tail -n 4
timeout 100 python3 benchmarks/trace_step.py --dataset .dev/enwik8-head --objectives iem --set main.checkpoint=true \
  --out $OUT/trace-ckpt 2>&1 | grep -v Warning | tail -n 2
