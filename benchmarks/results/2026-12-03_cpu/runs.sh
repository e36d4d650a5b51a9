#!/usr/bin/env bash
# The CPU figures of 2026-12-03 (benchmarks/RESULTS.md "CPU, 2026-12-03"): run from the repository root.
set -euo pipefail
out=benchmarks/results/2026-12-03_cpu
python benchmarks/throughput.py --linear --json $out/throughput.json > $out/throughput.txt 2>&1
for i in 1 2 3; do
  python benchmarks/throughput.py --stages dali,torchvision --json $out/loaders_64px_$i.json > $out/loaders_64px_$i.txt 2>&1
  python benchmarks/throughput.py --stages dali,torchvision --image-size 224 --json $out/loaders_224px_$i.json > $out/loaders_224px_$i.txt 2>&1
done
python benchmarks/results/2026-12-03_cpu/floor.py > $out/floor_64px.txt
python benchmarks/results/2026-12-03_cpu/floor.py --size 224 --rounds 3 > $out/floor_224px.txt
