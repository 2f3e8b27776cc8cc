#!/usr/bin/env bash
# The README's phantom-128 study: the generator of issue 5 (AVA-TLS on, the whole machine) and, on the same data,
# three runs side by side with equal wall time: AVA-TLS on, AVA-TLS off, AVA-TLS on trained on the LNFS-kept images.
# All share one KL-VAE (bench/train_vae.py: the VAE train-generator would otherwise train first, 17 min here).
# Every step is resumable; rerunning skips what is done. About 3 hours on 2 CPU cores.
#   bash bench/phantom128_study.sh [OUT=runs/phantom-128]
set -euo pipefail
O=${1:-runs/phantom-128}
R=recipes/phantom-128.yaml
[ -f $O/data/manifest.csv ] || diffcxr-aug prepare phantom --out $O/data --n 3000 --size 128 --seed 0
[ -f $O/vae/metrics.json ] || OMP_NUM_THREADS=2 python bench/train_vae.py --data $O/data --out $O/vae --size 128 --steps 1000
[ -f $O/filtered/manifest.csv ] || diffcxr-aug filter --data $O/data --out $O/filtered --vae $O/vae --image-size 128
# Three runs at once, one thread each, 42 minutes each.
for v in on off filtered; do
  data=$O/data; flag=""
  [ $v = off ] && flag="--no-ava-tls"
  [ $v = filtered ] && data=$O/filtered
  [ -f $O/gen-$v/model_index.json ] || OMP_NUM_THREADS=1 diffcxr-aug train-generator --data $data --out $O/gen-$v \
    --recipe $R --vae $O/vae --time-limit-minutes 42 $flag > $O/gen-$v.log 2>&1 &
done
wait
# The main model: the whole machine for 42 minutes (with the VAE's 17, within the hour).
[ -f $O/gen-main/model_index.json ] || OMP_NUM_THREADS=2 diffcxr-aug train-generator --data $O/data --out $O/gen-main \
  --recipe $R --vae $O/vae --time-limit-minutes 42
python bench/generator_grid.py --generator $O/gen-main --data $O/data --out docs/figures/generator_phantom128.png
# The same 500 prompts and seeds for every generator, so their faithfulness can be compared image for image.
for v in main on off filtered; do
  diffcxr-aug synthesize --n 500 --generator $O/gen-$v --out $O/syn-$v --prompts $O/data --recipe $R --seed 0
done
diffcxr-aug evaluate --real $O/data --synthetic main=$O/syn-main --synthetic on=$O/syn-on --synthetic off=$O/syn-off \
  --synthetic filtered=$O/syn-filtered --out $O/evaluation --size 128 --seed 0
