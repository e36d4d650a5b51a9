set -x
cd /work/main
PY=.venv/bin/python
$PY -m byol_fast.data demo-seg data/demo_seg
for v in instance pixpro instance+pixpro; do
  name=$(echo $v | tr '+' '_')
  if [ $v = instance ]; then cfg=config/demo.yaml; else cfg=config/pixpro_demo.yaml; fi
  /usr/bin/time -f "%e s" $PY -m byol_fast.train --config $cfg --model.loss=$v --out_dir=runs/dense_$name > /tmp/exp/pre_$name.log 2>&1
  $PY -m byol_fast.linear_eval --config config/linear_demo.yaml --checkpoint runs/dense_$name/last.pt --data data/demo > /tmp/exp/lin_$name.log 2>&1
  $PY -m byol_fast.dense_probe --checkpoint runs/dense_$name/last.pt --data data/demo_seg --json /tmp/exp/dense_$name.json > /tmp/exp/dp_$name.log 2>&1
done
$PY -m byol_fast.dense_probe --init random --backbone tiny_resnet --data data/demo_seg --json /tmp/exp/dense_random.json > /tmp/exp/dp_random.log 2>&1
$PY -m byol_fast.linear_eval --config config/linear_demo.yaml --checkpoint runs/dense_instance/last.pt --init random --data data/demo > /tmp/exp/lin_random.log 2>&1
echo ALLDONE
