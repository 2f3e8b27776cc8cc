"""Which LNFS threshold finds the contamination: phantom worlds with 1%, 5% and 12% noisy images, four rules.

    python bench/noise_filter_contamination.py [--out runs/lnfs-noise] [--n 3000] [--size 64] [--rates 0.01 0.05 0.12]

For each noise rate: a phantom world (``prepare phantom --noise-rate R``), LNFS with the default settings in one
latent space (a kl-f4 VAE trained once, on the 5% world's train split, as ``train-vae`` does) and metadata off
(``drop_views: []``: the latents must find the laterals too), then LNFS again with ``drop_views: [LATERAL]`` (the
metadata path). The LNFS scores do not depend on the threshold, so every rule is applied to the same scores:

* ``contamination``: the top 5% (the rule that was the default);
* ``quantile``: above the 99.5th percentile of the confident normal images' scores (the default now);
* ``mixture-2``: a two-component Gaussian mixture on the final log-odds, flagged where the upper component's
  posterior passes 0.5;
* ``mixture-bic``: as above with 1 to 4 components chosen by BIC, the top component against the rest.

Prints, per world and rule, the share flagged, the recall of noisy images, the share of clean images removed and
the cost ``missed noisy + 0.1 x removed clean`` (a noisy image kept costs the generator more than a clean one
lost), and ``estimate_contamination`` beside the true rate; writes ``OUT/contamination.json`` and ``.md``. Each
step is skipped when its output exists, so a rerun only recomputes the table.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.data.phantom import prepare_phantom
from diffcxr_aug.generator.configs import resolve_config
from diffcxr_aug.generator.noise_filter import run_filter
from diffcxr_aug.generator.noise_filter.scoring import bic_mixture, estimate_contamination
from diffcxr_aug.generator.settings import FilterSettings, GeneratorSettings, VAESettings
from diffcxr_aug.generator.vae import plan_vae

CLEAN_COST = 0.1


def _mixture_threshold(logit: np.ndarray, components: int | None) -> float:
    """Where the top component's posterior passes 0.5 above the largest component's mean (``components`` None:
    chosen by BIC among 1 to 4; one component: nothing is flagged)."""
    x = logit.reshape(-1, 1)
    model = bic_mixture(logit, [components] if components else [1, 2, 3, 4])
    if model.n_components == 1:
        return float("inf")
    means = model.means_.ravel()
    top, bulk = int(np.argmax(means)), int(np.argmax(model.weights_))
    grid = np.linspace(means[bulk], x.max(), 4000)
    passed = np.flatnonzero(model.predict_proba(grid.reshape(-1, 1))[:, top] >= 0.5)
    return float(grid[passed[0]]) if len(passed) else float("inf")


def rule_table(scores: pd.DataFrame, contamination: float = 0.05, quantile: float = 0.995) -> dict:
    scored = scores[scores["score_logit"] != ""]
    logit = scored["score_logit"].astype(float).to_numpy()
    noisy = (scored["noise"] != "").to_numpy()
    normal = scored["confident_normal"].astype(int).to_numpy() == 1
    thresholds = {
        "contamination": float(np.quantile(logit, 1 - contamination)),
        "quantile": float(np.quantile(logit[normal], quantile)),
        "mixture-2": _mixture_threshold(logit, 2),
        "mixture-bic": _mixture_threshold(logit, None),
    }
    rows = {}
    for rule, threshold in thresholds.items():
        flagged = logit > threshold
        missed, removed = int((noisy & ~flagged).sum()), int((~noisy & flagged).sum())
        rows[rule] = {
            "flagged_share": float(flagged.mean()),
            "recall": float(flagged[noisy].mean()),
            "clean_removed_share": float(flagged[~noisy].mean()),
            "missed": missed,
            "clean_removed": removed,
            "cost": missed + CLEAN_COST * removed,
        }
    return {
        "images": len(scored),
        "noisy": int(noisy.sum()),
        "estimated_contamination": estimate_contamination(logit),
        "rules": rows,
    }


def _with_metadata(scores: pd.DataFrame, lnfs_flagged: pd.Series) -> dict:
    """Recall and clean removal over every row when the laterals go by their view and LNFS flags the rest."""
    noisy = (scores["noise"] != "").to_numpy()
    flagged = lnfs_flagged.to_numpy(dtype=bool)
    return {
        "dropped_by_view": int((scores["reason"] == "view LATERAL").sum()),
        "flagged_share": float(flagged.mean()),
        "recall": float(flagged[noisy].mean()),
        "clean_removed_share": float(flagged[~noisy].mean()),
    }


def markdown(summary: dict) -> str:
    lines = [
        "| noise rate | noisy | estimated | rule | flagged | recall | clean removed | cost |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rate, world in summary["worlds"].items():
        table = world["metadata_off"]
        for rule, row in table["rules"].items():
            lines.append(
                f"| {float(rate):.0%} | {table['noisy']} / {table['images']} | {table['estimated_contamination']:.1%} "
                f"| {rule} | {row['flagged_share']:.1%} | {row['recall']:.3f} | {row['clean_removed_share']:.2%} "
                f"| {row['cost']:.1f} |"
            )
    lines += [
        "",
        "| noise rate | laterals dropped by view | then LNFS (quantile): recall of all noise | clean removed |",
    ]
    lines += ["|---|---|---|---|"]
    for rate, world in summary["worlds"].items():
        m = world["metadata_on"]
        lines.append(
            f"| {float(rate):.0%} | {m['dropped_by_view']} | {m['recall']:.3f} | {m['clean_removed_share']:.2%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lnfs-noise"))
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.01, 0.05, 0.12])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = args.out
    for rate in args.rates:
        if not (out / f"w{rate}" / "manifest.csv").is_file():
            prepare_phantom(out / f"w{rate}", n=args.n, size=args.size, seed=args.seed, noise_rate=rate)
    plan = plan_vae(VAESettings(), resolve_config(GeneratorSettings()))  # the default recipe's latent space
    vae = out / "vae"
    if not (vae / "metrics.json").is_file():
        middle = sorted(args.rates)[len(args.rates) // 2]
        plan.train(read_manifest(out / f"w{middle}"), vae, device="cpu", seed=args.seed)
    summary: dict = {"n": args.n, "size": args.size, "vae": str(vae), "clean_cost": CLEAN_COST, "worlds": {}}
    for rate in args.rates:
        world = {}
        for name, views in (("metadata_off", []), ("metadata_on", ["LATERAL"])):
            folder = out / (f"f{rate}" if not views else f"f{rate}-views")
            if not (folder / "filter_report.json").is_file():
                section = FilterSettings(drop_views=views)
                run_filter(out / f"w{rate}", folder, section, vae=vae, device="cpu", seed=args.seed, progress=False)
            scores = pd.read_csv(folder / "scores.csv", keep_default_na=False)
            if views:  # this run's own flags: drop by view, then the default (quantile) rule on the rest
                world[name] = _with_metadata(scores, scores["flagged"].astype(int) == 1)
            else:
                world[name] = rule_table(scores)
        summary["worlds"][str(rate)] = world
    (out / "contamination.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "contamination.md").write_text(markdown(summary), encoding="utf-8")
    print(markdown(summary))


if __name__ == "__main__":
    main()
