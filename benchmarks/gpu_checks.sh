#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one command (a lent GPU's time is short):
#   1. the CUDA tests of the fused kernels (tests/test_ops_*.py run their GPU cases);
#   2. benchmarks/kernels.py: fused vs unfused anchor_pool / mask_guided_attention;
#   3. benchmarks/throughput.py, when present: images/s per family at batch 1 and 32;
#   4. benchmarks/shapes_gpu_probe.sh: tiny-CLIP pretraining, DeOP stage, shapes table.
# Logs and small results go to $OUT (default runs/gpu_checks); each step has a time limit.
#
#   OUT=/tmp/out bash benchmarks/gpu_checks.sh [steps...]   # steps: tests kernels throughput shapes
set -uo pipefail
OUT=${OUT:-runs/gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
steps=${*:-tests kernels throughput shapes}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

for step in $steps; do
  start=$(date +%s)
  case $step in
    tests)
      timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_ops_anchor_pool.py \
        tests/test_ops_mask_attention.py 2>&1 | tail -n 15 > "$OUT/gpu_tests.log" ;;
    kernels)
      timeout 150 python3 benchmarks/kernels.py --repeat 20 > "$OUT/kernels.log" 2>&1 ;;
    throughput)
      [ -f benchmarks/throughput.py ] && timeout 150 python3 benchmarks/throughput.py \
        --device cuda --size 512 > "$OUT/throughput.log" 2>&1 ;;
    shapes)
      PROBE=${PROBE:-/tmp/shapes_probe}
      OUT=$(dirname "$PROBE") bash benchmarks/shapes_gpu_probe.sh > "$OUT/shapes_probe.log" 2>&1
      probe="$(dirname "$PROBE")/shapes_gpu_probe"
      cp "$probe/demo/summary.json" "$OUT/shapes_summary.json" 2>/dev/null
      cp "$probe/demo/model/model.safetensors" "$OUT/demo_model.safetensors" 2>/dev/null
      cp "$probe/demo/model/config.json" "$OUT/demo_config.json" 2>/dev/null ;;
  esac
  echo "[$step] exit $? in $(( $(date +%s) - start )) s" | tee -a "$OUT/steps.txt"
done
