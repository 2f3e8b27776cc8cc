#!/usr/bin/env bash
# Issue 15's acceptance run: the phantom-128 recipe's hour with the fast settings (bf16 autocast, the math
# attention backend and the compiled UNet, token squeeze and image tower: the recipe's defaults on a CPU with native bf16) against the fp32 hour
# (fp32, torch's default attention, eager: the settings before), at equal wall time, on the same machine, from one LNFS filter (its VAE and kept
# images are shared), sampled from the same prompts and seeds and scored by one `evaluate` (paired intervals).
# Then the sampler sweep on the fast model: DPM-Solver++ and UniPC at 10, 15, 25 and 50 steps (bf16 sampling).
#   [SWEEP=0] [WARM=1] bash bench/perf_hour.sh [OUT=runs/p128v4] [N=300]
# SWEEP=0: the two arms only, no sampler sweep. WARM=1: a one-step run of the fast arm's settings first, outside the
# clock (timed in OUT/warmup_time.txt), so the arm finds inductor's cache warm, as every run after a machine's first does;
# without it the arm compiles cold inside its hour. During each arm OUT/monitor-NAME.txt logs the box every 30 s (load,
# /proc/stat's cpu line with its steal column, the busiest processes).
# Every step is resumable: rerunning skips what is done (delete OUT/evaluation to evaluate again). DEST=DIR copies
# the small records there (bench/perf_hour_summary.py --dest).
set -euo pipefail
O=${1:-runs/p128v4}
N=${2:-300}
R=recipes/phantom-128.yaml
D=$O/data
export OMP_NUM_THREADS=2
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # the monitor, should an arm fail
# The compiled arm compiles cold, as on a machine's first run (WARM=1 moves that out of its clock): inductor's
# cache lives in the run's folder.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/$O/inductor-cache}
[ -f $D/manifest.csv ] || diffcxr-aug prepare phantom --out $D --n 3000 --size 128 --seed 0
if [ ! -f $O/filtered/filter_report.json ]; then  # the VAE and the filter, timed together (filter_time.txt)
  s=$(date +%s)
  diffcxr-aug train-vae --data $D --out $O/vae --recipe $R > $O/vae.log 2>&1
  diffcxr-aug filter --data $D --vae $O/vae --out $O/filtered --recipe $R > $O/filter.log 2>&1
  echo "filter_s $(( $(date +%s) - s ))" > $O/filter_time.txt
fi
VAE=$O/vae
[ -d $VAE ] || VAE=$O/filtered/vae  # the 2026-12-03 record: made before train-vae, its filter trained the VAE
train() {  # train OUT OPTIONS...: the recipe's generator on the shared filter and VAE
  local out=$1; shift
  diffcxr-aug train-generator --data $O/filtered --vae $VAE --out $out --recipe $R "$@"
}
monitor() {  # monitor FILE: what else the box did, every 30 s, until killed
  while sleep 30; do
    echo "$(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg) | $(head -1 /proc/stat) |" \
      "$(ps -eo pcpu=,comm= --sort=-pcpu | head -3 | tr -s ' ' | tr '\n' ';')"
  done >> "$1"
}
arm() {  # arm NAME OPTIONS...
  local name=$1; shift
  [ -f $O/gen-$name/training_info.json ] && return
  monitor $O/monitor-$name.txt & local mon=$!
  # max-steps far above what the hour allows: the recipe's 47-minute time limit stops both arms.
  train $O/gen-$name --max-steps 100000 "$@" > $O/train-$name.log 2>&1
  kill $mon
}
if [ "${WARM:-0}" = 1 ] && [ ! -f $O/warmup_time.txt ] && [ ! -f $O/gen-fast/training_info.json ]; then
  s=$(date +%s)
  rm -rf $O/warmup
  train $O/warmup --max-steps 1 > $O/warmup.log 2>&1
  echo "warmup_s $(( $(date +%s) - s ))" > $O/warmup_time.txt
  rm -rf $O/warmup
fi
arm fast
arm fp32 --mixed-precision no --attention default --no-compile
syn() {  # syn NAME GENERATOR OPTIONS...
  local name=$1 gen=$2; shift 2
  [ -f $O/syn-$name/synthesis.json ] || diffcxr-aug synthesize --n $N --generator $O/gen-$gen --out $O/syn-$name \
    --prompts $D --recipe $R --seed 0 "$@" > $O/syn-$name.log 2>&1
}
syn fast fast
syn fp32 fp32
syn fast-bf16 fast --mixed-precision bf16
sets="--synthetic fast=$O/syn-fast --synthetic fp32=$O/syn-fp32 --synthetic fast-bf16=$O/syn-fast-bf16"
[ "${SWEEP:-1}" = 1 ] && for sampler in dpm-solver++ unipc; do
  for steps in 10 15 25 50; do
    name=${sampler%-solver++}$steps
    [ "$name" = dpm25 ] && continue  # that is fast-bf16
    syn $name fast --mixed-precision bf16 --sampler $sampler --steps $steps
    sets="$sets --synthetic $name=$O/syn-$name"
  done
done
[ -f $O/evaluation/report.json ] || diffcxr-aug evaluate --real $D $sets --out $O/evaluation --size 128 --seed 0 \
  > $O/evaluate.log 2>&1
python bench/perf_hour_summary.py $O ${DEST:+--dest $DEST}
