"""Memorisation: each synthetic image's similarity to its nearest real training image, against held-out real
images' own, in the reference classifier's features and in pixel space, and the closest pairs drawn side by side.

The feature space sees what the classifier sees (a copy under heavy changes of grey level); pixel space sees the
film itself, at up to :data:`ALIGN_SIDE` px, as the correlation with the training film best aligned to it: the mirror
image, and a window of the training film zoomed in down to :data:`MIN_SCALE` of its side and shifted, so a flipped,
lightly cropped or noisy copy is still a copy (:func:`aligned_similarity`). An image is a possible copy when it is
closer to a training image than :data:`COPY_QUANTILE` of held-out real images are, in either space (about 0.5% of a
set like real data in each)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from diffcxr_aug.data.manifest import Manifest
from diffcxr_aug.figures import pyplot, save_figure, show_image
from diffcxr_aug.io import atomic_path

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

COPY_QUANTILE = 0.995
ALIGN_SIDE = 64  # films are aligned at their own size up to this
COARSE_SIDE = 16  # the coarse pass over every training film
CROP_SCALES = (0.96, 0.92, 0.88, 0.84)  # the coarse windows; the refinement reaches down to MIN_SCALE
MIN_SCALE = 0.8
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
        "copy_threshold_meaning": f"the {quantile:.1%} quantile of real test images' similarity to their nearest "
        "training image",
        "flagged": int((syn_sim > threshold).sum()),
        "flagged_share": float((syn_sim > threshold).mean()),
        "expected_share_if_like_real": 1.0 - quantile,
        "_similarity": syn_sim,
        "_neighbour": syn_idx,
        "_flags": syn_sim > threshold,
    }


def pixel_images(manifest: Manifest, size: int, side: int = ALIGN_SIDE) -> torch.Tensor:
    """``(rows, 1, s, s)`` grey levels in [0, 1] of the manifest's images (from its ``size`` image cache), area-resized
    to ``s = min(size, side)``: the films :func:`pixel_privacy` aligns."""
    import torch
    import torch.nn.functional as F

    from diffcxr_aug.data.cache import open_cache

    cache = open_cache(manifest.full, size, progress=False)
    rows = manifest.frame.index.to_numpy()
    side = min(side, size)
    out = torch.empty((len(rows), 1, side, side))
    for start in range(0, len(rows), 1024):  # a float copy of 1,024 films at a time, not of the whole cache
        x = torch.from_numpy(np.asarray(cache[rows[start : start + 1024]]).astype(np.float32) / 255.0).unsqueeze(1)
        out[start : start + 1024] = F.interpolate(x, size=(side, side), mode="area") if size != side else x
    return out


def _centred(x: torch.Tensor) -> torch.Tensor:
    """Flattened rows minus their mean, unit length: dot products are the images' correlations."""
    import torch.nn.functional as F

    x = x.flatten(1)
    return F.normalize(x - x.mean(dim=1, keepdim=True), dim=1)


