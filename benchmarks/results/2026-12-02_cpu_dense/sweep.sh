cd /work/main
PY=.venv/bin/python
$PY -m byol_fast.train --config config/pixpro_demo.yaml --model.pixpro_weight=0.25 --out_dir=runs/dense_ip025 > /tmp/exp/pre_ip025.log 2>&1
$PY -m byol_fast.linear_eval --config config/linear_demo.yaml --checkpoint runs/dense_ip025/last.pt --data data/demo > /tmp/exp/lin_ip025.log 2>&1
$PY -m byol_fast.dense_probe --checkpoint runs/dense_ip025/last.pt --data data/demo_seg --json /tmp/exp/dense_ip025.json > /tmp/exp/dp_ip025.log 2>&1
echo DONE
