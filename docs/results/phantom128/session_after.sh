#!/usr/bin/env bash
# After the main run: the AVA-TLS-off arm (1000 steps, same VAE), the AVA-TLS-on arm at step 1000 (exported from
# the main run's own checkpoint), 300 images from each and from the main model, one evaluation.
set -euo pipefail
O=runs/p128v2
D=runs/phantom-128/data
R=$O/recipe.yaml
until [ -f $O/gen-main/model_index.json ]; do sleep 30; done
echo "main done $(date)"
OMP_NUM_THREADS=2 python bench/generator_grid.py --generator $O/gen-main \
  --data $D --out $O/grid-main.png > $O/grid.log 2>&1
[ -f $O/syn-main/synthesis.json ] || OMP_NUM_THREADS=2 diffcxr-aug synthesize --n 300 --generator $O/gen-main \
  --out $O/syn-main --prompts $D --recipe $R --seed 0 > $O/syn-main.log 2>&1
echo "syn main done $(date)"
[ -f $O/gen-off/model_index.json ] || OMP_NUM_THREADS=2 diffcxr-aug train-generator --data $D --out $O/gen-off \
  --recipe $R --vae $O/gen-main/trained_vae --no-ava-tls --max-steps 1000 --time-limit-minutes 120 > $O/gen-off.log 2>&1
echo "off done $(date)"
if [ ! -f $O/gen-on/model_index.json ]; then
  mkdir -p $O/gen-on && cp -r $O/gen-main/trained_vae $O/gen-on/
  OMP_NUM_THREADS=2 diffcxr-aug train-generator --data $D --out $O/gen-on --recipe $R --resume latest \
    --max-steps 1000 > $O/gen-on.log 2>&1
fi
echo "on@1000 exported $(date)"
for v in main on off; do
  [ -f $O/syn-$v/synthesis.json ] || OMP_NUM_THREADS=2 diffcxr-aug synthesize --n 300 --generator $O/gen-$v \
    --out $O/syn-$v --prompts $D --recipe $R --seed 0 > $O/syn-$v.log 2>&1
  echo "syn $v done $(date)"
done
mkdir -p $O/evaluation
[ -d $O/evaluation/reference_classifier ] || cp -r runs/phantom-128/evaluation/reference_classifier $O/evaluation/
diffcxr-aug evaluate --real $D --synthetic main=$O/syn-main --synthetic on=$O/syn-on --synthetic off=$O/syn-off \
  --synthetic prev-on=runs/phantom-128/syn-on --synthetic prev-off=runs/phantom-128/syn-off \
  --out $O/evaluation --size 128 --seed 0 > $O/evaluation.log 2>&1
echo "evaluation done $(date)"
