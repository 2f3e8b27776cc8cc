"""LNFS on real chest X-rays plus corrupted copies: the noise of real collections that can be simulated.

    python bench/noise_filter_realcxr.py [--shared ../shared] [--out runs/lnfs-realcxr] [--variants 5]
                                         [--per-kind 3] [--vae-steps 300] [--vae DIR] [--size 64] [--seed 0]

The clean pool is built from the real radiographs in ``shared/realcxr/`` (40 Hannover AP/PA films, two
NIH ChestX-ray14 PNGs, three TBX11K PNGs, one SIIM DICOM and one ieee8023 JPG: 47 images), each drawn
``--variants`` times with mild acquisition jitter (crop and shift, +-4 degree tilt, gamma). Noisy images
are corrupted copies of randomly chosen real films, of kinds that occur in real collections:

* ``inverted``: grey levels inverted (MONOCHROME1 read as MONOCHROME2);
* ``rotated``: stored rotated by 90, 180 or 270 degrees;
* ``film_border``: a film digitised on a light box: shrunk, tilted, a dark film rim on a bright,
  unevenly lit background;
* ``burnt_text``: large burnt-in annotations and arrows;
* ``screenshot``: a screenshot of a matplotlib figure (a plot with axes, labels and a legend);
* ``not_chest``: crops of non-chest images (an MRI head slice, a photograph, a terrain map; matplotlib's
  sample data);
* ``real_annotated``: the ieee8023 film ``16747_3_1.jpg``, which really carries burnt-in annotations.

Not simulated, because flips or shears of frontal films are not laterals: lateral views (no real lateral
is available here). The clean pool is small and its variants are jittered copies of 47 films, so the
normal manifold is easier to learn than in a real collection of thousands of patients; read the result as
a check that the filter reacts to these kinds on real pixels, not as an accuracy estimate.

Writes the pool under ``--out/data`` (manifest with a ``noise`` column), runs ``run_filter`` with the
default recipe settings (a VAE trained on the pool itself) into ``--out/filtered`` and prints ROC AUC per
stage and per kind, and the recall per kind at the default threshold, as JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import cbook
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from diffcxr_aug.data.images import load_image, save_png, to_uint8_square
from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.manifest import write_manifest
from diffcxr_aug.data.splits import assign_patient_splits
from diffcxr_aug.generator.noise_filter import run_filter
from diffcxr_aug.generator.settings import FilterSettings
from diffcxr_aug.generator.vae import VAEPlan

SIZE = 256
KINDS = ("inverted", "rotated", "film_border", "burnt_text", "screenshot", "not_chest")


def real_films(shared: Path) -> list[tuple[str, np.ndarray]]:
    real = shared / "realcxr"
    paths = sorted((real / "hannover").glob("*.png"))
    fixtures = real / "fixtures"
    paths += [
        fixtures / "00000001_000.png",
        fixtures / "00027426_000.png",
        fixtures / "covid-19-pneumonia-58-prior.jpg",
        fixtures / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    ]
    paths += sorted((fixtures / "tbx11k_test_data" / "imgs").rglob("*.png"))
    return [(p.stem, to_uint8_square(load_image(p), SIZE).astype(np.float32) / 255.0) for p in paths]


def jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible re-acquisition: slightly different framing, tilt and exposure."""
    side = int(SIZE * rng.uniform(0.88, 1.0))
    y0, x0 = (int(rng.integers(0, SIZE - side + 1)) for _ in range(2))
    crop = Image.fromarray(img[y0 : y0 + side, x0 : x0 + side]).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    out = ndimage.rotate(np.asarray(crop), rng.uniform(-4, 4), reshape=False, order=1, mode="nearest")
    return np.clip(out, 0, 1) ** float(np.exp(rng.normal(0, 0.12)))


