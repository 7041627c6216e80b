#!/usr/bin/env bash
# Device call 6 (nvidia-h100-x1, 2026-11-23 session 2): generation speed (CUDA graphs vs eager) with
# the FSDD speech model's weights and a WAV; IEM without recompute over the issue-4 sweep (with
# recompilations logged); a profiler table of an IEM step at seq 2048, where the step is host-bound.
# Carry .whl, .dev/enwik8-head, .dev/audio-weights.
set -u
source benchmarks/device_setup.sh || exit 1
# a real executable (not a shell function), so that `timeout` can run it
mkdir -p /tmp/bin; printf '#!/bin/sh\nexec python3 -c "from haed_cli.main import app; app()" "$@"\n' > /tmp/bin/haed
chmod +x /tmp/bin/haed; export PATH=/tmp/bin:$PATH
echo "== generation"
timeout 100 python3 benchmarks/generation_speed.py --model audio=.dev/audio-weights \
  --model text=docs/gpu-2026-11-23/text-config.json --out $OUT/generation --wav audio --bytes 3000 2>&1 | tail -n 6
echo "== IEM without recompute"
TORCH_LOGS=recompiles timeout 170 haed profile-memory --recipe enwik8 --objectives iem --set iem.recompute= \
  --seq-lens 2048,4096,8192,16384 --batch-sizes 16 --dataset .dev/enwik8-head \
  --json $OUT/iem-norecompute.json --plot $OUT/iem-norecompute.png > $OUT/iem-norecompute.log 2>&1
grep -v Warn $OUT/iem-norecompute.log | tail -n 12; grep -c "Recompiling" $OUT/iem-norecompute.log
echo "== IEM step profile at seq 2048"
timeout 120 python3 benchmarks/trace_step.py --dataset .dev/enwik8-head --objectives iem --seq-len 2048 \
  --out $OUT/trace 2>&1 | grep "^{"
