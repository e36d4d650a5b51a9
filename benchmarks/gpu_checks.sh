#!/usr/bin/env bash
# The GPU suite of a lent machine, in one command:
#
#   bash benchmarks/gpu_checks.sh
#
# Within SUITE_SECONDS (default 470: an 8-minute command on one H100/H200 with 16 cores), every
# stage time-boxed with timeout(1); a stage that runs out of time says so and the suite goes on:
#   1. nvidia-smi, the ImageNet-like JPEGs (benchmarks/imagenet_like.py), pytest -m gpu (90 s);
#   2. one benchmarks/throughput.py process for every figure, so that ratios are measured side by
#      side (one Python + CUDA start-up, one index): the BYOL step alone on synthetic tensors
#      (ResNet-50 224 px) eager at batch 256, 384 and 512 (an OOM is recorded, not fatal) and
#      compiled (default mode; max-autotune-no-cudagraphs last, with whatever time is left); the DALI
#      two-view pipeline alone at hardware-decoder load 0.65 and 1.0; end to end, DALI -> the fastest
#      step measured, with its data-wait fraction; the same DALI pipeline (load 0.65) reading the same
#      images as a shard set (packed once, its MB/s; shards / files); the torchvision/PIL
#      DataLoader on the same cores;
#      linear evaluation's step and end to end; the checkpoint pause; peak GPU memory of each; the
#      step and end to end at 160 and 192 px, and from them benchmarks/ramp_projection.py's wall time
#      of 300 epochs with and without a 160 -> 224 px resolution ramp;
#   3. benchmarks/gpu_table.py: the short table, printed LAST, with the targets beside the figures.
# Every figure lands as JSON under $OUT (default benchmarks/out): throughput.json, summary.json,
# suite.jsonl (each shell stage's exit status and seconds), with the logs beside them.
#
# SUITE_QUICK=1: the same suite on the CPU with tiny sizes (ResNet-18 at 64 px, a few dozen images),
# a dry run of a few minutes on a 2-core machine. PY picks the interpreter (default: .venv/bin/python
# if there is one, else python3). SUITE_ARGS: extra throughput.py arguments (config overrides too).
#
# The older parts still run by name: bash benchmarks/gpu_checks.sh tests|demo|r50|bench|tune ...
# ("suite" is the no-argument run).
#
# No `set -e`: a failing stage must not stop the others; each one's status is recorded instead.
set -u
cd "$(dirname "$0")/.." || exit 2  # the repository root, from wherever it is called
OUT=${OUT:-benchmarks/out}
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3 || command -v python); fi
fi
QUICK=${SUITE_QUICK:-0}
mkdir -p "$OUT"

T0=$SECONDS
left() { echo $(( SUITE_SECONDS - (SECONDS - T0) )); }

# boxed NAME LIMIT CMD...: run CMD under timeout(1) (SIGTERM at LIMIT s, SIGKILL 10 s later), its
# output in $OUT/NAME.log, and one line {stage, rc, seconds, limit_s} in $OUT/suite.jsonl.
boxed() {
  local name=$1 limit=$2 t=$SECONDS rc; shift 2
  echo "== $name (time box ${limit} s): $*" >&2
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '{"stage": "%s", "rc": %d, "seconds": %d, "limit_s": %d}\n' "$name" "$rc" $((SECONDS - t)) "$limit" \
    >> "$OUT/suite.jsonl"
  case $rc in
    0) echo "   ok in $((SECONDS - t)) s" >&2 ;;
    124|137) echo "   TIMED OUT after $limit s (the suite goes on)" >&2 ;;
    *) echo "   exit status $rc after $((SECONDS - t)) s (the suite goes on); last lines:" >&2
       tail -5 "$OUT/$name.log" >&2 ;;
  esac
  return $rc
}

