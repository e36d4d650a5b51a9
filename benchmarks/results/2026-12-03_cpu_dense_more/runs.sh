# The dense demo's further runs (issue 14; 2 CPU cores, 2026-12-02/03): larger views, scene
# pretraining, the paper's EMA, a second seed. Run from the repository root after `make install`;
# every run: pretrain 600 steps, then the dense probe and the linear probe of the demo.
# Outputs: runs/NAME/, and dense_NAME.json, pre_NAME.log, lin_NAME.log in the current folder (the
# copies here are trimmed to the figures). dense_instance etc. are the runs of ../2026-12-02_cpu_dense.
set -x
PY=.venv/bin/python
$PY -m byol_fast.data demo data/demo
$PY -m byol_fast.data demo-seg data/demo_seg
probes() {  # NAME [dense probe args] ; linear probe args come from LIN
  name=$1; shift
  $PY -m byol_fast.dense_probe --checkpoint runs/$name/last.pt --data data/demo_seg "$@" > /dev/null
  $PY -m byol_fast.linear_eval --config config/linear_demo.yaml --checkpoint runs/$name/last.pt --data data/demo $LIN > lin_$name.log
}
run() {  # NAME pretraining-overrides...
  name=$1; shift
  $PY -m byol_fast.train --config config/pixpro_demo.yaml --out_dir=runs/$name "$@" > pre_$name.log 2>&1
}

# 64 px views (8x8 last maps instead of 4x4); dense probe at 48 and 96 px, linear probe at 64 px
for v in instance pixpro instance+pixpro; do
  name=v64_$(echo $v | tr '+' '_')
  run $name --model.loss=$v --data.image_size=64
  $PY -m byol_fast.dense_probe --checkpoint runs/$name/last.pt --data data/demo_seg --image-size 96 --json dense_${name}_96.json > /dev/null
  LIN="--data.image_size=64 --data.resize=73" probes $name --json dense_${name}_48.json
done
$PY -m byol_fast.dense_probe --init random --backbone tiny_resnet --data data/demo_seg --image-size 96 --json dense_random_96.json

# Pretraining on scenes (several texture regions per image, the dense probe's kind of image):
# 1,024 demo-seg images of seed 7 (none of them in the probe's train/ or val/), 38 epochs = 608 steps
$PY -m byol_fast.data demo-seg /tmp/demo_scenes_src --seed 7 --train-images 1024 --val-images 1
mkdir -p data/demo_scenes/train && cp -r /tmp/demo_scenes_src/train/images data/demo_scenes/train/scene
for v in instance pixpro instance+pixpro; do
  name=scn_$(echo $v | tr '+' '_')
  run $name --model.loss=$v --data.path=data/demo_scenes/train --epochs=38 --monitor.knn_every=0
  LIN= probes $name --json dense_$name.json
done

# The paper's EMA start (tau_base 0.99 instead of the demo's 0.9), and seed 1 of all three losses
run px_tau99 --model.loss=pixpro --ema.tau_base=0.99 && LIN= probes px_tau99 --json dense_px_tau99.json
run ip_tau99 --model.loss=instance+pixpro --ema.tau_base=0.99 && LIN= probes ip_tau99 --json dense_ip_tau99.json
for pair in inst_s1:instance px_s1:pixpro ip_s1:instance+pixpro; do
  run ${pair%%:*} --model.loss=${pair#*:} --seed=1 && LIN= probes ${pair%%:*} --json dense_${pair%%:*}.json
done

# How alike the positions of one image's last map are, and its pixel projections (feature_maps.txt)
$PY benchmarks/results/2026-12-03_cpu_dense_more/feature_maps.py dense_instance dense_pixpro \
  dense_instance_pixpro inst_s1 px_s1 ip_s1 v64_instance v64_pixpro v64_instance_pixpro > feature_maps.txt

# The pixel head's spread while it learns (pixel_std*sqrt(d) on the progress line, added 2026-12-03;
# the runs are otherwise bit-identical to px_s1 etc.)
run pxstd_s0 --model.loss=pixpro --seed=0
run pxstd_s1 --model.loss=pixpro --seed=1
run ipstd_s1 --seed=1
