#!/usr/bin/env bash
# The GPU checks of a lent machine in one place: bash benchmarks/gpu_checks.sh PART...
#   tests   nvidia-smi and the GPU tests (pytest -m gpu)
#   demo    the demo pretraining (config/demo.yaml) on the GPU data path
#   r50     a short ResNet-50 224 px run on ImageNet-like JPEGs: img/s and peak memory
#   bench   benchmarks/throughput.py, full, with linear evaluation
#   tune    what moves the numbers: compile, batch, hardware decoder load, DALI threads, prefetch
# Figures go under $OUT (default benchmarks/out/). PY picks the interpreter (default python).
set -u
OUT=${OUT:-benchmarks/out}
PY=${PY:-python}
mkdir -p "$OUT"
IMAGES=bench_data/imagenet_like_n4000_s0_v1

ensure_images() { [ -d "$IMAGES/train" ] || $PY benchmarks/imagenet_like.py --num-images 4000 >&2; }
bench() {  # bench NAME ARGS...: one throughput run, JSON and log under $OUT
  local name=$1; shift
  echo "== throughput $name: $*"
  timeout ${BENCH_TIMEOUT:-280} $PY benchmarks/throughput.py --json "$OUT/$name.json" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.err"
  echo "rc=$?"; sed -n '/^## Throughput/,$p' "$OUT/$name.txt" | head -30
}

for part in "$@"; do
  case $part in
    tests)
      nvidia-smi | tee "$OUT/nvidia-smi.txt"
      $PY -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest-gpu.txt" ;;
    demo)
      $PY -m byol_fast.data demo data/demo || exit 2  # made if missing; one of other parameters stops here
      /usr/bin/time -v timeout 300 $PY -m byol_fast.train --config config/demo.yaml --out_dir="$OUT/demo" \
        --reader.decode=gpu 2>&1 | grep -E "epoch|done|rror|Elapsed|Maximum resident" | tail -12 | tee "$OUT/demo.txt" ;;
    r50)
      ensure_images
      timeout 300 $PY -m byol_fast.train --config config/byol_r50_in1k_300ep.yaml --data.path="$IMAGES/train" \
        --optim.batch_size=256 --max_steps=60 --log_every=10 --out_dir="$OUT/r50" --reader.num_threads=8 \
        2>&1 | grep -E "step|done|rror" | tail -10 | tee "$OUT/r50.txt" ;;
    bench)
      ensure_images
      BENCH_TIMEOUT=540 bench full --linear --windows 3 --plot "$OUT/full.png" ;;
    tune)
      ensure_images
      bench batch384 --stages model,e2e-dali --batch 384
      bench compile --stages model,e2e-dali --compile
      bench hw0 --stages dali --hw-decoder-load 0.0
      bench hw100 --stages dali --hw-decoder-load 1.0
      bench threads4 --stages dali,e2e-dali --threads 4
      bench prefetch4 --stages e2e-dali --prefetch 4 ;;
    *) echo "unknown part $part" >&2; exit 2 ;;
  esac
done
