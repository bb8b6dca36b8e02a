#!/usr/bin/env bash
# Shapes world on a CUDA machine, in about 6 minutes on one H200 (16 CPU cores):
#   1. the tiny CLIP (conv stem) pretrained for the recipe's default 2000 steps, then
#      evaluate_tiny_clip (zero-shot and region accuracy, seen / unseen, +- severance);
#   2. the DeOP stage of the recipe on that CLIP (proposals 1000 steps, DeOP heads 800
#      steps, CLIP frozen; default sizes), evaluated on 100 fresh scenes;
#   3. benchmarks/shapes.py (DeOP, two-stream, training-free rows) on 60 fresh scenes (CPU).
# Every number is printed with its wall time; all outputs stay under $OUT (or ./runs).
#
#   bash benchmarks/shapes_gpu_probe.sh            # from the repository root
#
# Scene rendering is numpy on the CPU: the CLIP's loader renders whole steps in
# CLIP_WORKERS processes (2000 steps x 128 scenes ~ 1300 core-seconds).
set -euo pipefail
OUT=${OUT:-runs}/shapes_gpu_probe
CLIP_WORKERS=${CLIP_WORKERS:-14}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # per process; the loader workers are the parallelism
mkdir -p "$OUT"
python -c "import torch; assert torch.cuda.is_available(), 'needs CUDA'; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

stamp() { date +%s.%N; }
report() { python -c "import sys; print(f'[time] {sys.argv[1]}: {float(sys.argv[3]) - float(sys.argv[2]):.1f} s')" "$@"; }

t0=$(stamp)
# a run cut short by the timeout resumes from its last checkpoint when the script is rerun
timeout 200 python -m onepass_ovs.toy.clip --output "$OUT/clip" --steps 2000 --device cuda \
    --num-workers "$CLIP_WORKERS" --checkpoint-every 500 --resume --no-progress
t1=$(stamp); report "tiny CLIP: 2000 steps + evaluate_tiny_clip" "$t0" "$t1"
test -f "$OUT/clip/open_clip_model.safetensors"
tail -n 3 "$OUT/clip/train_log.jsonl"

timeout 150 python -m onepass_ovs.toy.build --output "$OUT/demo" --clip "$OUT/clip" \
    --device cuda --num-eval 100 --no-progress > "$OUT/build.log" 2>&1 || { tail -n 30 "$OUT/build.log"; exit 1; }
grep -v '^ *[{}"]' "$OUT/build.log" | head -n 40
t2=$(stamp); report "DeOP stage (proposals 1000 + heads 800 steps, eval 100 scenes)" "$t1" "$t2"
python -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps({'steps': {k: {x: v[x] for x in ('seconds','metrics','train') if x in v} for k, v in d['steps'].items()}, 'models': d['models']}, indent=1))" "$OUT/demo/summary.json"

timeout 120 python benchmarks/shapes.py --model "$OUT/demo/model" --num 60 --threads 8 --markdown
t3=$(stamp); report "benchmarks/shapes.py (60 scenes, CPU, 8 threads)" "$t2" "$t3"
report "total" "$t0" "$t3"
