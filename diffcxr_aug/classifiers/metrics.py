"""Multi-label ROC AUC with unknown labels masked, mAUC and a bootstrap confidence interval.

Label matrices hold ``1`` (positive), ``0`` (negative), ``-1`` (uncertain) or NaN (unknown). Only
``0`` and ``1`` are scored: an uncertain or unknown cell says nothing about whether the score is right,
so it is left out of that label's AUC rather than guessed. A label is scored only when both classes are
present among its known cells; the mean AUC (mAUC) is the mean over the scored labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from diffcxr_aug.errors import InputError


@dataclass
class AUCResult:
    """Per-label AUCs (NaN where a label was not scored), their mean and the scored label names."""

    per_label: dict[str, float]
    mauc: float
    scored: list[str] = field(default_factory=list)


def _check_shapes(y_true: np.ndarray, y_score: np.ndarray, label_names: Sequence[str] | None) -> list[str]:
    if y_true.ndim != 2 or y_true.shape != y_score.shape:
        raise ValueError(f"y_true and y_score must both be (samples, labels); got {y_true.shape} and {y_score.shape}")
    names = list(label_names) if label_names is not None else [str(j) for j in range(y_true.shape[1])]
    if len(names) != y_true.shape[1]:
        raise ValueError(f"{len(names)} label names for {y_true.shape[1]} label columns")
    return names


def scorable_labels(y_true: np.ndarray) -> np.ndarray:
    """Boolean per label: True where the known (0/1) cells hold both classes."""
    y_true = np.asarray(y_true, dtype=np.float64)
    return ((y_true == 1).any(axis=0)) & ((y_true == 0).any(axis=0))


def thin_label_mask(y_true: np.ndarray, min_support: int) -> np.ndarray:
    """Per label (column), whether it has fewer than ``min_support`` positives or negatives among its known cells."""
    y_true = np.asarray(y_true, dtype=np.float64)
    return ((y_true == 1).sum(axis=0) < min_support) | ((y_true == 0).sum(axis=0) < min_support)


def mask_thin_labels(y_true: np.ndarray, min_support: int) -> np.ndarray:
    """A copy of ``y_true`` in which every label with fewer than ``min_support`` positives or negatives among its
    known cells is unknown (NaN), so that it is not scored: with a handful of one class a label's AUC is noise."""
    y_true = np.array(y_true, dtype=np.float64)
    y_true[:, thin_label_mask(y_true, min_support)] = np.nan
    return y_true


