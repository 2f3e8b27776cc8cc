"""A torch ``Dataset`` over a manifest, reading images from the cache."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from diffcxr_aug.data.cache import open_cache
from diffcxr_aug.data.manifest import Manifest


class CXRDataset(Dataset):
    """Samples are dicts with fixed keys: ``image`` (1 x H x W float in [0, 1]), ``labels`` (float, NaN =
    unknown), ``report`` (str) and ``index`` (row in the manifest).

    Args:
        manifest: a validated manifest (or a split of one).
        size: image side in pixels; the cache at that size is built on first use.
        label_names: label columns, in order; defaults to the manifest's own.
        transform: optional callable applied to the image tensor (augmentation, normalisation).
    """

    def __init__(
        self,
        manifest: Manifest,
        size: int,
        label_names: Sequence[str] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        progress: bool = True,
    ) -> None:
        self.manifest = manifest
        self.size = size
        self.label_names = list(label_names) if label_names is not None else manifest.label_names
        self.labels = torch.from_numpy(manifest.labels(self.label_names))
        self.reports = manifest.frame["report"].tolist()
        # One cache per manifest file; a split reads its rows out of it by the file's row numbers.
        self.images = open_cache(manifest.full, size, progress=progress)
        self.rows = manifest.frame.index.to_numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index: int) -> dict:
        image = torch.from_numpy(np.asarray(self.images[self.rows[index]], dtype=np.float32) / 255.0).unsqueeze(0)
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "labels": self.labels[index], "report": self.reports[index], "index": index}


def equalize(image: torch.Tensor) -> torch.Tensor:
    """Histogram-equalise one 8-bit-valued image in [0, 1] (any shape): each grey level becomes the share of the
    image's pixels below it plus half of those at it (its mid-rank), so the result's histogram is as flat as the
    levels allow and depends only on the order of the grey levels, not on exposure or contrast.

    Unlike ``torchvision.transforms.v2.functional.equalize`` (PIL's rule), every image is equalised exactly,
    small ones included (PIL's rule leaves an image of under 256 pixels as it is).
    """
    levels = (image * 255.0).round().clamp(0, 255).long()
    counts = torch.bincount(levels.flatten(), minlength=256).to(torch.float64)
    mid_rank = (counts.cumsum(0) - 0.5 * counts) / levels.numel()
    return mid_rank[levels].to(image.dtype)
