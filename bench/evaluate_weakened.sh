#!/usr/bin/env bash
# Does `evaluate` tell a recipe's generator from deliberately weakened ones? (issue #19, acceptance 1)
#
#   bash bench/evaluate_weakened.sh RUN OUT
#
# RUN is a finished recipe run folder (data/, vae/, filtered/, generator/, synthetic/, recipe.resolved.yaml), for
# example runs/augment-phantom128 after `diffcxr-aug run recipes/augment-phantom128.yaml`. Into OUT it draws, from
# the same train-split prompts and seeds as RUN/synthetic (same n, sampler steps and seed):
#   guidance1/        the same stage-1 model without classifier-free guidance;
#   steps10pct/       a stage-1 model trained like RUN's for 10% of its steps (same data, VAE, recipe and seed),
#                     sampled with RUN's guidance;
# then judges them with RUN's own set (and RUN's stage-2 set, synthetic-dkim/, when there is one) in one report:
#   OUT/evaluation/   `diffcxr-aug evaluate` (report.md, report.json; the reference classifier it trains).
# Every step resumes: a rerun skips what finished. Times per step are printed and kept in OUT/times.txt.
set -euo pipefail
RUN=${1:?usage: bash bench/evaluate_weakened.sh RUN OUT}
OUT=${2:?usage: bash bench/evaluate_weakened.sh RUN OUT}
mkdir -p "$OUT"

# The full set's own job: n, sampler steps, guidance, seed, and the stage-1 model's step count.
read -r N STEPS GUIDANCE SEED STAGE1 < <(python - "$RUN" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
job = json.loads((run / "synthetic" / "synthesis.json").read_text())
info = json.loads((run / "generator" / "training_info.json").read_text())
print(job["n"], job["steps"], job["guidance"], job["seed"], info["steps"])
EOF
)
WEAK_STEPS=$(( STAGE1 / 10 ))
echo "full set: n=$N, $STEPS sampler steps, guidance $GUIDANCE, seed $SEED; stage 1 $STAGE1 steps -> $WEAK_STEPS"

timed() {  # timed NAME COMMAND...: run, print and record its minutes
    local name=$1; shift
    local start=$SECONDS
    "$@"
    local minutes
    minutes=$(python -c "print(f'{($SECONDS - $start) / 60:.1f}')")
    echo "$name: $minutes min" | tee -a "$OUT/times.txt"
}

timed guidance1 diffcxr-aug synthesize --generator "$RUN/generator" --prompts "$RUN/data/manifest.csv" --n "$N" \
    --steps "$STEPS" --guidance 1 --batch-size 32 --seed "$SEED" --out "$OUT/guidance1"
timed train-steps10pct diffcxr-aug train-generator --data "$RUN/filtered" --vae "$RUN/vae" \
    --recipe "$RUN/recipe.resolved.yaml" --out "$OUT/steps10pct-generator" --max-steps "$WEAK_STEPS" \
    --no-compile --resume latest
timed steps10pct diffcxr-aug synthesize --generator "$OUT/steps10pct-generator" --prompts "$RUN/data/manifest.csv" --n "$N" \
    --steps "$STEPS" --guidance "$GUIDANCE" --batch-size 32 --seed "$SEED" --out "$OUT/steps10pct"

SETS=(--synthetic "full=$RUN/synthetic")
if [ -f "$RUN/synthetic-dkim/manifest.csv" ]; then SETS+=(--synthetic "dkim=$RUN/synthetic-dkim"); fi
SETS+=(--synthetic "guidance1=$OUT/guidance1" --synthetic "steps10pct=$OUT/steps10pct")
timed evaluate diffcxr-aug evaluate --real "$RUN/data" "${SETS[@]}" --recipe "$RUN/recipe.resolved.yaml" \
    --out "$OUT/evaluation"
