#!/usr/bin/env bash
# Device call 2 (nvidia-h100-x1): the enwik8-head text run and the FSDD audio run, IEM + decoder
# phase, exact test evaluation, and generation speed. Datasets prepared on the CPU machine:
#   haed prepare text ../shared/data/enwik8-head-3600000 --out .dev/enwik8-head --valid-fraction 0.05 --test-fraction 0.05
#   haed prepare audio ../shared/data/fsdd --out .dev/fsdd --sample-rate 8000 --split-rule fsdd
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
mkdir -p /tmp/bin; printf '#!/bin/sh\nexec python3 -c "from haed_cli.main import app; app()" "$@"\n' > /tmp/bin/haed
chmod +x /tmp/bin/haed; export PATH=/tmp/bin:$PATH
T=/tmp/runs
TEXT="--set model.patch_size=4 --set data.seq_len=4096 --set main.dim=512 --set main.layers=8 --set main.heads=8
 --set main.dropout=0.15 --set encoder.dim=128 --set model.decoder.dim=256 --set model.decoder.layers=3
 --set iem.lr=1e-3 --set iem.warmup_steps=100 --set iem.eval_every=500 --set iem.ckpt_every=250 --set iem.compile=false
 --set decoder.lr=1e-3 --set decoder.eval_every=200 --set decoder.ckpt_every=100 --set decoder.compile=false"
echo "== text: enwik8 head"
timeout 170 haed train-iem --recipe enwik8 --dataset .dev/enwik8-head --out $T/text $TEXT --steps 2000 2>&1 | tail -n 4
timeout 70 haed train-decoder --run $T/text --steps 400 2>&1 | tail -n 3
haed evaluate --run $T/text --split test --json $OUT/text-eval.json 2>&1 | tail -n 6
cp $T/text/metrics.jsonl $OUT/text-iem-metrics.jsonl; cp $T/text/decoder/metrics.jsonl $OUT/text-decoder-metrics.jsonl
cp $T/text/config.json $OUT/text-config.json
echo "== audio: FSDD"
AUDIO="--set iem.eval_every=200 --set iem.ckpt_every=200 --set iem.compile=false --set decoder.ckpt_every=100
 --set decoder.eval_every=100 --set decoder.compile=false"
timeout 140 haed train-iem --recipe speech --dataset .dev/fsdd --out $T/audio $AUDIO --steps 800 2>&1 | tail -n 4
timeout 60 haed train-decoder --run $T/audio --steps 200 2>&1 | tail -n 3
haed evaluate --run $T/audio --split test --json $OUT/audio-eval.json 2>&1 | tail -n 6
cp $T/audio/metrics.jsonl $OUT/audio-iem-metrics.jsonl; cp $T/audio/decoder/metrics.jsonl $OUT/audio-decoder-metrics.jsonl
echo "== generation"
timeout 150 python3 benchmarks/generation_speed.py --text-run $T/text --audio-run $T/audio --out $OUT 2>&1 | tail -n 20
