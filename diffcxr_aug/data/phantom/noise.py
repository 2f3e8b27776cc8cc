"""The noisy images a real CXR collection holds, for the latent noise filter (LNFS) to find.

Each kind is recorded in the manifest's ``noise`` column (empty for clean images):

* ``lateral``: a lateral view in a set meant to be frontal (its ``view`` is ``LATERAL``);
* ``inverted``: grey levels inverted (a MONOCHROME1 image read as MONOCHROME2);
* ``rotated``: stored rotated by 90, 180 or 270 degrees, or tilted by a large angle;
* ``cropped``: only part of the chest, enlarged;
* ``collimated``: tight collimation leaves broad unexposed (white) borders that cut into the chest;
* ``overexposed`` / ``underexposed``: burnt-out dark or washed-out grey, grainy images;
* ``burnt_text``: large burnt-in annotations, rulers and arrows;
* ``not_cxr``: not a chest radiograph at all (a hand, an abdomen, a skull, a scanned form).

Clean images may carry the small side marker every real radiograph has; that is not noise.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from diffcxr_aug.data.phantom.anatomy import smoothstep, texture
from diffcxr_aug.data.phantom.findings import NOISE_KINDS, StudyTruth

NOT_CXR_KINDS = ("hand", "abdomen", "skull", "form")


def _font(px: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(6, int(px)))


def side_marker(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The small lead 'L' or 'R' marker near an upper corner, as on most real radiographs."""
    res = img.shape[0]
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    x = rng.uniform(0.04, 0.12) * res if rng.random() < 0.5 else rng.uniform(0.84, 0.9) * res
    draw.text((x, rng.uniform(0.03, 0.12) * res), "L" if rng.random() < 0.7 else "R", fill=1.0, font=_font(res / 18))
    return np.asarray(pil, dtype=np.float32)


