"""Faithfulness mAUC of synthetic sets (e.g. AVA-TLS on vs off), scored by one classifier trained on real images.

    python bench/faithfulness.py --real runs/phantom-128/data \
        --synthetic on=runs/phantom-128/synthetic-on off=runs/phantom-128/synthetic-off \
        --out runs/phantom-128/faithfulness [--size 128] [--epochs 8] [--model resnet10t]

Prints a markdown table (mAUC and per-label AUCs of the real test split and of each synthetic set) and
writes it with the raw numbers to ``OUT/faithfulness.md`` and ``OUT/faithfulness.json``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from diffcxr_aug.evaluation.faithfulness import evaluate_faithfulness, faithfulness_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, required=True, help="real manifest folder (train split trains the judge)")
    parser.add_argument("--synthetic", nargs="+", required=True, help="NAME=FOLDER of synthetic manifests")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sets = {}
    for item in args.synthetic:
        name, sep, folder = item.partition("=")
        if not sep:
            parser.error(f"--synthetic {item!r}: expected NAME=FOLDER")
        sets[name] = Path(folder)
    results = evaluate_faithfulness(
        args.real,
        sets,
        out=args.out,
        size=args.size,
        model_name=args.model,
        epochs=args.epochs,
        device=args.device,
        seed=args.seed,
    )
    print(faithfulness_table(results))


if __name__ == "__main__":
    main()
