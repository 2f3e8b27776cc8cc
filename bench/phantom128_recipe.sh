#!/usr/bin/env bash
# recipes/phantom-128.yaml end to end on 2 CPU cores, timed: prepare (outside the hour), then the hour: LNFS
# (the VAE, the filter) and the generator on the kept images, in one `diffcxr-aug run`; then N images
# at the recipe's guidance from the same prompts and seeds as bench/phantom128_study.sh, and an evaluation.
#   bash bench/phantom128_recipe.sh [OUT=runs/p128v3] [N=300]
# Optional: EVAL_CACHE=DIR reuses DIR/reference_classifier (an earlier evaluation's, on the same real data), and
# EXTRA_SETS="name=DIR ..." adds image sets from earlier runs (same prompts and seeds) to the evaluation, for
# paired differences; SEED=S trains with recipe seed S (the VAE, filter and generator: a training replicate; the
# world and the sampling prompts and seeds stay those of seed 0); DEST=DIR copies the small records there (and the grid and loss plot to docs/figures). Every
# step is resumable; rerunning skips what is done (delete OUT/evaluation to evaluate other sets).
set -euo pipefail
O=${1:-runs/p128v3}
N=${2:-300}
R=recipes/phantom-128.yaml
D=$O/data
[ -f $D/manifest.csv ] || diffcxr-aug prepare phantom --out $D --n 3000 --size 128 --seed 0
if [ ! -f $O/hour.json ]; then
  start=$(date +%s)
  OMP_NUM_THREADS=2 diffcxr-aug run $R --set output_dir=$O --set "steps=[train-vae, filter, train-generator]" \
    --set seed=${SEED:-0} > $O/run.log 2>&1
  end=$(date +%s)
  python - "$O" "$start" "$end" <<'PY'
import json, sys
from pathlib import Path
out, start, end = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
report = json.loads((out / "filtered" / "filter_report.json").read_text())
info = json.loads((out / "generator" / "training_info.json").read_text())
steps = json.loads((out / "steps.json").read_text())
hour = {  # filter_and_generator_minutes: the whole timed run (the VAE, the filter and the generator)
    "filter_and_generator_minutes": round((end - start) / 60, 2),
    "vae_minutes": round(steps["train-vae"]["seconds"] / 60, 2),
    "filter_minutes": round(sum(report["seconds"].values()) / 60, 2),
    "vae": report["vae"],
    "kept": report["kept"],
    "flagged": report["flagged"],
    "generator_minutes": info.get("wall_minutes_total"),
    "generator_steps": info.get("steps"),
}
(out / "hour.json").write_text(json.dumps(hour, indent=2) + "\n")
print(json.dumps(hour, indent=2))
PY
fi
[ -f $O/grid.png ] || python bench/generator_grid.py --generator $O/generator --data $D --out $O/grid.png --guidance 5.0
[ -f $O/synthetic/synthesis.json ] || OMP_NUM_THREADS=2 diffcxr-aug synthesize --n $N --generator $O/generator \
  --out $O/synthetic --prompts $D --recipe $R --seed 0 > $O/synthesize.log 2>&1
mkdir -p $O/evaluation
if [ -n "${EVAL_CACHE:-}" ] && [ ! -d $O/evaluation/reference_classifier ]; then
  cp -r $EVAL_CACHE/reference_classifier $O/evaluation/
fi
extra=""
for s in ${EXTRA_SETS:-}; do extra="$extra --synthetic $s"; done
[ -f $O/evaluation/report.json ] || diffcxr-aug evaluate --real $D --synthetic recipe=$O/synthetic $extra \
  --out $O/evaluation --size 128 --seed 0
if [ -n "${DEST:-}" ]; then
  mkdir -p $DEST docs/figures
  cp $O/hour.json $O/filtered/filter_report.json $O/generator/training_info.json $O/generator/logs/loss.csv \
    $O/synthetic/synthesis.json $O/evaluation/report.md $O/evaluation/report.json $DEST/
  cp $O/vae/metrics.json $DEST/vae_metrics.json
  cp $O/grid.png docs/figures/generator_phantom128_recipe.png
  cp $O/generator/logs/loss.png docs/figures/generator_phantom128_recipe_loss.png
  cp $O/evaluation/faithfulness_per_label.png docs/figures/evaluation_phantom128_recipe_per_label.png
  ls -la $DEST
fi
