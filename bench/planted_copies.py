"""Does `evaluate` find memorised images? A set with a known share of planted copies of training images.

    python bench/planted_copies.py --real DIR --out runs/planted [--n 400] [--share 0.05] [--seed 0]
                                   [--classifier DIR] [--epochs N]

The set (written as ``synthesize`` would: ``prompt``, ``seed`` and the labels, plus ``meta_planted``): ``n`` images,
``share`` of them copies of random *train*-split images, each exact, mirrored, lightly cropped (a random 88-96%
window resized back) or with Gaussian noise (sigma 0.03), in turn; the rest are *val*-split images, real films the
generator's training set never held, so they stand for a generator that memorised nothing. Both are drawn from the
clean rows when the manifest has a ``noise`` column (a generator is judged as a maker of chest X-rays, and the
phantom's blank films and laterals have near-twins in every split). Then `evaluate` (its reference classifier trained
here, or ``--classifier``) and, from ``OUT/evaluation/copies/planted.csv``, the share of planted copies flagged (per
kind) and of the other images, in each space and in either. The acceptance of #19: at least 90% of copies flagged,
at most 2% of the others. Prints JSON and writes ``OUT/planted.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from diffcxr_aug.data.images import load_image, save_png
from diffcxr_aug.data.manifest import read_manifest, write_manifest
from diffcxr_aug.evaluation.report import COPIES_DIR, evaluate

KINDS = ("exact", "mirror", "crop", "noise")


def transform(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "exact":
        return img
    if kind == "mirror":
        return img[:, ::-1].copy()
    if kind == "crop":
        h, w = img.shape
        side = int(min(h, w) * rng.uniform(0.88, 0.96))
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        window = Image.fromarray((img[y0 : y0 + side, x0 : x0 + side] * 255).astype(np.uint8))
        return np.asarray(window.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    if kind == "noise":
        return np.clip(img + rng.normal(0.0, 0.03, img.shape), 0.0, 1.0).astype(np.float32)
    raise ValueError(f"Unknown kind {kind!r}; choose one of {KINDS}")


def build_set(real: Path, out: Path, n: int, share: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    # The phantom world's noise rows (blank films, laterals) have near-twins in the train split and are LNFS's
    # business, and `evaluate` calibrates its copy threshold on clean test films: both halves are clean films.
    manifest = read_manifest(real).clean()
    train, val = manifest.split("train"), manifest.split("val")
    n_copies = max(len(KINDS), int(round(n * share)))
    if len(val) < n - n_copies:
        raise SystemExit(f"{manifest.source}: the val split has {len(val)} rows; --n {n} needs {n - n_copies}")
    sources = [(train, i, KINDS[k % len(KINDS)]) for k, i in enumerate(rng.choice(len(train), n_copies, False))]
    sources += [(val, i, "") for i in rng.choice(len(val), n - n_copies, replace=False)]
    order = rng.permutation(len(sources))
    rows = []
    for out_index, k in enumerate(order):
        part, i, kind = sources[k]
        row = part.frame.iloc[i].copy()
        img = load_image(part.image_paths()[i])
        name = f"images/{out_index:06d}.png"
        save_png(transform(img, kind, rng) if kind else img, out / name)
        row["image_path"], row["split"] = name, "train"
        row["patient_id"] = row["study_id"] = f"synthetic-{out_index}"
        row["prompt"], row["seed"], row["meta_planted"] = row["report"], str(out_index), kind
        rows.append(row)
    return write_manifest(pd.DataFrame(rows).reset_index(drop=True), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=Path, required=True, help="a real manifest folder (e.g. a phantom world)")
    parser.add_argument("--out", type=Path, default=Path("runs/planted"))
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--share", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier", type=Path, default=None, help="a reference classifier folder to reuse")
    parser.add_argument("--epochs", type=int, default=None, help="reference classifier epochs (default: evaluate's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    planted = args.out / "planted"
    if not (planted / "manifest.csv").is_file():
        build_set(args.real, planted, args.n, args.share, args.seed)
    evaluation = args.out / "evaluation"
    extra = {"epochs": args.epochs} if args.epochs else {}
    evaluate(args.real, {"planted": planted}, evaluation, seed=args.seed, classifier=args.classifier, **extra)
    copies = pd.read_csv(evaluation / COPIES_DIR / "planted.csv")
    truth = read_manifest(planted).frame["meta_planted"].fillna("").to_numpy()
    is_copy = truth != ""
    summary: dict = {"images": len(truth), "copies": int(is_copy.sum())}
    for space in ("flagged_feature", "flagged_pixel", "flagged"):
        flags = copies[space].to_numpy(dtype=bool)
        summary[space] = {
            "copies_flagged": float(flags[is_copy].mean()),
            "others_flagged": float(flags[~is_copy].mean()),
            **{f"{kind}_flagged": float(flags[truth == kind].mean()) for kind in KINDS},
        }
    (args.out / "planted.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
