"""Fidelity of synthetic images in a feature space: FID and KID (torchmetrics), improved precision and recall.

The features come from :func:`embed` (a timm classifier's penultimate layer); see :mod:`.report`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffcxr_aug.classifiers.models import ClassifierConfig
from diffcxr_aug.classifiers.train import build_transforms
from diffcxr_aug.data.dataset import CXRDataset
from diffcxr_aug.data.manifest import Manifest

PR_NEIGHBOURS = 3  # k of improved precision/recall (Kynkäänniemi et al. use 3)


class _Features(torch.nn.Module):
    """Hands precomputed feature rows to torchmetrics unchanged (its ``num_features`` sizes the state)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@torch.no_grad()
def embed(
    model: torch.nn.Module,
    config: ClassifierConfig,
    manifest: Manifest,
    device: torch.device,
    batch_size: int = 64,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Penultimate-layer features, sigmoid scores and stored labels of every row of ``manifest``.

    timm models split into ``forward_features`` and ``forward_head``; ``pre_logits=True`` gives the pooled
    vector the classifier's last layer reads.
    """
    transform = build_transforms((config.mean,), (config.std,), train=False)
    dataset = CXRDataset(manifest, config.image_size, config.label_names, transform=transform, progress=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model.eval()
    features, scores, labels = [], [], []
    for batch in tqdm(loader, desc=desc, leave=False, unit="batch"):
        pooled = model.forward_head(model.forward_features(batch["image"].to(device)), pre_logits=True)
        features.append(pooled.float().cpu().numpy())
        scores.append(torch.sigmoid(model.get_classifier()(pooled).float()).cpu().numpy())
        labels.append(batch["labels"].numpy())
    return np.concatenate(features), np.concatenate(scores), np.concatenate(labels)


def feature_distances(
    real: np.ndarray, fake: np.ndarray, seed: int = 0, fid_images: int | None = None
) -> dict[str, float]:
    """FID and KID (mean and std over subsets) between two feature sets, by torchmetrics, and improved
    precision and recall (:func:`precision_recall`, on every row).

    FID is biased upwards by about 1/n, so sets compared with each other (and with the real-to-real floor) must
    be measured on the same number of images: ``fid_images`` draws that many rows of ``fake`` (seeded) for FID.
    KID is unbiased and uses every row.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 images on each side (got {len(real)} real, {len(fake)} synthetic)")
    width = real.shape[1]
    fid = FrechetInceptionDistance(feature=_Features(width), reset_real_features=False)
    subset = min(1000, len(real), len(fake))
    with warnings.catch_warnings():  # it keeps every feature row; these are already features, and few
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        kid = KernelInceptionDistance(feature=_Features(width), subsets=50, subset_size=subset)
    r, f = torch.from_numpy(real).double(), torch.from_numpy(fake).double()
    n_fid = len(fake) if fid_images is None else min(fid_images, len(fake))
    if n_fid < len(fake):
        f_fid = f[np.sort(np.random.default_rng(seed).choice(len(fake), n_fid, replace=False))]
    else:
        f_fid = f
    fid.update(r, real=True)
    fid.update(f_fid, real=False)
    kid.update(r, real=True)
    kid.update(f, real=False)
    with torch.random.fork_rng(devices=[]):  # KID draws its subsets from the global generator
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid": float(kid_mean),
        "kid_std": float(kid_std),
        # None for sets too small to have k neighbours (tiny test manifests).
        **(
            precision_recall(real, fake)
            if min(len(real), len(fake)) > PR_NEIGHBOURS
            else {"precision": None, "recall": None, "pr_neighbours": PR_NEIGHBOURS}
        ),
        "n_real": len(real),
        "n_synthetic": len(fake),
        "n_synthetic_fid": n_fid,
    }


def _inside(queries: np.ndarray, support: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Whether each query lies in at least one ball ``||q - support_i|| <= radii_i``."""
    from sklearn.metrics import pairwise_distances_chunked

    def reduce(chunk: np.ndarray, start: int) -> np.ndarray:
        return (chunk <= radii[None, :]).any(axis=1)

    return np.concatenate(list(pairwise_distances_chunked(queries, support, reduce_func=reduce)))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019) of ``fake`` against ``real`` features.

    Each set's manifold is the union of balls around its rows reaching their k-th nearest neighbour in the same
    set. Precision: the share of synthetic rows inside the real manifold (images that look like some real image;
    a malformed or noise-like image falls outside). Recall: the share of real rows inside the synthetic manifold
    (how much of the real variety is covered). Both depend on the set sizes, so compare sets of equal size.
    """
    from sklearn.neighbors import NearestNeighbors

    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} rows per set ({len(real)}, {len(fake)})")

    def radii(x: np.ndarray) -> np.ndarray:
        distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
        return distances[:, k]  # column 0 is the row itself

    return {
        "precision": float(_inside(fake, real, radii(real)).mean()),
        "recall": float(_inside(real, fake, radii(fake)).mean()),
        "pr_neighbours": k,
    }
