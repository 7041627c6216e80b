#!/usr/bin/env bash
# Device call 5 (nvidia-h100-x1, 2026-11-23 session 2): the issue-4 sweep and the peer in one call.
# haed at the matched configuration (recipes/enwik8.toml: main 12x768, K=8, decoder 4x256; IEM with
# the recipe's default recompute of the main model), compiled, real enwik8 bytes, seq 2k..16k, batch
# 16; then MEGABYTE-pytorch 0.3.6 on the same windows. Carry .whl and .dev/enwik8-head.
set -u
source benchmarks/device_setup.sh || exit 1
# a real executable (not a shell function), so that `timeout` can run it
mkdir -p /tmp/bin; printf '#!/bin/sh\nexec python3 -c "from haed_cli.main import app; app()" "$@"\n' > /tmp/bin/haed
chmod +x /tmp/bin/haed; export PATH=/tmp/bin:$PATH
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
echo "== CUDA tests"
# (tests ran in the call before)
# timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_generate.py tests/test_model.py tests/test_iem.py 2>&1 | tail -n 2
echo "== haed sweep"
timeout 330 haed profile-memory --recipe enwik8 --compare-full --seq-lens 2048,4096,8192,16384 --batch-sizes 16 \
  --dataset .dev/enwik8-head --json $OUT/haed-sweep.json --plot $OUT/haed-sweep.png 2>&1 | grep -v Warn | tail -n 30
echo "== peer"
timeout 150 python3 benchmarks/megabyte_peer.py --data .dev/enwik8-head --seq-lens 2048,4096,8192,16384 --batch-sizes 16 \
  --json $OUT/peer-seq.json --no-progress 2>&1 | tail -n 8
