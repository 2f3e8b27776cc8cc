#!/usr/bin/env bash
# The README's phantom-128 AVA-TLS study (docs/results/phantom128), about 2.5 hours on 2 CPU cores, on the
# whole (unfiltered) manifest at guidance 3, as recipes/phantom-128.yaml stood before it added LNFS (the recipe's
# own hour, LNFS included: bench/phantom128_recipe.sh):
# - the generator (AVA-TLS on) as `train-generator --recipe recipes/phantom-128.yaml` trains it: its KL-VAE
#   first, then the generator until 58 minutes are up. It runs in two
#   invocations, STEPS steps and then the rest of the hour (--resume latest continues bit for bit, so this is the
#   run a single invocation makes); the first part is kept as the STEPS-step model `on`;
# - the ablation: AVA-TLS off, STEPS steps on the same VAE, so `on` and `off` have the same training budget;
# - N images from each model from the same prompts and seeds, and one evaluation with paired differences.
# Every step is resumable; rerunning skips what is done.
#   bash bench/phantom128_study.sh [OUT=runs/p128] [STEPS=1000] [N=300]
# Optional: EVAL_CACHE=DIR reuses DIR/reference_classifier (trained by an earlier evaluation on the same real
# data; evaluate checks its model, size and labels, not its data), and EXTRA_SETS="name=DIR ..." adds image sets
# from earlier runs (same prompts and seeds) to the evaluation.
set -euo pipefail
O=${1:-runs/p128}
STEPS=${2:-1000}
N=${3:-300}
R=recipes/phantom-128.yaml
D=$O/data
[ -f $D/manifest.csv ] || diffcxr-aug prepare phantom --out $D --n 3000 --size 128 --seed 0

# The main model, part 1: the VAE and STEPS generator steps (kept as gen-on).
if [ ! -f $O/gen-on/model_index.json ]; then
  OMP_NUM_THREADS=2 diffcxr-aug train-generator --data $D --out $O/gen-main --recipe $R --max-steps $STEPS \
    --time-limit-minutes 58 > $O/gen-main-part1.log 2>&1
  mkdir -p $O/gen-on.tmp && (cd $O/gen-main && tar --exclude=./checkpoints -cf - .) | (cd $O/gen-on.tmp && tar -xf -)
  mv $O/gen-on.tmp $O/gen-on
fi
# Part 2: the rest of the hour, counted from the start of part 1 (VAE included).
if [ ! -f $O/main.done ]; then
  used=$(python -c "import json; print(json.load(open('$O/gen-on/training_info.json'))['wall_minutes_total'])")
  left=$(python -c "print(round(58 - $used, 1))")
  echo "main: part 1 took $used min (VAE included); part 2 gets $left min"
  if python -c "import sys; sys.exit(0 if $left >= 1 else 1)"; then
    OMP_NUM_THREADS=2 diffcxr-aug train-generator --data $D --out $O/gen-main --recipe $R --resume latest \
      --time-limit-minutes $left > $O/gen-main-part2.log 2>&1
  else
    echo "main: part 1 filled the hour, so the main model is the STEPS-step one (main = on)"
  fi
  touch $O/main.done
fi
python bench/generator_grid.py --generator $O/gen-main --data $D --out $O/grid-main.png

# AVA-TLS off: STEPS steps on the main run's VAE.
[ -f $O/gen-off/model_index.json ] || OMP_NUM_THREADS=2 diffcxr-aug train-generator --data $D --out $O/gen-off \
  --recipe $R --vae $O/gen-main/trained_vae --no-ava-tls --max-steps $STEPS --time-limit-minutes 120 \
  > $O/gen-off.log 2>&1

# The same N prompts and seeds for every model, so their faithfulness can be compared image for image.
for v in main on off; do
  [ -f $O/syn-$v/synthesis.json ] || OMP_NUM_THREADS=2 diffcxr-aug synthesize --n $N --generator $O/gen-$v \
    --out $O/syn-$v --prompts $D --recipe $R --guidance 3.0 --seed 0 > $O/syn-$v.log 2>&1
done
mkdir -p $O/evaluation
if [ -n "${EVAL_CACHE:-}" ] && [ ! -d $O/evaluation/reference_classifier ]; then
  cp -r $EVAL_CACHE/reference_classifier $O/evaluation/
fi
extra=""
for s in ${EXTRA_SETS:-}; do extra="$extra --synthetic $s"; done
diffcxr-aug evaluate --real $D --synthetic main=$O/syn-main --synthetic on=$O/syn-on --synthetic off=$O/syn-off \
  $extra --out $O/evaluation --size 128 --seed 0
