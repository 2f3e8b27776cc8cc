"""Memorisation: each synthetic image's similarity to its nearest real training image, against held-out real
images' own, and the closest pairs drawn side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffcxr_aug.data.manifest import Manifest
from diffcxr_aug.figures import pyplot, save_figure, show_image

COPY_QUANTILE = 0.99


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
