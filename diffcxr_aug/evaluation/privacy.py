"""Memorisation: each synthetic image's similarity to its nearest real training image, against held-out real
images' own, in the reference classifier's features and in pixel space, and the closest pairs drawn side by side.

The feature space sees what the classifier sees (a copy under heavy changes of grey level or small shifts); pixel
space sees the film itself, at :data:`PIXEL_SIDE` x :data:`PIXEL_SIDE` after subtracting each image's mean, with
the mirror image tried too (a flipped copy is still a copy). An image is a possible copy when it is closer to a
training image than :data:`COPY_QUANTILE` of held-out real images are, in either space."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from diffcxr_aug.data.manifest import Manifest
from diffcxr_aug.figures import pyplot, save_figure, show_image
from diffcxr_aug.io import atomic_path

COPY_QUANTILE = 0.99
PIXEL_SIDE = 32
COPIES_DIR = "copies"  # one CSV a set: every image's nearest-training similarity in both spaces, and its flag


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_neighbours(queries: np.ndarray, reference: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity to, and index of, each query's nearest reference row."""
    q, r = _unit(queries), _unit(reference)
    best, where = np.empty(len(q)), np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), chunk):
        sims = q[start : start + chunk] @ r.T
        where[start : start + chunk] = sims.argmax(axis=1)
        best[start : start + chunk] = sims.max(axis=1)
    return best, where


def privacy(
    synthetic: np.ndarray, train: np.ndarray, held_out: np.ndarray, quantile: float = COPY_QUANTILE
) -> dict[str, Any]:
    """Nearest-training-image similarity of synthetic images against that of held-out real images."""
    syn_sim, syn_idx = nearest_neighbours(synthetic, train)
    real_sim, _ = nearest_neighbours(held_out, train)
    threshold = float(np.quantile(real_sim, quantile))
    return {
        "nn_similarity_synthetic_median": float(np.median(syn_sim)),
        "nn_similarity_real_test_median": float(np.median(real_sim)),
        "copy_threshold": threshold,
        "copy_threshold_meaning": f"the {quantile:.0%} quantile of real test images' similarity to their nearest "
        "training image",
        "flagged": int((syn_sim > threshold).sum()),
        "flagged_share": float((syn_sim > threshold).mean()),
        "expected_share_if_like_real": 1.0 - quantile,
        "_similarity": syn_sim,
        "_neighbour": syn_idx,
        "_flags": syn_sim > threshold,
    }


def pixel_features(manifest: Manifest, size: int, side: int = PIXEL_SIDE) -> np.ndarray:
    """``(rows, side * side)`` grey levels of the manifest's images (from its ``size`` image cache, area-resized to
    ``side``), each minus its mean: their cosine similarity is the images' correlation."""
    import torch
    import torch.nn.functional as F

    from diffcxr_aug.data.cache import open_cache

    images = np.asarray(open_cache(manifest.full, size, progress=False)[manifest.frame.index.to_numpy()])
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = F.interpolate(x, size=(side, side), mode="area").flatten(1).numpy()
    return x - x.mean(axis=1, keepdims=True)


def _mirrored(pixels: np.ndarray) -> np.ndarray:
    side = int(round(np.sqrt(pixels.shape[1])))
    return pixels.reshape(-1, side, side)[:, :, ::-1].reshape(len(pixels), -1)


def pixel_privacy(
    synthetic: np.ndarray, train: np.ndarray, held_out: np.ndarray, quantile: float = COPY_QUANTILE
) -> dict[str, Any]:
    """:func:`privacy` in pixel space (rows from :func:`pixel_features`), each image also compared mirrored."""

    def nearest(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        (plain, at), (flipped, flipped_at) = (
            nearest_neighbours(queries, train),
            nearest_neighbours(_mirrored(queries), train),
        )
        return np.maximum(plain, flipped), np.where(flipped > plain, flipped_at, at)

    syn_sim, syn_idx = nearest(synthetic)
    real_sim, _ = nearest(held_out)
    threshold = float(np.quantile(real_sim, quantile))
    return {
        "side": int(round(np.sqrt(synthetic.shape[1]))),
        "nn_similarity_synthetic_median": float(np.median(syn_sim)),
        "nn_similarity_real_test_median": float(np.median(real_sim)),
        "copy_threshold": threshold,
        "flagged": int((syn_sim > threshold).sum()),
        "flagged_share": float((syn_sim > threshold).mean()),
        "_similarity": syn_sim,
        "_neighbour": syn_idx,
        "_flags": syn_sim > threshold,
    }


def plot_neighbours(
    pairs: list[tuple[str, Manifest, int, Manifest, int, float]], path: Path, size: int
) -> Path | None:
    """Synthetic image next to its nearest real training image, for the closest pairs of every set."""
    if not pairs:
        return None
    from diffcxr_aug.data.images import load_image, to_uint8_square

    plt = pyplot()

    fig, axes = plt.subplots(2, len(pairs), figsize=(1.8 * len(pairs), 4.0), squeeze=False)
    for col, (name, syn, i, real, j, sim) in enumerate(pairs):
        for row, (manifest, index) in enumerate(((syn, i), (real, j))):
            show_image(axes[row, col], to_uint8_square(load_image(manifest.image_paths()[index]), size))
        axes[0, col].set_title(f"{name}\ncos {sim:.3f}", fontsize=8)
    axes[0, 0].set_ylabel("synthetic", fontsize=9)
    axes[1, 0].set_ylabel("nearest real\n(train split)", fontsize=9)
    fig.suptitle("Closest synthetic-to-training pairs (reference-classifier features)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def write_copies(path: Path, manifest: Manifest, train: Manifest, feature: dict, pixel: dict) -> None:
    """Every synthetic image's nearest training image and similarity in both spaces, and whether it is a possible
    copy (closer than the held-out real images' 99% quantile in either)."""
    train_paths = np.array([str(p) for p in train.image_paths()])
    frame = pd.DataFrame(
        {
            "image_path": [str(p) for p in manifest.image_paths()],
            "feature_similarity": feature["_similarity"],
            "feature_neighbour": train_paths[feature["_neighbour"]],
            "pixel_similarity": pixel["_similarity"],
            "pixel_neighbour": train_paths[pixel["_neighbour"]],
            "flagged_feature": feature["_flags"].astype(int),
            "flagged_pixel": pixel["_flags"].astype(int),
        }
    )
    frame["flagged"] = frame["flagged_feature"] | frame["flagged_pixel"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
