#!/usr/bin/env bash
# Copy the small records of a bench/phantom128_study.sh run into docs/ (what the README quotes and shows).
#   bash bench/collect_phantom128.sh [OUT=runs/p128] [DEST=docs/results/phantom128]
set -euo pipefail
O=${1:-runs/p128}
D=${2:-docs/results/phantom128}
mkdir -p $D docs/figures
for vae in $O/gen-main/trained_vae $O/vae; do  # trained by the main run (this script), or apart (earlier study)
  [ -f $vae/metrics.json ] && cp $vae/metrics.json $D/vae_metrics.json
  [ -f $vae/timing.json ] && cp $vae/timing.json $D/vae_timing.json
done
[ -f $O/filtered/filter_report.json ] && cp $O/filtered/filter_report.json $D/filter_report.json
for v in main on off filtered; do
  [ -f $O/gen-$v/training_info.json ] && cp $O/gen-$v/training_info.json $D/training_info_$v.json
  [ -f $O/gen-$v/logs/loss.csv ] && cp $O/gen-$v/logs/loss.csv $D/loss_$v.csv
  [ -f $O/syn-$v/synthesis.json ] && cp $O/syn-$v/synthesis.json $D/synthesis_$v.json
done
cp $O/evaluation/report.md $O/evaluation/report.json $D/
cp $O/grid-main.png docs/figures/generator_phantom128.png
cp $O/gen-main/logs/loss.png docs/figures/generator_phantom128_loss.png
cp $O/evaluation/faithfulness_per_label.png docs/figures/evaluation_phantom128_per_label.png
cp $O/evaluation/nearest_neighbours.png docs/figures/evaluation_phantom128_neighbours.png
[ -f $O/filtered/montage_flagged.png ] && cp $O/filtered/montage_flagged.png docs/figures/lnfs_phantom128_flagged.png
ls -la $D docs/figures
