#!/usr/bin/env bash
# The CPU tables of docs/benchmarks.md, one after another (run on an otherwise idle
# machine: every number is a wall time). Each step's output goes to $OUT/<step>.log.
#
#   OUT=runs/cpu_tables bash benchmarks/cpu_tables.sh [steps...]
#   steps: large_vocab sed sed_rejection gkc_speed shapes   (default: all)
#   GKC_ABLATIONS=runs/demo-gkc/ablations   adds the GKC ablation rows to the shapes table
set -uo pipefail
OUT=${OUT:-runs/cpu_tables}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
steps=${*:-large_vocab sed sed_rejection gkc_speed shapes}
python3 -c "import platform, torch; print(platform.processor() or platform.machine(), 'torch', torch.__version__, 'threads', torch.get_num_threads())" | tee "$OUT/machine.txt"
uptime | tee -a "$OUT/machine.txt"

for step in $steps; do
  start=$(date +%s)
  case $step in
    large_vocab)   python3 benchmarks/large_vocab.py --repeat 5 --threads 1 ;;
    sed)           python3 benchmarks/sed.py --model sed-convnext-b --size 640 --classes 20,150,847 --repeat 2 ;;
    sed_rejection) python3 benchmarks/sed_rejection.py --classes 847 --num 100 --repeat-scenes 20 ;;
    gkc_speed)     python3 benchmarks/gkc_speed.py --size 512 --repeat 3 ;;
    shapes)        python3 benchmarks/shapes.py --num 300 --markdown \
                     ${GKC_ABLATIONS:+--gkc-ablations "$GKC_ABLATIONS"} ;;
    *) echo "unknown step $step" >&2; continue ;;
  esac > "$OUT/$step.log" 2>&1
  echo "$step: exit $? in $(( $(date +%s) - start )) s -> $OUT/$step.log"
done
