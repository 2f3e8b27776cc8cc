"""LNFS acceptance on the phantom world: ROC AUC of each stage against the ``noise`` column, the share of clean
images removed at the default threshold, recall per noise kind, and what each stage contributes.

    python bench/noise_filter_phantom.py --out runs/lnfs-phantom [--data DIR | --n 3000 --size 128]
                                         [--vae DIR] [--image-size 64] [--vae-steps 1000] [--seed 0]

Without ``--data`` a phantom world is prepared first (``noise_rate`` 0.05). Without ``--vae`` the filter
trains its VAE on the data, as ``diffcxr-aug filter`` does by default. The filter never reads the
``noise`` column; only this script and the report's evaluation do.

Contributions, on the same latents:

* coarse stage: the manifold and the final score when the manifold is fitted on (nearly) all images
  instead of the K-means-selected normal set (``normal_share=0.999``);
* fine stage: the final (discriminator) score against the manifold score it was taught from;
* what the flagged clean images are: label prevalence among them against all clean images.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pandas as pd
from sklearn.metrics import roc_auc_score

from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.data.phantom import prepare_phantom
from diffcxr_aug.generator.noise_filter import LatentNoiseFilter, run_filter
from diffcxr_aug.generator.settings import FilterSettings
from diffcxr_aug.generator.vae import VAEPlan, encode_manifest, load_vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None, help="an existing phantom folder")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--size", type=int, default=128, help="phantom image size when preparing")
    parser.add_argument("--vae", type=Path, default=None)
    parser.add_argument("--image-size", type=int, default=64, help="size the VAE encodes")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    data = args.data
    if data is None:
        data = args.out / "data"
        prepare_phantom(data, n=args.n, size=args.size, seed=args.seed, noise_rate=0.05)
    section = FilterSettings()
    plan = VAEPlan(None, "kl-f4", size=args.image_size, steps=args.vae_steps, batch_size=32, crop_size=None)
    filtered = args.out / "filtered"
    run_filter(data, filtered, section, vae=args.vae, device="cpu", seed=args.seed, vae_plan=plan)
    report = json.loads((filtered / "filter_report.json").read_text())
    evaluation = report["evaluation"]

    manifest = read_manifest(data)
    noise = manifest.frame["noise"].to_numpy()
    noisy = noise != ""
    vae = load_vae(args.vae if args.vae is not None else filtered / "vae")
    latents = encode_manifest(vae, manifest, args.image_size, device="cpu")
    common = dict(
        n_clusters=section.n_clusters,
        grid=section.grid,
        manifold_components=section.manifold_components,
        positive_share=section.positive_share,
        negative_share=section.negative_share,
        discriminator_steps=section.discriminator_steps,
        seed=args.seed,
        progress=False,
    )
    without_coarse = LatentNoiseFilter(normal_share=0.999, **common).fit(latents).train_scores_

    flagged = pd.read_csv(filtered / "scores.csv", keep_default_na=False)["flagged"].to_numpy(dtype=bool)
    clean_flagged = flagged & ~noisy
    positive = manifest.labels() == 1  # unknown (NaN) counts as not positive
    prevalence = {
        name: {
            "flagged_clean": round(float(positive[clean_flagged, j].mean()), 3) if clean_flagged.any() else None,
            "all_clean": round(float(positive[~noisy, j].mean()), 3),
        }
        for j, name in enumerate(manifest.label_names)
    }
    summary = {
        "images": report["images"],
        "noisy_images": evaluation["noisy_images"],
        "image_size": args.image_size,
        "latent_shape": report["latent_shape"],
        "vae": {k: report["vae"].get(k) for k in ("source", "psnr", "ssim", "steps")},
        "roc_auc": {k: round(v, 4) for k, v in evaluation["roc_auc"].items()},
        "threshold": report["threshold"],
        "flagged": report["flagged"],
        "clean_removed_share": round(evaluation["clean_removed_share"], 4),
        "recall": round(evaluation["recall"], 4),
        "precision": round(evaluation["precision"], 4),
        "per_kind": {
            k: {"count": v["count"], "recall": round(v["recall"], 3), "auc_vs_clean": round(v["auc_vs_clean"], 4)}
            for k, v in evaluation["per_kind"].items()
        },
        "contribution": {
            "coarse_stage_off_manifold_auc": round(roc_auc_score(noisy, without_coarse.manifold), 4),
            "coarse_stage_off_final_auc": round(roc_auc_score(noisy, without_coarse.final), 4),
            "fine_stage_final_minus_manifold_auc": round(
                evaluation["roc_auc"]["final"] - evaluation["roc_auc"]["manifold"], 4
            ),
        },
        "label_prevalence_flagged_clean_vs_all_clean": prevalence,
        "seconds": {k: round(v, 1) for k, v in report["seconds"].items()},
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
