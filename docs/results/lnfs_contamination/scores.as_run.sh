#!/usr/bin/env bash
# Issue 21's phantom contamination check: worlds with 1%, 5% and 12% noise, one VAE (trained on the 5% world),
# LNFS on each with metadata (drop LATERAL) off, so the filter must find the laterals too; scores kept for the
# threshold rules.
set -euo pipefail
O=runs/lnfs-noise
export OMP_NUM_THREADS=2
for r in 0.01 0.05 0.12; do
  [ -f $O/w$r/manifest.csv ] || diffcxr-aug prepare phantom --out $O/w$r --n 3000 --size 64 --noise-rate $r --seed 0 > $O/prepare-$r.log 2>&1
done
[ -f $O/vae/metrics.json ] || diffcxr-aug train-vae --data $O/w0.05 --out $O/vae > $O/vae.log 2>&1
for r in 0.01 0.05 0.12; do
  [ -f $O/f$r/filter_report.json ] || diffcxr-aug filter --data $O/w$r --out $O/f$r --vae $O/vae > $O/filter-$r.log 2>&1
done
echo all done
