"""Deterministic patient-level splits shared by every dataset adapter."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from diffcxr_aug.data.manifest import check_patient_splits
from diffcxr_aug.errors import InputError

DEFAULT_FRACTIONS: tuple[float, float, float] = (0.7, 0.1, 0.2)


def _patient_uniform(patient_id: str, seed: int) -> float:
    # A hash rather than a shuffled list: a patient's split depends only on (seed, patient id), so it is
    # the same whatever order the rows come in and stays put when the collection grows.
    digest = hashlib.blake2b(f"{seed}:{patient_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_patient_splits(
    patient_ids: pd.Series | list[str],
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> np.ndarray:
    """Return ``train|val|test`` for each row so that no patient is in two splits.

    Args:
        patient_ids: one patient id per row (rows of the same patient get the same split).
        fractions: target shares of patients for train, val and test; must sum to 1.
        seed: changes the assignment; the same seed always gives the same splits.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise InputError(
            f"fractions must be three non-negative numbers (train, val, test) summing to 1, got {fractions}"
        )
    ids = pd.Series(list(patient_ids), dtype=str)
    cut_train, cut_val = fractions[0], fractions[0] + fractions[1]
    by_patient = {}
    for pid in ids.unique():
        u = _patient_uniform(pid, seed)
        by_patient[pid] = "train" if u < cut_train else ("val" if u < cut_val else "test")
    splits = ids.map(by_patient).to_numpy(dtype=object)
    check_patient_splits(pd.DataFrame({"patient_id": ids, "split": splits}), source="assign_patient_splits")
    return splits
