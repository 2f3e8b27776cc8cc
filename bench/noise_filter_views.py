"""LNFS on a real multi-view collection: frontal chest films with real lateral views and real CT slices mixed in.

    python bench/noise_filter_views.py --root DIR [--out runs/lnfs-views] [--size 64] [--vae-steps 300]
                                       [--seeds 0 1 2] [--bootstrap 2000] [--fit crop|pad]
                                       [--normalize none|equalize] [--filter-normalize none equalize]
                                       [--no-metadata-run]

``--root`` is a checkout of the ieee8023 COVID-19 image collection (Cohen et al. 2020), any snapshot: a
``metadata.csv`` with ``filename``, ``view``, ``modality`` and ``Patientid`` (or ``patientid``) columns, and the
images anywhere below the folder (found by file name; derived copies under ``Overlays``/``Mask``/``Equalized``
folders are skipped). Re-obtain it with

    git clone https://github.com/ieee8023/covid-chestxray-dataset DIR

(the project's record used an early snapshot, the fork ``joseph-bae/Copy-of-covid-chestxray-dataset``: 153 images
found, 118 frontal X-rays, 12 laterals, 23 CT slices). The images stay outside the repository; their licences are
per image (the metadata's ``license`` column; many CC BY-NC-SA).

Truth, from the collection's own metadata: a frontal X-ray (PA, AP, AP Supine) is clean, ``view`` ``L`` is
``lateral``, ``modality`` ``CT`` is ``ct`` (a CT slice in an X-ray set). The filter never reads that truth.

For each seed: a VAE trained on the pool itself (``--vae-steps``), LNFS with the default recipe settings and
metadata off (``drop_views: []``: the latents alone must find the laterals), then ROC AUC of the final score per
noise kind against the clean films with a bootstrap 95% interval, and recall / clean removed at the fixed 5% and
the default quantile threshold (both from the same scores). Then once with ``drop_views: [LATERAL]`` (the metadata
path): the laterals go by their view and LNFS ranks the rest. ``--fit pad`` and ``--normalize equalize`` build the
pool padded instead of centre-cropped, or histogram-equalised (the robustness checks; one ``--out`` each: the VAE
then trains on the equalised pool too). ``--filter-normalize none equalize`` scores each seed twice in the same
latent space (the VAE trained on the pool as it is, as a recipe's ``train-vae`` would), once with
``filter.normalize: equalize`` (LNFS equalises each film before encoding it), and prints the paired difference of
the laterals' AUC by seed. Prints JSON and writes it to ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from diffcxr_aug.data.adapters.common import normalize_view
from diffcxr_aug.data.images import load_image, save_png, to_uint8_square
from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.manifest import write_manifest
from diffcxr_aug.data.splits import assign_patient_splits
from diffcxr_aug.generator.noise_filter import run_filter
from diffcxr_aug.generator.noise_filter.scoring import estimate_contamination
from diffcxr_aug.generator.settings import FilterSettings
from diffcxr_aug.generator.vae import VAEPlan

SIZE = 256
DERIVED = ("Overlays", "Mask", "Equalized")


def to_square(img: np.ndarray, fit: str, normalize: str) -> np.ndarray:
    """A film as the ``SIZE`` square the pool stores: centre-cropped (as ``prepare`` does) or padded with black
    (the whole film, its aspect ratio visible), optionally histogram-equalised (grey-level ranks)."""
    if normalize == "equalize":
        img = (rankdata(img.ravel()) / img.size).reshape(img.shape).astype(np.float32)
    if fit == "pad":
        h, w = img.shape
        side = max(h, w)
        canvas = np.zeros((side, side), np.float32)
        canvas[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = img
        img = canvas
    return to_uint8_square(img, SIZE).astype(np.float32) / 255.0


def build_collection(root: Path, folder: Path, fit: str = "crop", normalize: str = "none") -> Path:
    """The collection's images as a manifest with a ``noise`` column from its metadata (see the module doc)."""
    meta = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False)
    meta.columns = [c.strip() for c in meta.columns]
    patient_col = next(c for c in meta.columns if c.lower() == "patientid")
    files: dict[str, list[str]] = {}
    for directory, _, names in os.walk(root):
        if not any(k in directory for k in DERIVED):
            for name in names:
                files.setdefault(name, []).append(os.path.join(directory, name))
    rows, missing = [], 0
    for record in meta.itertuples(index=False):
        record = record._asdict()
        found = files.get(record["filename"], [])
        if not found:
            missing += 1
            continue
        modality, view = record["modality"].strip(), record["view"].strip()
        noise = "ct" if modality == "CT" else ("lateral" if view == "L" else "")
        name = f"images/{len(rows):04d}.png"
        save_png(to_square(load_image(Path(found[0])), fit, normalize), folder / name)
        rows.append(
            {
                "image_path": name,
                "patient_id": f"p{record[patient_col]}",
                "study_id": f"s{len(rows)}",
                "view": "UNKNOWN" if modality == "CT" else normalize_view(view),
                "report": "",
                "noise": noise,
                "meta_source": record["filename"],
                **dict.fromkeys(CHEXPERT_LABELS, ""),
            }
        )
    frame = pd.DataFrame(rows)
    frame.insert(4, "split", assign_patient_splits(frame["patient_id"], (0.85, 0.15, 0.0), seed=0))
    logging.info("%d images (%d metadata rows without a file): %s", len(frame), missing, frame["noise"].value_counts())
    return write_manifest(frame, folder)


