cd /work/main
PY=.venv/bin/python
$PY -m byol_fast.train --config config/pixpro_demo.yaml --model.loss=instance --out_dir=runs/dense_ctrl > /tmp/exp/pre_ctrl.log 2>&1
$PY -m byol_fast.linear_eval --config config/linear_demo.yaml --checkpoint runs/dense_ctrl/last.pt --data data/demo > /tmp/exp/lin_ctrl.log 2>&1
$PY -m byol_fast.dense_probe --checkpoint runs/dense_ctrl/last.pt --data data/demo_seg --json /tmp/exp/dense_ctrl.json > /tmp/exp/dp_ctrl.log 2>&1
echo DONE
