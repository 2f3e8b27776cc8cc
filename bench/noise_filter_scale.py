"""Time LNFS (fit and score) on many synthetic latents of the phantom-128 shape (4 x 32 x 32).

    python bench/noise_filter_scale.py [--n 100000] [--shape 4 32 32] [--outliers 0.02] [--threads 2]

The latents are a normal population (a template, 16 smooth modes of variation and per-pixel noise) with a
share of far-off images (inverted, rotated, a bright local mark). Prints, as one JSON object, the seconds
of every stage, the total in minutes, the time to score up to 10,000 images again with the fitted filter,
peak memory and the ROC AUC on the planted outliers. The timing is of the filter alone: encoding 100,000
images with the VAE comes on top.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from diffcxr_aug.generator.noise_filter import LatentNoiseFilter


def synthetic_latents(
    n: int, shape: tuple[int, int, int], outliers: float, seed: int
) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    smooth = lambda t: F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)  # noqa: E731
    template = smooth(torch.randn(1, c, h // 4, w // 4, generator=g))[0]
    modes = smooth(torch.randn(16, c, h // 4, w // 4, generator=g))
    latents = torch.empty(n, c, h, w)
    for start in range(0, n, 10000):  # in chunks: the (chunk, 16, c, h, w) product stays small
        m = min(10000, n - start)
        coef = torch.randn(m, 16, generator=g)
        latents[start : start + m] = template + 0.3 * torch.einsum("nk,kchw->nchw", coef, modes)
        latents[start : start + m] += 0.3 * torch.randn(m, c, h, w, generator=g)
    n_out = int(round(outliers * n))
    rows = torch.randperm(n, generator=g)[:n_out]
    third = n_out // 3
    latents[rows[:third]] = -latents[rows[:third]]
    latents[rows[third : 2 * third]] = latents[rows[third : 2 * third]].rot90(1, (2, 3))
    latents[rows[2 * third :], :, : h // 4, : w // 2] += 2.0
    truth = np.zeros(n, dtype=bool)
    truth[rows.numpy()] = True
    return latents, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--shape", type=int, nargs=3, default=(4, 32, 32))
    parser.add_argument("--outliers", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    latents, truth = synthetic_latents(args.n, tuple(args.shape), args.outliers, args.seed)
    start = time.perf_counter()
    filt = LatentNoiseFilter(seed=args.seed, progress=False).fit(latents)
    fit_seconds = time.perf_counter() - start
    n_new = min(args.n, 10000)
    start = time.perf_counter()
    filt.score(latents[:n_new])  # scoring images the filter was not fitted on (here: the same ones again)
    score_seconds = time.perf_counter() - start
    final = filt.train_scores_
    result = {
        "n": args.n,
        "latent_shape": list(args.shape),
        "threads": torch.get_num_threads(),
        "fit_seconds_by_stage": {k: round(v, 1) for k, v in filt.timings_.items()},
        "fit_minutes": round(fit_seconds / 60, 2),
        f"score_{n_new}_seconds": round(score_seconds, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "roc_auc_planted_outliers": {
            "kmeans": round(roc_auc_score(truth, final.kmeans), 4),
            "manifold": round(roc_auc_score(truth, final.manifold), 4),
            "final": round(roc_auc_score(truth, final.final), 4),
        },
        "flagged": int(filt.flagged_.sum()),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