def _windows(images: torch.Tensor, params: torch.Tensor, side: int) -> torch.Tensor:
    """The window of each image at ``params`` rows ``(scale, centre x, centre y)`` (normalised coordinates, the
    whole image is scale 1 at 0, 0), resampled to ``side`` x ``side``."""
    import torch
    import torch.nn.functional as F

    theta = torch.zeros(len(params), 2, 3, device=params.device)
    theta[:, 0, 0] = theta[:, 1, 1] = params[:, 0]
    theta[:, 0, 2], theta[:, 1, 2] = params[:, 1], params[:, 2]
    grid = F.affine_grid(theta, [len(params), 1, side, side], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _coarse_params(device: Any = None) -> torch.Tensor:
    """The whole film and, at each of :data:`CROP_SCALES`, a 3 x 3 grid of windows from corner to corner."""
    import torch

    rows = [(1.0, 0.0, 0.0)]
    for scale in CROP_SCALES:
        shifts = np.linspace(scale - 1.0, 1.0 - scale, 3)
        rows += [(scale, float(x), float(y)) for y in shifts for x in shifts]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def aligned_similarity(
    queries: torch.Tensor,
    train: torch.Tensor,
    candidates: int = 3,
    iterations: int = 4,
    coarse_side: int = COARSE_SIDE,
    chunk: int = 256,
    query_chunk: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query film's best correlation with a training film over the mirror image, zooms into the training film
    down to :data:`MIN_SCALE` and shifts of the window, and the training film's index.

    A coarse pass compares every query, plain and mirrored, with every training film's :func:`_coarse_params`
    windows at ``coarse_side`` px and keeps each query's ``candidates`` best (film, window, mirror); a pattern
    search then refines the window of each (scale, x and y, the steps halved ``iterations`` times) at the films'
    own resolution. Both tensors are ``(n, 1, s, s)`` from :func:`pixel_images`, on one device; memory is bounded
    by ``chunk`` training films (or query-candidate pairs) and ``query_chunk`` queries at a time, however many
    there are."""
    import torch
    import torch.nn.functional as F

    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if len(train) == 0:
        raise ValueError("no training films to compare with")
    device, side, n = queries.device, queries.shape[-1], len(queries)
    if n == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    params = _coarse_params(device)
    views, k = len(params), min(candidates, 2 * len(train))

    def small(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(coarse_side, coarse_side), mode="area") if side > coarse_side else x

    probe = torch.cat([_centred(small(queries)), _centred(small(queries.flip(-1)))])  # plain rows, then mirrored
    best = torch.full((n, k), -2.0, device=device)
    code = torch.zeros((n, k), dtype=torch.long, device=device)  # (film * 2 + mirrored) * views + window
    for start in range(0, len(train), chunk):
        block = train[start : start + chunk]
        c = len(block)
        windows = _centred(small(_windows(block.repeat_interleave(views, 0), params.repeat(c, 1), side))).T
        top = torch.empty((2 * n, c), device=device)
        window = torch.empty((2 * n, c), dtype=torch.long, device=device)
        for q in range(0, 2 * n, query_chunk):
            top[q : q + query_chunk], window[q : q + query_chunk] = (
                (probe[q : q + query_chunk] @ windows).view(-1, c, views).max(dim=2)
            )
        top, window = top.view(2, n, c), window.view(2, n, c)
        film = torch.arange(start, start + c, device=device)
        codes = (film[None, None] * 2 + torch.arange(2, device=device)[:, None, None]) * views + window
        pool_sims = torch.cat([best, top.permute(1, 0, 2).reshape(n, 2 * c)], dim=1)
        pool_codes = torch.cat([code, codes.permute(1, 0, 2).reshape(n, 2 * c)], dim=1)
        keep = pool_sims.topk(k, dim=1).indices
        best, code = pool_sims.gather(1, keep), pool_codes.gather(1, keep)

    # Refine every (query, candidate) pair, `chunk` pairs at a time.
    code = code.flatten()
    film, mirrored, window = code // (2 * views), (code // views) % 2 == 1, code % views
    moves = torch.tensor(
        [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)], dtype=torch.float32, device=device
    )
    # The first scale step: its halvings add up to the distance from the smallest coarse window to MIN_SCALE.
    reach = (min(CROP_SCALES) - MIN_SCALE) / (2.0 - 2.0 ** (1 - iterations))
    score = torch.empty(n * k, device=device)
    for s in range(0, n * k, chunk):
        pairs = torch.arange(s, min(s + chunk, n * k), device=device)
        query = queries[pairs // k]
        query = torch.where(mirrored[pairs, None, None, None], query.flip(-1), query)
        target, films, current = _centred(query), train[film[pairs]], params[window[pairs]]
        step = torch.tensor([reach, 0.06, 0.06], device=device)
        for _ in range(iterations):
            trial = current[:, None, :] + moves[None] * step
            trial[..., 0] = trial[..., 0].clamp(MIN_SCALE, 1.0)
            room = 1.0 - trial[..., 0]
            trial[..., 1:] = torch.maximum(torch.minimum(trial[..., 1:], room[..., None]), -room[..., None])
            seen = _windows(films.repeat_interleave(len(moves), 0), trial.reshape(-1, 3), side)
            sims = torch.einsum("nd,nmd->nm", target, _centred(seen).view(len(pairs), len(moves), -1))
            score[pairs], pick = sims.max(dim=1)
            current = trial[torch.arange(len(pairs), device=device), pick]
            step = step / 2
    score = score.view(n, k)
    winner = score.argmax(dim=1)
    rows = torch.arange(n, device=device)
    return score[rows, winner].cpu().numpy(), film.view(n, k)[rows, winner].cpu().numpy()


def pixel_privacy(
    synthetic: torch.Tensor, train: torch.Tensor, held_out_similarity: np.ndarray, quantile: float = COPY_QUANTILE
) -> dict[str, Any]:
    """:func:`privacy` in pixel space: films from :func:`pixel_images`, similarity from :func:`aligned_similarity`
    (mirror, crop and shift tolerant), the threshold from held-out films' own :func:`aligned_similarity` (computed
    once for every set)."""
    if len(held_out_similarity) == 0:
        raise ValueError("no held-out real films to set the copy threshold with")
    if len(held_out_similarity) < 1.0 / (1.0 - quantile):
        logger.warning(
            "%d held-out real films: the %.1f%% quantile of their similarity is their maximum",
            len(held_out_similarity),
            100 * quantile,
        )
    syn_sim, syn_idx = aligned_similarity(synthetic, train)
    threshold = float(np.quantile(held_out_similarity, quantile))
    flags = syn_sim > threshold
    return {
        "side": int(synthetic.shape[-1]),
        "nn_similarity_synthetic_median": float(np.median(syn_sim)) if len(syn_sim) else None,
        "nn_similarity_real_test_median": float(np.median(held_out_similarity)),
        "copy_threshold": threshold,
        "flagged": int(flags.sum()),
        "flagged_share": float(flags.mean()) if len(syn_sim) else None,
        "_similarity": syn_sim,
        "_neighbour": syn_idx,
        "_flags": flags,
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
    copy (closer than the held-out real images' :data:`COPY_QUANTILE` quantile in either)."""
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