suite() {
  rm -f "$OUT/suite.jsonl" "$OUT/throughput.json"  # this run's figures only
  local images stages common
  if [ "$QUICK" = 1 ]; then
    SUITE_SECONDS=${SUITE_SECONDS:-300}
    images=96
    # ResNet-18 at 32 px, batch 8, a small projector: each BYOL step a fraction of a second on 2
    # cores (also when other work shares them); two warm-up steps, compiled stages included.
    common=(--device cpu --backbone resnet18 --image-size 32 --batch 8 --windows 2 --window-seconds 0.5
            --warmup 2 --stage-reserve 8 --checkpoint-repeats 2 --model.projector_hidden=256
            --model.predictor_hidden=256)
    stages="model:timeout=40,model:loss=pixpro:timeout=30,model:batch=12:timeout=40,model:batch=16:timeout=40"
    stages+=",model:compile=default:timeout=60,dali:hw=0.65:timeout=20,dali:hw=1.0:timeout=20"
    stages+=",e2e-dali:step=best:timeout=40,shards:hw=0.65:timeout=20,torchvision:windows=1:timeout=30"
    stages+=",linear:timeout=20"
    stages+=",e2e-linear:timeout=20,checkpoint:timeout=30,model:backbone=resnet50x2:batch=2:timeout=20"
    stages+=",model:compile=max-autotune-no-cudagraphs:timeout=rest"
  else
    SUITE_SECONDS=${SUITE_SECONDS:-470}
    images=4000
    common=(--device cuda --windows 3 --window-seconds 2)
    # Order: the eager step first (batch 256, then the largest that fits), the compiled one (its
    # compile is the long part), the loaders, end to end on the fastest step so far, then the rest
    # (the shard set first: its packing takes seconds, its figure is compared with dali:hw=0.65);
    # max-autotune-no-cudagraphs, whose autotuning can take minutes, last with what is left.
    # Torchvision at batch 64: its img/s is per-image CPU work, so one round of 16 workers x 256-image
    # batches would take a large share of its box; 64 keeps whole rounds inside it.
    stages="model:timeout=60,model:loss=pixpro:timeout=45,model:batch=384:timeout=45,model:batch=512:timeout=45"
    stages+=",model:compile=default:timeout=180,dali:hw=0.65:timeout=40,dali:hw=1.0:timeout=40"
    stages+=",e2e-dali:step=best:timeout=75,shards:hw=0.65:timeout=30,torchvision:batch=64:windows=2:timeout=60"
    stages+=",linear:timeout=40"
    stages+=",e2e-linear:timeout=45,checkpoint:timeout=60"
    # The resolution ramp's smaller sides (224 px is measured above): the step and end to end, for
    # benchmarks/ramp_projection.py's 300-epoch wall time with and without a 160 -> 224 ramp.
    stages+=",model:size=160:timeout=30,model:size=192:timeout=30"
    stages+=",e2e-dali:size=160:step=best:timeout=40,e2e-dali:size=192:step=best:timeout=40"
    # The paper's larger encoders, each at about 0.8 of the largest batch per 80 GB that
    # benchmarks/encoder_memory.py works out (an out-of-memory is recorded and the suite goes on).
    stages+=",model:backbone=resnet50x2:batch=144:timeout=40,model:backbone=resnet200x2:batch=52:timeout=40"
    stages+=",model:backbone=resnet50x4:batch=45:timeout=40,model:compile=max-autotune-no-cudagraphs:timeout=rest"
  fi

  if command -v nvidia-smi > /dev/null; then
    boxed nvidia-smi 20 nvidia-smi
  fi
  boxed dali-import 60 "$PY" -c "import nvidia.dali as d; print('DALI', d.__version__)"
  boxed images 120 "$PY" benchmarks/imagenet_like.py --num-images "$images"
  # Every GPU-marked test. A test module that cannot be imported there (a package the lent machine
  # lacks) must not stop the GPU tests of the others from running: it shows as an error in the summary.
  boxed pytest 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests
  cp "$OUT/pytest.log" "$OUT/pytest-gpu.txt"

  # The throughput process gets what is left but 25 s (the table); inside, its --time-budget is 15 s
  # shorter than this box, so its own per-stage alarms fire first and the outer timeout only catches
  # a stage stuck where no Python runs (it keeps the JSON of the stages before it).
  local box=$(( $(left) - 25 ))
  if [ "$box" -lt 30 ]; then box=30; fi
  # ${SUITE_ARGS:-} unquoted on purpose: extra arguments split on spaces
  # shellcheck disable=SC2086
  boxed throughput "$box" "$PY" benchmarks/throughput.py "${common[@]}" --num-images "$images" \
    --time-budget $(( box - 15 )) --stages "$stages" --json "$OUT/throughput.json" --plot "$OUT/throughput.png" \
    ${SUITE_ARGS:-}
  # stdout (the results) and stderr (progress) went to throughput.log together; keep the results apart
  sed -n '/^device: /,$p' "$OUT/throughput.log" > "$OUT/throughput.txt"

  if [ "$QUICK" != 1 ]; then
    boxed ramp-projection 20 "$PY" benchmarks/ramp_projection.py "$OUT/throughput.json" --epochs 300 \
      --json "$OUT/ramp_projection.json"
  fi
  timeout 30 "$PY" benchmarks/gpu_table.py "$OUT"  # the table, printed last
}

# ---------------------------------------------------------------------------- the older named parts
IMAGES=bench_data/imagenet_like_n4000_s0_v1
ensure_images() { [ -d "$IMAGES/train" ] || $PY benchmarks/imagenet_like.py --num-images 4000 >&2; }
bench() {  # bench NAME ARGS...: one throughput run, JSON and log under $OUT
  local name=$1; shift
  echo "== throughput $name: $*"
  timeout ${BENCH_TIMEOUT:-280} $PY benchmarks/throughput.py --json "$OUT/$name.json" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.err"
  echo "rc=$?"; sed -n '/^## Throughput/,$p' "$OUT/$name.txt" | head -30
}

[ $# -eq 0 ] && set -- suite
for part in "$@"; do
  case $part in
    suite) suite ;;
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
    tune)  # the suite measures these side by side now; kept as separate runs for comparison
      ensure_images
      bench batch384 --stages model,e2e-dali --batch 384
      bench compile --stages model,e2e-dali --compile
      bench hw0 --stages dali --hw-decoder-load 0.0
      bench hw100 --stages dali --hw-decoder-load 1.0
      bench threads4 --stages dali,e2e-dali --threads 4
      bench prefetch4 --stages e2e-dali --prefetch 4 ;;
    *) echo "unknown part $part (parts: suite tests demo r50 bench tune; none: the suite)" >&2; exit 2 ;;
  esac
done