def corrupt(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Apply one corruption to a clean float image in [0, 1] (``lateral`` and ``not_cxr`` are drawn, not applied)."""
    res = img.shape[0]
    if kind == "inverted":
        return 1.0 - img
    if kind == "rotated":
        if rng.random() < 0.7:
            return np.rot90(img, k=int(rng.integers(1, 4))).copy()
        angle = float(rng.choice([-1, 1]) * rng.uniform(20, 45))
        return ndimage.rotate(img, angle, reshape=False, order=1, mode="constant", cval=0.0)
    if kind == "cropped":
        side = int(res * rng.uniform(0.35, 0.55))
        y0, x0 = (int(rng.integers(0, res - side)) for _ in range(2))
        crop = Image.fromarray(img[y0 : y0 + side, x0 : x0 + side])
        return np.asarray(crop.resize((res, res), Image.Resampling.BILINEAR), dtype=np.float32)
    if kind == "collimated":
        out = img.copy()
        lo = rng.uniform(0.12, 0.3, 2)
        hi = rng.uniform(0.7, 0.88, 2)
        yy, xx = np.mgrid[0:res, 0:res] / res
        inside = (yy > lo[0]) & (yy < hi[0]) & (xx > lo[1]) & (xx < hi[1])
        level = rng.uniform(0.8, 0.95)
        out[~inside] = level + 0.03 * rng.standard_normal(int((~inside).sum()))
        return out
    if kind == "overexposed":
        return np.clip(img**2.4 * rng.uniform(0.4, 0.6) + rng.normal(0, 0.01, img.shape), 0, 1)
    if kind == "underexposed":
        flat = 0.55 + 0.4 * img**0.35
        return np.clip(flat + rng.normal(0, 0.06, img.shape), 0, 1)
    if kind == "burnt_text":
        return burnt_text(img, rng)
    raise ValueError(f"Unknown corruption {kind!r}; choose one of {', '.join(NOISE_KINDS)}")


def burnt_text(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    res = img.shape[0]
    pil = Image.fromarray(img.astype(np.float32))
    draw = ImageDraw.Draw(pil)
    lines = [
        str(rng.choice(["PORTABLE", "SUPINE", "AP UPRIGHT", "ERECT", "SEMI-ERECT", "TRAUMA"])),
        f"{int(rng.integers(2100, 2190))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}",
        str(rng.choice(["ICU BED 4", "ED", "WARD 7", "HOSP ___", "ID ___"])),
    ]
    font = _font(res / rng.uniform(6.5, 9))
    y = rng.uniform(0.02, 0.1) * res
    x = rng.uniform(0.02, 0.3) * res
    for line in lines[: int(rng.integers(2, 4))]:
        draw.text((x, y), line, fill=1.0, font=font)
        y += res / 7.5
    # A ruler or an arrow pointing at something.
    if rng.random() < 0.6:
        y0 = rng.uniform(0.6, 0.9) * res
        draw.line([(0.1 * res, y0), (0.9 * res, y0)], fill=1.0, width=max(1, res // 100))
        for t in np.linspace(0.1, 0.9, 9):
            draw.line([(t * res, y0), (t * res, y0 - res * 0.03)], fill=1.0, width=max(1, res // 150))
    else:
        x0, y0 = rng.uniform(0.3, 0.7, 2) * res
        draw.line([(x0, y0), (x0 + 0.2 * res, y0 + 0.15 * res)], fill=1.0, width=max(1, res // 60))
        draw.polygon([(x0, y0), (x0 + 0.08 * res, y0 + 0.02 * res), (x0 + 0.03 * res, y0 + 0.07 * res)], fill=1.0)
    return np.asarray(pil, dtype=np.float32)


def render_lateral(truth: StudyTruth, res: int, rng: np.random.Generator) -> np.ndarray:
    """A lateral chest view: anterior to the image left, spine posterior, heart anterior on the diaphragm."""
    coords = (np.arange(res, dtype=np.float32) + 0.5) / res * 2 - 1
    X, Y = np.meshgrid(coords, coords)
    scale = rng.normal(1.0, 0.04)
    X = (X - rng.normal(0, 0.03)) / scale
    Y = (Y - rng.normal(0, 0.03)) / scale
    px = 2.0 / res
    # Body: anterior chest wall curving back towards the neck, straight back.
    front = -0.78 + 0.22 * np.clip(-0.45 - Y, 0.0, None) ** 1.2 + 0.04 * Y**2
    back = 0.84 - 0.05 * Y**2
    body = smoothstep(X - front, 3 * px) * smoothstep(back - X, 3 * px)
    thick = np.sqrt(np.clip((X - front) * (back - X), 0.0, None)) / 0.8
    dens = body * (0.38 + 0.25 * np.clip(thick, 0, 1))
    # Diaphragm: high anteriorly, low posteriorly (the deep posterior costophrenic sulcus).
    dia = (
        0.22 + 0.3 * np.clip((X + 0.6) / 1.35, 0.0, 1.0) ** 1.6 - 0.06 * np.sin(np.pi * np.clip((X + 0.6) / 1.3, 0, 1))
    )
    lung = smoothstep(X - (front + 0.07), 4 * px) * smoothstep(dia - Y, 3 * px)
    lung *= smoothstep(1.0 - np.hypot((X - 0.06) / 0.7, (Y - 0.2) / 1.02), 6 * px)
    above = smoothstep(dia - Y, 3 * px)
    heart = smoothstep(1.0 - np.hypot((X + 0.3) / 0.36, (Y - 0.28) / 0.36), 0.1) * above
    lung_air = lung * (1.0 - heart)
    # Both lungs overlap: most air in the retrosternal and retrocardiac spaces.
    depth = 0.75 + 0.25 * np.clip(np.sin(np.pi * np.clip((X + 0.7) / 1.4, 0, 1)), 0, 1)
    dens -= (0.44 + 0.03 * texture(rng, res, res / 60)) * lung_air * depth
    dens += 0.06 * heart * body + 0.1 * smoothstep(Y - dia, 4 * px) * body
    bones = Image.new("F", (res, res), 0.0)
    draw = ImageDraw.Draw(bones)

    def pix(x, y):
        return ((x * scale + 1) / 2 * res, (y * scale + 1) / 2 * res)

    # Thoracic spine: vertebral bodies with disc spaces, along a gentle kyphosis; ribs arc back to it.
    y = -1.05
    while y < 1.05:
        x = 0.52 + 0.05 * np.cos(y * 1.5)
        h = 0.085
        draw.polygon(
            [pix(x - 0.09, y), pix(x + 0.08, y + 0.01), pix(x + 0.08, y + h + 0.01), pix(x - 0.09, y + h)], fill=0.5
        )
        draw.line([pix(x + 0.12, y + 0.03), pix(x + 0.22, y + 0.06)], fill=0.4, width=max(1, res // 60))
        y += h + 0.022
    for k in range(9):
        y0 = -0.55 + 0.12 * k
        pts = [pix(0.45 - 0.5 * t, y0 + 0.1 * t + 0.15 * t * t) for t in np.linspace(0, 1, 12)]
        draw.line(pts, fill=0.25, width=max(1, res // 70))
    # Sternum, and the humeri projecting over the upper chest.
    draw.line([pix(-0.62, -0.55), pix(-0.7, 0.15)], fill=0.45, width=max(1, res // 35))
    for dx in (-0.08, 0.05):
        draw.line([pix(-0.3 + dx, -1.1), pix(-0.1 + dx, -0.35)], fill=0.3, width=max(1, res // 14))
    bone_layer = ndimage.gaussian_filter(np.asarray(bones), res / 250)
    dens += 0.28 * bone_layer
    # Trachea and hila.
    air = Image.new("F", (res, res), 0.0)
    ImageDraw.Draw(air).line([pix(-0.12, -1.05), pix(0.02, -0.15)], fill=1.0, width=max(1, res // 28))
    dens -= 0.12 * ndimage.gaussian_filter(np.asarray(air), res / 200)
    dens += 0.08 * smoothstep(1.0 - np.hypot((X - 0.05) / 0.16, (Y + 0.08) / 0.2), 0.5) * lung
    lo, hi = rng.normal(0.03, 0.02), rng.normal(0.86, 0.04)
    img = np.clip((dens - lo) / (hi - lo), 0, 1)
    img = ndimage.gaussian_filter(img, 0.7) + rng.normal(0, 0.012, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def render_not_cxr(res: int, rng: np.random.Generator) -> np.ndarray:
    """Something that is not a chest radiograph: a hand, an abdomen, a skull or a scanned form."""
    kind = NOT_CXR_KINDS[int(rng.integers(len(NOT_CXR_KINDS)))]
    img = Image.new("F", (res, res), 0.0)
    draw = ImageDraw.Draw(img)
    if kind == "form":
        page = np.full((res, res), rng.uniform(0.85, 0.97), np.float32)
        img = Image.fromarray(page)
        draw = ImageDraw.Draw(img)
        font = _font(res / 16)
        y = res * 0.06
        while y < res * 0.9:
            words = " ".join(
                str(rng.choice(["Patient", "___", "Date", "Order", "Exam", "Signature", "MRN", "X"]))
                for _ in range(int(rng.integers(2, 6)))
            )
            draw.text((res * 0.06, y), words, fill=0.1, font=font)
            y += res / 12
        return np.clip(np.asarray(img) + rng.normal(0, 0.02, (res, res)), 0, 1).astype(np.float32)
    if kind == "hand":
        cx, cy = res * rng.uniform(0.4, 0.6), res * 0.72
        draw.ellipse([cx - 0.22 * res, cy - 0.18 * res, cx + 0.22 * res, cy + 0.25 * res], fill=0.45)
        for k, angle in enumerate(np.linspace(-0.9, 0.6, 5)):
            length = res * (0.42 if 0 < k < 4 else 0.3)
            bx = cx + np.sin(angle) * res * 0.16
            by = cy - np.cos(angle) * res * 0.1
            ex, ey = bx + np.sin(angle * 0.6) * length, by - np.cos(angle * 0.6) * length
            draw.line([(bx, by), (ex, ey)], fill=0.45, width=int(res * 0.07))
            for t in np.linspace(0, 1, 4)[:-1]:  # phalanges: bone segments with joint gaps
                sx, sy = bx + (ex - bx) * t, by + (ey - by) * t
                fx, fy = bx + (ex - bx) * (t + 0.28), by + (ey - by) * (t + 0.28)
                draw.line([(sx, sy), (fx, fy)], fill=0.9, width=max(1, int(res * 0.035)))
    elif kind == "abdomen":
        draw.rectangle([0.08 * res, 0, 0.92 * res, res], fill=0.55)
        for _ in range(int(rng.integers(8, 16))):  # bowel gas
            x, y = rng.uniform(0.2, 0.8) * res, rng.uniform(0.1, 0.7) * res
            r = rng.uniform(0.03, 0.07) * res
            draw.ellipse([x - r, y - r * 0.7, x + r, y + r * 0.7], fill=0.2)
        draw.rectangle([0.45 * res, 0, 0.55 * res, 0.75 * res], fill=0.75)  # lumbar spine
        draw.ellipse([0.15 * res, 0.7 * res, 0.85 * res, 1.15 * res], outline=0.9, width=max(1, int(0.04 * res)))
    else:  # skull
        draw.ellipse([0.12 * res, 0.08 * res, 0.88 * res, 0.92 * res], fill=0.85)
        draw.ellipse([0.16 * res, 0.12 * res, 0.84 * res, 0.88 * res], fill=0.5)
        draw.ellipse([0.3 * res, 0.55 * res, 0.45 * res, 0.68 * res], fill=0.25)  # orbits
        draw.ellipse([0.55 * res, 0.55 * res, 0.7 * res, 0.68 * res], fill=0.25)
    arr = ndimage.gaussian_filter(np.asarray(img, dtype=np.float32), res / 200)
    return np.clip(arr + rng.normal(0, 0.015, arr.shape), 0, 1).astype(np.float32)