def film_border(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    page = 0.85 + 0.12 * (rng.uniform(-1, 1) * (xx - 0.5) + rng.uniform(-1, 1) * (yy - 0.5)) + 0.02
    scale = rng.uniform(0.68, 0.84)
    side = int(SIZE * scale)
    film = np.full((side + 12, side + 12), rng.uniform(0.03, 0.15), np.float32)  # the film's unexposed rim
    film[6:-6, 6:-6] = np.asarray(Image.fromarray(img).resize((side, side), Image.Resampling.BILINEAR))
    film = ndimage.rotate(film, rng.uniform(-6, 6), reshape=True, order=1, cval=-1.0)
    out = page.astype(np.float32).copy()
    h, w = min(film.shape[0], SIZE), min(film.shape[1], SIZE)
    y0, x0 = (int(rng.integers(0, SIZE - max(h, w) + 1)) for _ in range(2))
    region = out[y0 : y0 + h, x0 : x0 + w]
    patch = film[:h, :w]
    region[patch >= 0] = patch[patch >= 0]
    return np.clip(out, 0, 1)


def burnt_text(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pil = Image.fromarray(img.astype(np.float32))
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default(size=int(SIZE / rng.uniform(9, 13)))
    words = ["PORTABLE", "AP SUPINE", "ICU 4", "L", "R", "ERECT", "2019-04-02", "ID 4471", "TRAUMA"]
    y = rng.uniform(0.02, 0.1) * SIZE
    for _ in range(int(rng.integers(2, 5))):
        draw.text((rng.uniform(0.02, 0.5) * SIZE, y), " ".join(rng.choice(words, 2)), fill=1.0, font=font)
        y += SIZE / 9
    for _ in range(int(rng.integers(1, 3))):  # arrows pointing into the lungs
        x0, y0 = rng.uniform(0.2, 0.8, 2) * SIZE
        dx, dy = rng.uniform(-0.25, 0.25, 2) * SIZE
        draw.line([(x0, y0), (x0 + dx, y0 + dy)], fill=1.0, width=4)
        draw.polygon([(x0, y0), (x0 + 10, y0 + 4), (x0 + 4, y0 + 10)], fill=1.0)
    return np.asarray(pil)


def screenshot(rng: np.random.Generator) -> np.ndarray:
    fig = Figure(figsize=(4, 4), dpi=SIZE / 4)
    ax = fig.add_subplot()
    x = np.linspace(0, 10, 50)
    kind = rng.integers(3)
    if kind == 0:
        for k in range(int(rng.integers(1, 4))):
            ax.plot(x, np.sin(x * rng.uniform(0.3, 2)) + k, label=f"series {k}")
        ax.legend()
    elif kind == 1:
        ax.bar(range(6), rng.uniform(1, 10, 6))
    else:
        ax.scatter(rng.normal(size=80), rng.normal(size=80), s=8)
    ax.set_title(str(rng.choice(["AUC by epoch", "Figure 3", "Loss", "Results"])))
    ax.set_xlabel("x")
    ax.set_ylabel("value")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].astype(np.float32) / 255.0
    return to_uint8_square(rgb.mean(axis=2), SIZE).astype(np.float32) / 255.0


def not_chest_sources() -> list[np.ndarray]:
    mri = np.frombuffer(gzip.open(cbook.get_sample_data("s1045.ima.gz", asfileobj=False)).read(), np.uint16)
    mri = mri.reshape(256, 256).astype(np.float32)
    photo = load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    dem = np.load(cbook.get_sample_data("jacksboro_fault_dem.npz", asfileobj=False))["elevation"].astype(np.float32)
    return [(a - a.min()) / (np.ptp(a) + 1e-6) for a in (mri, photo, dem)]


def not_chest(sources: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    src = sources[int(rng.integers(len(sources)))]
    h, w = src.shape
    side = int(min(h, w) * rng.uniform(0.7, 1.0))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return to_uint8_square(src[y0 : y0 + side, x0 : x0 + side], SIZE).astype(np.float32) / 255.0


def build_pool(shared: Path, folder: Path, variants: int, per_kind: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    films = real_films(shared)
    sources = not_chest_sources()
    annotated = to_uint8_square(load_image(shared / "realcxr/fixtures/16747_3_1.jpg"), SIZE) / 255.0
    rows = []

    def add(img: np.ndarray, patient: str, noise: str) -> None:
        name = f"images/{len(rows):04d}.png"
        save_png(img, folder / name)
        row = {"image_path": name, "patient_id": patient, "study_id": f"s{len(rows)}", "view": "UNKNOWN"}
        row.update({"report": "", "noise": noise, **dict.fromkeys(CHEXPERT_LABELS, "")})
        rows.append(row)

    for name, img in films:
        for _ in range(variants):
            add(jitter(img, rng), name, "")
    for kind in KINDS:
        for _ in range(per_kind):
            name, img = films[int(rng.integers(len(films)))]
            base = jitter(img, rng)
            if kind == "inverted":
                out = 1.0 - base
            elif kind == "rotated":
                out = np.rot90(base, k=int(rng.integers(1, 4))).copy()
            elif kind == "film_border":
                out = film_border(base, rng)
            elif kind == "burnt_text":
                out = burnt_text(base, rng)
            elif kind == "screenshot":
                out = screenshot(rng)
            elif kind == "not_chest":
                out = not_chest(sources, rng)
            else:
                raise ValueError(f"Unknown kind {kind!r}; choose one of {KINDS}")
            # Corrupted films keep their patient: in a real collection the bad scan sits beside good ones.
            add(out, name if kind not in ("screenshot", "not_chest") else f"stray{len(rows)}", kind)
    for _ in range(per_kind):
        add(jitter(annotated.astype(np.float32), rng), "16747_3_1", "real_annotated")
    frame = pd.DataFrame(rows)
    frame.insert(4, "split", assign_patient_splits(frame["patient_id"], (0.85, 0.15, 0.0), seed=seed))
    return write_manifest(frame, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--out", type=Path, default=Path("runs/lnfs-realcxr"))
    parser.add_argument("--variants", type=int, default=5)
    parser.add_argument("--per-kind", type=int, default=3)
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--vae", type=Path, default=None, help="reuse a VAE (OUT/filtered/vae of an earlier run)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    build_pool(args.shared, args.out / "data", args.variants, args.per_kind, args.seed)
    plan = VAEPlan(None, "kl-f4", size=args.size, steps=args.vae_steps, batch_size=32, crop_size=None)
    run_filter(
        args.out / "data",
        args.out / "filtered",
        FilterSettings(),
        vae=args.vae,
        device="cpu",
        seed=args.seed,
        vae_plan=plan,
    )
    report = json.loads((args.out / "filtered" / "filter_report.json").read_text())
    evaluation = report["evaluation"]
    scores = pd.read_csv(args.out / "filtered" / "scores.csv", keep_default_na=False)
    ranks = scores["score"].rank(ascending=False)
    summary = {
        "images": report["images"],
        "noisy": evaluation["noisy_images"],
        "flagged": report["flagged"],
        "roc_auc": {k: round(v, 4) for k, v in evaluation["roc_auc"].items()},
        "clean_removed_share": round(evaluation["clean_removed_share"], 4),
        "per_kind": {
            kind: {
                "count": v["count"],
                "recall": round(v["recall"], 2),
                "auc_vs_clean": round(v["auc_vs_clean"], 3),
                "score_ranks": sorted(int(r) for r in ranks[scores["noise"] == kind]),
            }
            for kind, v in evaluation["per_kind"].items()
        },
        "vae": {k: report["vae"].get(k) for k in ("psnr", "ssim", "steps", "config")},
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
