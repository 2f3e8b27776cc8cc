#!/usr/bin/env bash
# The README's phantom-128 study, about 2.5 hours on 2 CPU cores:
# - the generator of issue 5 (AVA-TLS on): the VAE, then the generator on the whole machine for what is left of
#   one hour (on a machine where STEPS steps already fill the hour, it is the STEPS-step run);
# - three runs with the same training budget, STEPS optimizer steps of batch 32: AVA-TLS on (the main run's first
#   part, a --max-steps STEPS run that the main run then resumes, bit for bit as if it had never stopped),
#   AVA-TLS off, and AVA-TLS on trained on the LNFS-kept images only;
# - N images from each, from the same prompts and seeds, and one evaluation with paired differences.
# All share one KL-VAE (bench/train_vae.py). Every step is resumable; rerunning skips what is done.
#   bash bench/phantom128_study.sh [OUT=runs/phantom-128] [STEPS=1000] [N=300]
set -euo pipefail
O=${1:-runs/phantom-128}
STEPS=${2:-1000}
N=${3:-300}
R=recipes/phantom-128.yaml
[ -f $O/data/manifest.csv ] || diffcxr-aug prepare phantom --out $O/data --n 3000 --size 128 --seed 0
[ -f $O/vae/metrics.json ] || OMP_NUM_THREADS=2 python bench/train_vae.py --data $O/data --out $O/vae --size 128 --steps 1000
[ -f $O/filtered/manifest.csv ] || diffcxr-aug filter --data $O/data --out $O/filtered --vae $O/vae --image-size 128

# The main model, in two parts: STEPS steps (kept as gen-on), then the rest of the hour that the VAE started.
if [ ! -f $O/gen-on/model_index.json ]; then
  OMP_NUM_THREADS=2 diffcxr-aug train-generator --data $O/data --out $O/gen-main --recipe $R --vae $O/vae \
    --max-steps $STEPS > $O/gen-main-part1.log 2>&1
  mkdir -p $O/gen-on.tmp && (cd $O/gen-main && tar --exclude=./checkpoints -cf - .) | (cd $O/gen-on.tmp && tar -xf -)
  mv $O/gen-on.tmp $O/gen-on
fi
if [ ! -f $O/main.done ]; then
  vae=$(python -c "import json; print(json.load(open('$O/vae/timing.json'))['wall_minutes'])")
  used=$(python -c "import json; print(json.load(open('$O/gen-on/training_info.json'))['wall_minutes_total'])")
  left=$(python -c "print(round(59 - $vae - $used, 1))")  # a minute to spare for saving the pipeline
  echo "main: VAE $vae min + part 1 $used min; part 2 gets $left min"
  if python -c "import sys; sys.exit(0 if $left >= 5 else 1)"; then
    OMP_NUM_THREADS=2 diffcxr-aug train-generator --data $O/data --out $O/gen-main --recipe $R --vae $O/vae \
      --resume latest --time-limit-minutes $left > $O/gen-main-part2.log 2>&1
  else
    echo "main: under 5 minutes left, so the main model is the STEPS-step one (gen-on)"
  fi
  touch $O/main.done
fi
steps() { python -c "import json; print(json.load(open('$O/gen-$1/training_info.json'))['steps'])"; }
sets="on off filtered"
[ "$(steps main)" != "$(steps on)" ] && sets="$sets main"

# AVA-TLS off and LNFS-filtered, STEPS steps each, side by side (one thread each).
for v in off filtered; do
  data=$O/data; flag=""
  [ $v = off ] && flag="--no-ava-tls"
  [ $v = filtered ] && data=$O/filtered
  [ -f $O/gen-$v/model_index.json ] || OMP_NUM_THREADS=1 diffcxr-aug train-generator --data $data --out $O/gen-$v \
    --recipe $R --vae $O/vae --max-steps $STEPS --time-limit-minutes 120 $flag > $O/gen-$v.log 2>&1 &
done
wait

python bench/generator_grid.py --generator $O/gen-main --data $O/data --out docs/figures/generator_phantom128.png
# The same N prompts and seeds for every generator, so their faithfulness can be compared image for image.
for v in $sets; do
  [ -f $O/syn-$v/synthesis.json ] || OMP_NUM_THREADS=2 diffcxr-aug synthesize --n $N --generator $O/gen-$v \
    --out $O/syn-$v --prompts $O/data --recipe $R --seed 0
done
args=""
for v in $sets; do args="$args --synthetic $v=$O/syn-$v"; done
diffcxr-aug evaluate --real $O/data $args --out $O/evaluation --size 128 --seed 0
