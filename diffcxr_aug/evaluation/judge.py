"""Whether the reference classifier can judge at all, and what ``evaluate`` withholds when it cannot.

Every number in the reference space (FID, KID, precision/recall, density/coverage in its features, the per-label
FIDs, faithfulness and its paired differences) is only as good as the classifier that defines it. A classifier that
reads the real test films no better than chance (too few films, labels it cannot learn) gives a feature space in
which any two sets look alike: a tiny real-to-real floor, a negative KID and a "faithfulness" that says nothing.
So ``evaluate`` first scores the judge on the real test split, over the labels with enough support, and withholds
what depends on it when its 95% interval reaches 0.5 or its mAUC is below :data:`JUDGE_MIN_MAUC`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from diffcxr_aug.classifiers.metrics import thin_label_mask

# Below this the judge is too weak to name one set's images more faithful than another's, interval or not.
JUDGE_MIN_MAUC = 0.6


def thin_labels(y_test: np.ndarray, names: list[str], min_support: int) -> list[str]:
    """The labels with fewer than ``min_support`` positives or negatives among the real test split's known cells:
    their AUC is noise, so neither the judge nor any set is scored on them."""
    return [name for name, thin in zip(names, thin_label_mask(y_test, min_support), strict=True) if thin]


def mask_labels(y: np.ndarray, names: list[str], masked: list[str]) -> np.ndarray:
    """A copy of ``y`` with the ``masked`` labels' columns unknown (NaN), so they are not scored."""
    y = np.array(y, dtype=np.float64)
    for name in masked:
        y[:, names.index(name)] = np.nan
    return y


def judge_verdict(real_test: dict[str, Any], min_support: int, thin: list[str]) -> dict[str, Any]:
    """``{"better_than_chance", "mauc", "ci95", "labels", "min_label_support", "reason"}`` from the judge's
    real-test faithfulness entry (``mauc``, ``mauc_ci95``, ``per_label``)."""
    mauc, ci = real_test["mauc"], real_test.get("mauc_ci95")
    labels = sorted(real_test["per_label"])
    if not labels or not math.isfinite(mauc):
        reason = f"no label has {min_support} or more positives and negatives in the real test split"
    elif ci is None:
        reason = "its interval on the real test split cannot be formed (too few films of a class)"
    elif ci[0] <= 0.5:
        reason = f"its 95% interval on the real test films [{ci[0]:.3f}, {ci[1]:.3f}] includes chance (0.5)"
    elif mauc < JUDGE_MIN_MAUC:
        reason = f"its mAUC on the real test films, {mauc:.3f}, is below the floor of {JUDGE_MIN_MAUC}"
    else:
        reason = None
    return {
        "better_than_chance": reason is None,
        "mauc": mauc,
        "ci95": ci,
        "labels": labels,
        "min_label_support": min_support,
        "not_scored": thin,
        "min_mauc": JUDGE_MIN_MAUC,
        "reason": reason,
    }


def withhold(results: dict[str, Any]) -> dict[str, Any]:
    """``results`` without the numbers that depend on a judge no better than chance: the reference space's fidelity
    (floor included), the per-label FIDs, faithfulness and its paired differences. Privacy stays (its pixel check
    does not use the judge; its feature check is named as the judge's), and so do the other feature spaces."""
    reason = results["judge"]["reason"]
    note = f"withheld: the reference classifier is no better than chance here ({reason})"
    results["real_test"]["floor"] = None
    for entry in results["synthetic"].values():
        entry["fidelity"], entry["fidelity_per_label"], entry["faithfulness"] = None, {}, None
    results["feature_spaces"]["reference"] = {"note": note}
    results["paired"] = []
    return results


def independent_spaces(results: dict[str, Any]) -> list[str]:
    """The feature spaces computed in this report that do not depend on the reference classifier."""
    return [
        name for name, entry in results.get("feature_spaces", {}).items() if name != "reference" and "floor" in entry
    ]
