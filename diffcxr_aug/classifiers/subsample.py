"""The real training subset of a sweep: a fraction of the train split, drawn by patient, label-stratified.

The subset depends only on the train split, the fraction and the seed, never on the training mode, so
``real``, ``mix`` and ``pretrain-finetune`` runs at the same fraction and seed see exactly the same real
images (paired comparisons). For one seed the subsets are nested: the 1% subset is part of the 10% one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from diffcxr_aug.data.manifest import Manifest
from diffcxr_aug.errors import InputError

logger = logging.getLogger(__name__)


def patient_order(train: Manifest, label_names: Sequence[str], seed: int) -> list[str]:
    """Every train patient once, in the order a subset takes them: label coverage first, then at random.

    The order starts with one patient per label, rarest label first, each picked at random among the
    patients with a positive image for a label not yet covered, so that even a tiny prefix keeps a
    positive for every label where the budget allows. The remaining patients follow in random order.
    """
    frame = train.frame
    rng = np.random.default_rng(seed)
    patients = np.asarray(sorted(frame["patient_id"].unique()))
    patients = patients[rng.permutation(len(patients))]
    rank = {p: i for i, p in enumerate(patients)}

    labels = train.labels(list(label_names))
    positive = pd.DataFrame(labels == 1, columns=list(label_names), index=frame.index)
    positive_by_patient = positive.groupby(frame["patient_id"]).any()
    # Patients with a positive, per label, in the random order above.
    holders = {
        name: sorted(positive_by_patient.index[positive_by_patient[name]], key=rank.__getitem__)
        for name in label_names
    }
    uncovered = {name for name, who in holders.items() if who}
    order: list[str] = []
    chosen: set[str] = set()
    while uncovered:
        rarest = min(uncovered, key=lambda name: (len(holders[name]), list(label_names).index(name)))
        pick = next(p for p in holders[rarest] if p not in chosen)
        order.append(pick)
        chosen.add(pick)
        uncovered -= {name for name in uncovered if positive_by_patient.at[pick, name]}
    order.extend(p for p in patients if p not in chosen)
    return order


def sample_real_fraction(
    train: Manifest, fraction: float, seed: int, label_names: Sequence[str] | None = None
) -> Manifest:
    """The real training subset for ``fraction`` of the train split's images, whole patients only.

    Patients are taken in :func:`patient_order` until the subset holds at least
    ``max(1, round(fraction * images))`` images; ``fraction=1.0`` is the whole split.

    Args:
        train: the train split of the real manifest.
        fraction: share of the train images, in (0, 1].
        seed: the same (fraction, seed) always gives the same subset.
        label_names: labels to stratify on; defaults to the manifest's.

    Returns:
        A subset of ``train`` (row numbers of the manifest file kept, so the image cache serves it).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    if len(train) == 0:
        raise InputError(f"{train.source}: the train split is empty; nothing to subsample")
    names = list(label_names) if label_names is not None else train.label_names
    if fraction == 1.0:
        return train.subset(train.frame.index)
    target = max(1, round(fraction * len(train)))
    images_per_patient = train.frame.groupby("patient_id").size()
    taken: list[str] = []
    count = 0
    for patient in patient_order(train, names, seed):
        if count >= target:
            break
        taken.append(patient)
        count += int(images_per_patient[patient])
    subset = train.subset(train.frame["patient_id"].isin(taken))
    missing = [n for n in names if (train.labels([n]) == 1).any() and not (subset.labels([n]) == 1).any()]
    if missing:
        logger.info(
            "Real subset (fraction %g, seed %d, %d images) has no positive for %d label(s): %s",
            fraction,
            seed,
            len(subset),
            len(missing),
            ", ".join(missing),
        )
    return subset
