#!/usr/bin/env bash
# Device call 1 (nvidia-h100-x1): CUDA smoke test of the whole pipeline, then the memory/speed
# sweep of haed's objectives and of the MEGABYTE-pytorch peer at the matched configuration.
# Run by the `device` tool from the repository root with .whl and .dev carried; writes to $OUT.
set -u
source benchmarks/device_setup.sh || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
haed() { python3 -c "from haed_cli.main import app; app()" "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, matplotlib; print('torch', torch.__version__, 'matplotlib', matplotlib.__version__)" 2>&1 | tee -a $OUT/gpu.txt

echo "== smoke: tiny recipe on the enwik8 head, CUDA, compiled"
W=/tmp/smoke
time (
haed train-iem --recipe tiny --dataset .dev/enwik8-head --out $W --steps 40 --set iem.eval_every=20 --set iem.compile=true &&
haed train-decoder --run $W --steps 20 --set decoder.compile=true &&
haed evaluate --run $W --max-bytes 50000 &&
haed generate --run $W --prompt "<page>" --max-bytes 200 ) > $OUT/smoke.log 2>&1
echo "smoke rc=$?"; tail -n 25 $OUT/smoke.log

echo "== sweep: haed, no compile"
haed profile-memory --recipe enwik8 --compare-full --objectives iem,decoder,full,flat \
  --seq-lens 2048,4096,8192,16384 --batch-sizes 16 --dataset .dev/enwik8-head --no-compile \
  --json $OUT/haed-seq-nocompile.json --plot $OUT/haed-seq-nocompile.png 2>&1 | tail -n 40
echo "== sweep: haed, compiled, seq 8192"
haed profile-memory --recipe enwik8 --compare-full --objectives iem,decoder,full \
  --seq-lens 8192 --batch-sizes 16 --dataset .dev/enwik8-head \
  --json $OUT/haed-batch-compile.json --plot $OUT/haed-batch-compile.png 2>&1 | tail -n 30
echo "== peer"
python3 benchmarks/megabyte_peer.py --data .dev/enwik8-head --seq-lens 2048,4096,8192,16384 --batch-sizes 16 \
  --json $OUT/peer-seq.json 2>&1 | tail -n 15
python3 benchmarks/megabyte_peer.py --data .dev/enwik8-head --seq-lens 8192 --batch-sizes 4,8 \
  --json $OUT/peer-batch.json 2>&1 | tail -n 10
