#!/usr/bin/env bash
# Device call 4 (nvidia-h100-x1, 2026-11-23 session 2): after turning cuDNN attention off, rotary in
# the projection's layout, compiled chunk softmax: CUDA tests, generation, step times and profiles.
# Carry .whl, .dev/enwik8-head, .dev/audio-weights.
set -u
source benchmarks/device_setup.sh || exit 1
echo "== CUDA tests"
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_generate.py tests/test_model.py tests/test_iem.py 2>&1 | grep -v "^\.\|Warning" | tail -n 40
echo "== attention over short sequences"
timeout 120 python3 benchmarks/attention_small.py --json $OUT/attention-small.json 2>&1 | grep -v Warn | tail -n 16
echo "== generation"
timeout 150 python3 benchmarks/generation_speed.py --model audio=.dev/audio-weights \
  --model text=docs/gpu-2026-11-23/text-config.json --out $OUT/generation --wav audio --bytes 3000 2>&1 | tail -n 8
echo "== training step: compiled"
timeout 280 python3 benchmarks/trace_step.py --dataset .dev/enwik8-head --objectives iem,decoder,full \
  --out $OUT/trace 2>&1 | grep -v Warning | grep "^{" 
timeout 100 python3 benchmarks/trace_step.py --dataset .dev/enwik8-head --objectives iem --set iem.recompute=main \
  --out $OUT/trace-recompute 2>&1 | grep "^{"
