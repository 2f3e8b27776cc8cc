"""How well the report labeler agrees with reference labels (MeSH on IU X-ray, the phantom's truth, a manifest's).

    python bench/labeler_eval.py iu [--reports NLMCXR_reports.tgz]
    python bench/labeler_eval.py phantom --n 2000 [--seed 0]
    python bench/labeler_eval.py truth --manifest DIR [--n N]

Prints the per-observation tables and the markdown the README quotes; the numbers come from
:mod:`diffcxr_aug.evaluation.labeler_eval`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pandas as pd

from diffcxr_aug.evaluation.labeler_eval import (
    evaluate_iu,
    evaluate_manifest_truth,
    evaluate_phantom,
    iu_markdown,
    phantom_markdown,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    iu = sub.add_parser("iu", help="agreement with MeSH on the real IU X-ray reports")
    iu.add_argument("--reports", type=Path, default=None, help="NLMCXR_reports.tgz (default: the xrv wheel's)")
    phantom = sub.add_parser("phantom", help="agreement with the truth labels of phantom reports")
    phantom.add_argument("--n", type=int, default=2000)
    phantom.add_argument("--seed", type=int, default=0)
    truth = sub.add_parser("truth", help="agreement with the labels of a manifest (e.g. phantom)")
    truth.add_argument("--manifest", type=Path, required=True)
    truth.add_argument("--n", type=int, default=None, help="first N distinct reports only")
    args = parser.parse_args()
    pd.set_option("display.width", 160)
    if args.what == "iu":
        results = evaluate_iu(args.reports)
        for (labeler, subset), table in results.items():
            print(f"\n## {labeler} labeler vs MeSH, {subset}\n")
            print(table.round(3).to_string(index=False))
        print("\nmacro-F1 summary:")
        for (labeler, subset), table in results.items():
            print(f"  {labeler:8s} {subset:24s} {table['f1'].iloc[-1]:.3f}")
        print("\n" + iu_markdown(results))
    elif args.what == "phantom":
        results = evaluate_phantom(args.n, args.seed)
        print(f"phantom reports: n={args.n}, seed={args.seed}\n")
        print(phantom_markdown(results))
    else:
        for name, table in evaluate_manifest_truth(args.manifest, args.n).items():
            print(f"\n## {name} labeler vs truth (distinct reports of {args.manifest})\n")
            print(table.round(3).to_string(index=False))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