def per_label_auc(y_true: np.ndarray, y_score: np.ndarray, label_names: Sequence[str] | None = None) -> AUCResult:
    """ROC AUC of each label over its known cells, and their mean over labels with both classes present.

    Args:
        y_true: ``(samples, labels)`` with 1/0/-1/NaN; only 0 and 1 are scored.
        y_score: ``(samples, labels)`` scores (probabilities or logits: AUC only uses their order).
        label_names: names for the result dict; defaults to ``"0", "1", ...``.

    Returns:
        An :class:`AUCResult`. ``mauc`` is NaN when no label has both classes.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    names = _check_shapes(y_true, y_score, label_names)
    per_label: dict[str, float] = {}
    scored: list[str] = []
    for j, name in enumerate(names):
        known = (y_true[:, j] == 0) | (y_true[:, j] == 1)
        target = y_true[known, j]
        if target.size == 0 or target.min() == target.max():
            per_label[name] = float("nan")
            continue
        per_label[name] = float(roc_auc_score(target, y_score[known, j]))
        scored.append(name)
    mauc = float(np.mean([per_label[n] for n in scored])) if scored else float("nan")
    return AUCResult(per_label=per_label, mauc=mauc, scored=scored)


def rank_auc(target: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of one label from ranks (the Mann-Whitney U statistic), ties counted as one half.

    It equals ``sklearn.metrics.roc_auc_score`` for binary targets; the bootstrap calls it thousands of
    times, where sklearn's input validation would dominate the cost.
    """
    positive = target == 1
    n_pos = int(positive.sum())
    n_neg = target.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def bootstrap_mauc_ci(
    y_true: np.ndarray,
    y_score: np.ndarray,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    rng: np.random.Generator | int | None = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mAUC, resampling test images with replacement.

    Every resample scores the same labels as the full set (those with both classes): a resample in which
    one of them loses a class is drawn again. Letting such a label drop out instead would shift the mean
    between resamples (a rare label with a poor AUC leaving raises it), and the interval would no
    longer sit around the estimate.

    Args:
        y_true: ``(samples, labels)`` with 1/0/-1/NaN.
        y_score: ``(samples, labels)`` scores.
        n_bootstrap: number of resamples kept.
        confidence: two-sided coverage, e.g. 0.95 for a 95% interval.
        rng: a ``numpy.random.Generator`` or a seed; the same seed gives the same interval.

    Returns:
        ``(low, high)``; ``(nan, nan)`` when no label can be scored at all.

    Raises:
        ValueError: when almost no resample keeps both classes of every scored label (a label with a
            single positive or negative in a large set), so no interval can be formed this way.
    """
    low, high = _bootstrap(y_true, [y_score], n_bootstrap, confidence, rng)[0]
    return low, high


def paired_bootstrap_mauc_difference(
    y_true: np.ndarray,
    score_a: np.ndarray,
    score_b: np.ndarray,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    rng: np.random.Generator | int | None = 0,
) -> tuple[float, float, float]:
    """mAUC(a) - mAUC(b) over the same images and labels, with a paired percentile bootstrap interval.

    For two models scored on one set (or two synthetic sets drawn from the same prompts and seeds, row for
    row): each resample draws images once and scores both, so what the images have in common cancels and
    the interval is that of the difference, much narrower than two separate intervals suggest.

    Returns:
        ``(difference, low, high)``.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    a, b = np.asarray(score_a, dtype=np.float64), np.asarray(score_b, dtype=np.float64)
    _check_shapes(y_true, b, None)
    difference = per_label_auc(y_true, a).mauc - per_label_auc(y_true, b).mauc
    low, high = _bootstrap(y_true, [a, b], n_bootstrap, confidence, rng, combine=lambda m: m[0] - m[1])[0]
    return float(difference), low, high


def _bootstrap(
    y_true: np.ndarray,
    scores: list[np.ndarray],
    n_bootstrap: int,
    confidence: float,
    rng: np.random.Generator | int | None,
    combine=None,
) -> list[tuple[float, float]]:
    """Percentile intervals of the mAUC of each score matrix (or of ``combine`` of their mAUCs), resampling
    images jointly; see :func:`bootstrap_mauc_ci` for why resamples losing a class are drawn again."""
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be at least 1, got {n_bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    y_true = np.asarray(y_true, dtype=np.float64)
    scores = [np.asarray(score, dtype=np.float64) for score in scores]
    for score in scores:
        _check_shapes(y_true, score, None)
    width = 1 if combine is not None else len(scores)
    columns = np.flatnonzero(scorable_labels(y_true))
    if columns.size == 0:
        return [(float("nan"), float("nan"))] * width
    # Per label, its known cells; a resample of images is mapped onto them through the image indices.
    known = [np.flatnonzero((y_true[:, j] == 0) | (y_true[:, j] == 1)) for j in columns]
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    n = y_true.shape[0]
    values: list[list[float]] = []
    attempts = 0
    while len(values) < n_bootstrap:
        attempts += 1
        if attempts > 50 * n_bootstrap:
            raise InputError(
                f"bootstrap: only {len(values)} of {attempts - 1} resamples kept both classes of every scored label; "
                "a label has too few positives or negatives in the test split for a confidence interval"
            )
        counts = np.bincount(rng.integers(0, n, size=n), minlength=n)
        aucs: list[list[float]] = [[] for _ in scores]
        for j, rows in zip(columns, known, strict=True):
            # Repeat each known image as often as the resample drew it.
            picked = np.repeat(rows, counts[rows])
            if np.unique(y_true[picked, j]).size < 2:
                break
            for k, score in enumerate(scores):
                aucs[k].append(rank_auc(y_true[picked, j], score[picked, j]))
        else:
            maucs = [float(np.mean(a)) for a in aucs]
            values.append([combine(maucs)] if combine is not None else maucs)
    alpha = (1.0 - confidence) / 2.0
    table = np.asarray(values)
    return [tuple(float(q) for q in np.quantile(table[:, k], [alpha, 1.0 - alpha])) for k in range(width)]
