#!/usr/bin/env bash
# The demo (config/demo.yaml: 32 px views, 75 epochs, 600 steps) with and without a resolution ramp,
# three seeds each, then the demo's linear evaluation (at 32 px) of each encoder.
#   fixed:  32 px throughout;
#   ramp:   23 px (0.72 of 32, as 160 is of 224) until epoch 56, 32 px from epoch 57: the ramp runs
#           over epochs 55-65 and its 16 px rounding leaves one step (FFCV's ResNet-50 proportions:
#           the low side for ~3/4 of training);
#   ramp16: 16 px until epoch 59, 32 px from 60 (half the side), seed 0 only.
# A run whose linear results exist is skipped. Results: $OUT/summary.txt, $OUT/*/linear/results.json.
# Usage (repository root, after make install): bash benchmarks/ramp_demo_study.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/ramp_study}
mkdir -p "$OUT"
one() {  # one ARM SEED OVERRIDES...
  local arm=$1 seed=$2 run=$OUT/${1}_s$2; shift 2
  [ -f "$run/linear/results.json" ] && return 0
  local start=$(date +%s)
  OMP_NUM_THREADS=1 $PY -m byol_fast.train --config config/demo.yaml --seed=$seed --out_dir=$run \
    --monitor.knn_every=0 "$@" > $run.train.log 2>&1
  echo "$arm seed $seed pretrain $(( $(date +%s) - start )) s" | tee -a $OUT/times.txt
  OMP_NUM_THREADS=1 $PY -m byol_fast.linear_eval --config config/linear_demo.yaml --checkpoint $run/last.pt \
    --out_dir=$run/linear > $run.linear.log 2>&1
  $PY -c "import json; r=json.load(open('$run/linear/results.json'))['final']; print('$arm', $seed, 'top1', r['top1'], 'top5', r['top5'])" | tee -a $OUT/summary.txt
}
for seed in 0 1 2; do
  one fixed $seed
  one ramp $seed --data.start_image_size=23 --data.ramp_start_epoch=55 --data.ramp_end_epoch=65
done
one ramp16 0 --data.start_image_size=16 --data.ramp_start_epoch=55 --data.ramp_end_epoch=65
# The train/test resolution gap: every encoder above evaluated again at 23 px (resize 27), the side
# the ramped encoders saw for most of their training.
for run in "$OUT"/fixed_s? "$OUT"/ramp_s?; do
  [ -f "$run/linear23/results.json" ] && continue
  OMP_NUM_THREADS=1 $PY -m byol_fast.linear_eval --config config/linear_demo.yaml --checkpoint $run/last.pt \
    --data.image_size=23 --data.resize=27 --out_dir=$run/linear23 > $run.linear23.log 2>&1
  $PY -c "import json; r=json.load(open('$run/linear23/results.json'))['final']; print('$(basename $run) at 23 px', 'top1', r['top1'])" | tee -a $OUT/summary.txt
done
