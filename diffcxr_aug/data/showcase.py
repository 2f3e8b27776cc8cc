"""Rows of a manifest that together show every label: the images of montages and of the generator's sample grids."""

from __future__ import annotations

import numpy as np

from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.manifest import Manifest


def _severities(frame, index) -> float:
    """Highest finding severity of a phantom row (from ``meta_findings``), 0 for other manifests."""
    text = str(frame.at[index, "meta_findings"]) if "meta_findings" in frame.columns else ""
    values = [float(item.split(":")[1]) for item in text.split(";") if item.count(":") >= 1]
    return max(values, default=0.0)


def showcase_rows(manifest: Manifest, n: int = 12, seed: int = 0) -> list[int]:
    """Pick ``n`` clean frontal rows that together show every label positive at least once where possible.

    Greedy: first a normal study without devices, then each pick is a row adding labels not yet shown,
    preferring rows with few findings (each easy to see) and of at least moderate severity (0.7, where
    the phantom's ``meta_findings`` says), chosen at random among equals.
    """
    frame = manifest.frame
    clean = frame[(frame.get("noise", "") == "") & (frame["view"] != "LATERAL")]
    rng = np.random.default_rng(seed)
    labels = [c for c in CHEXPERT_LABELS if c in frame.columns and c != "No Finding"]
    positive = {i: {c for c in labels if clean.at[i, c] == 1.0} for i in clean.index}
    picked: list[int] = []
    shown: set[str] = set()
    normal = (
        [i for i in clean.index if clean.at[i, "No Finding"] == 1.0 and not positive[i]]
        if "No Finding" in clean
        else []
    )
    if normal:
        picked.append(int(rng.choice(normal)))
    while len(picked) < min(n, len(clean)):
        order = rng.permutation(list(positive))

        def score(i, shown=frozenset(shown)):
            new = positive[i] - shown
            # Any severity from 0.7 up counts the same (ties go to the random order): clear, not all florid.
            return (len(new) > 0, -len(positive[i]) if new else 0, min(_severities(clean, i), 0.7) if new else 0.0)

        best = max((i for i in order if i not in picked), key=score)
        picked.append(int(best))
        shown |= positive[best]
    return picked