def _auc_interval(clean: np.ndarray, noisy: np.ndarray, rng: np.random.Generator, n: int) -> list[float]:
    """Percentile bootstrap 95% interval of the AUC, resampling clean and noisy images separately."""
    values = []
    for _ in range(n):
        a, b = rng.choice(clean, len(clean)), rng.choice(noisy, len(noisy))
        values.append(roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b]))
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def score_table(scores: pd.DataFrame, rng: np.random.Generator, bootstrap: int) -> dict:
    """AUC per noise kind with its interval, and recall / clean removed at the fixed 5% and the default (quantile)
    thresholds, from the same scores; the contamination the scores suggest."""
    scored = scores[scores["score_logit"] != ""]
    logit = scored["score_logit"].astype(float).to_numpy()
    noise = scored["noise"].to_numpy()
    clean = logit[noise == ""]
    table: dict = {"images": len(scored), "kinds": {}}
    for kind in sorted(set(noise) - {""}):
        kind_scores = logit[noise == kind]
        auc = roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(kind_scores))], np.r_[clean, kind_scores])
        table["kinds"][kind] = {
            "count": int(len(kind_scores)),
            "auc": float(auc),
            "auc_ci95": _auc_interval(clean, kind_scores, rng, bootstrap),
        }
    normal = scored["confident_normal"].astype(int).to_numpy() == 1
    rules = {"contamination_5pct": np.quantile(logit, 0.95), "quantile_0.995": np.quantile(logit[normal], 0.995)}
    for name, threshold in rules.items():
        flagged = logit > threshold
        table[name] = {
            "flagged": int(flagged.sum()),
            "clean_removed": float(flagged[noise == ""].mean()),
            **{f"recall_{kind}": float(flagged[noise == kind].mean()) for kind in table["kinds"]},
        }
    table["estimated_contamination"] = estimate_contamination(logit)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="a covid-chestxray-dataset checkout")
    parser.add_argument("--out", type=Path, default=Path("runs/lnfs-views"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--fit", choices=("crop", "pad"), default="crop", help="centre-crop to a square, or pad")
    parser.add_argument("--normalize", choices=("none", "equalize"), default="none", help="per-image grey levels")
    parser.add_argument(
        "--filter-normalize",
        nargs="+",
        choices=("none", "equalize"),
        default=["none"],
        help="filter.normalize settings, each scored in the same latent space per seed (paired)",
    )
    parser.add_argument("--no-metadata-run", action="store_true", help="skip the drop_views: [LATERAL] run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    data = args.out / "data"
    if not (data / "manifest.csv").is_file():
        build_collection(args.root, data, args.fit, args.normalize)
    plan = VAEPlan(None, "kl-f4", size=args.size, steps=args.vae_steps, batch_size=32, crop_size=None)
    rng = np.random.default_rng(0)
    summary: dict = {"root": str(args.root), "vae_steps": args.vae_steps, "size": args.size, "fit": args.fit}
    summary.update({"normalize": args.normalize, "seeds": {}, "filter_normalize": {}})
    for seed in args.seeds:
        base = args.out / f"seed{seed}"  # filter.normalize none; its VAE is the seed's latent space
        for variant in dict.fromkeys(["none", *args.filter_normalize]):
            out = base if variant == "none" else args.out / f"seed{seed}-{variant}"
            if not (out / "filter_report.json").is_file():
                section = FilterSettings(drop_views=[], normalize=variant)
                vae = base / "vae" if variant != "none" else None
                run_filter(data, out, section, vae=vae, device="cpu", seed=seed, vae_plan=plan, progress=False)
            table = score_table(pd.read_csv(out / "scores.csv", keep_default_na=False), rng, args.bootstrap)
            summary["filter_normalize"].setdefault(variant, {"seeds": {}})["seeds"][seed] = table
        summary["seeds"][seed] = summary["filter_normalize"]["none"]["seeds"][seed]
    # The metadata path, in the first seed's latent space: laterals go by their view, LNFS ranks the rest.
    out = args.out / "with_metadata"
    if not args.no_metadata_run and not (out / "filter_report.json").is_file():
        first = args.out / f"seed{args.seeds[0]}"
        section = FilterSettings(drop_views=["LATERAL"])
        run_filter(data, out, section, vae=first / "vae", device="cpu", seed=args.seeds[0], progress=False)
    if (out / "filter_report.json").is_file():
        report = json.loads((out / "filter_report.json").read_text())
        summary["with_metadata"] = {
            "dropped_by_view": report["dropped_by_view"],
            **score_table(pd.read_csv(out / "scores.csv", keep_default_na=False), rng, args.bootstrap),
        }
    baseline = [summary["seeds"][seed]["kinds"]["lateral"]["auc"] for seed in args.seeds]
    for variant, record in summary["filter_normalize"].items():
        seeds = [record["seeds"][seed]["kinds"] for seed in args.seeds]
        aucs = {kind: [kinds[kind]["auc"] for kinds in seeds] for kind in ("lateral", "ct")}
        for kind, values in aucs.items():
            record[f"{kind}_auc_mean_std"] = _mean_std(values)
        if variant != "none":  # paired by seed: the same VAE, the same data, only the filter's normalisation
            diffs = [a - b for a, b in zip(aucs["lateral"], baseline, strict=True)]
            record["lateral_auc_minus_none"] = {"by_seed": diffs, "mean_std": _mean_std(diffs)}
    summary["lateral_auc_mean_std"] = _mean_std(baseline)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))


def _mean_std(values: list[float]) -> list[float]:
    return [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]


if __name__ == "__main__":
    main()
