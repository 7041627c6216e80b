#!/usr/bin/env bash
# Device call 7 (nvidia-h100-x1, 2026-11-23 session 2): the issue-4 sweep and the peer in one call,
# after padding the distinct-patch count to multiples of 512 (recurring shapes for cuBLAS and the
# compiled encoder). Same configuration as call 5; then IEM without recompute at seq 8192.
# Carry .whl and .dev/enwik8-head.
set -u
source benchmarks/device_setup.sh || exit 1
# a real executable (not a shell function), so that `timeout` can run it
mkdir -p /tmp/bin; printf '#!/bin/sh\nexec python3 -c "from haed_cli.main import app; app()" "$@"\n' > /tmp/bin/haed
chmod +x /tmp/bin/haed; export PATH=/tmp/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
echo "== haed sweep"
timeout 300 haed profile-memory --recipe enwik8 --compare-full --seq-lens 2048,4096,8192,16384 --batch-sizes 16 \
  --dataset .dev/enwik8-head --json $OUT/haed-sweep.json --plot $OUT/haed-sweep.png > $OUT/haed-sweep.log 2>&1
grep -v Warn $OUT/haed-sweep.log | tail -n 22
echo "== peer"
timeout 60 python3 benchmarks/megabyte_peer.py --data .dev/enwik8-head --seq-lens 2048,4096,8192,16384 --batch-sizes 16 \
  --json $OUT/peer-seq.json --no-progress 2>&1 | tail -n 7
echo "== IEM without recompute, seq 8192"
timeout 90 haed profile-memory --recipe enwik8 --objectives iem --set iem.recompute= --seq-lens 8192 --batch-sizes 16 \
  --dataset .dev/enwik8-head --json $OUT/iem-norecompute-8k.json --plot $OUT/iem-norecompute-8k.png 2>&1 | grep "│ iem"
