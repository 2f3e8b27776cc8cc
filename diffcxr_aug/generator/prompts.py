"""Prompt pools for ``synthesize``: the reports (and their labels) that synthetic images are drawn from.

A pool is a table of prompt rows: ``report``, ``view``, the source image (when the row comes from a
manifest) and one column per label. It is built from one of:

* a manifest (folder or ``manifest.csv``): its train split, reports and labels as they are;
* a CSV of reports (a ``report`` column, optionally label columns) or a text file with one report per
  line: labels from the CSV, or from the offline rule labeler when it has none;
* labels only: a CSV of label rows, or a manifest whose reports are not used (``--labels-from``, for a
  dataset without reports such as NIH ChestX-ray14): each row's report is written from its labels by
  :func:`template_report`.

The template reports are plain CheXpert-style sentences ("Cardiomegaly. Possible pneumonia. No
pneumothorax."), worded so that the project's rule labeler reads the same labels back from them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from diffcxr_aug.data.labels import CHEXPERT_LABELS, NIH_LABELS, VIEWS
from diffcxr_aug.data.manifest import (
    CORE_COLUMNS,
    ManifestError,
    _parse_label_column,
    read_manifest,
    resolve_manifest_path,
)
from diffcxr_aug.errors import InputError, MissingInputError

logger = logging.getLogger(__name__)

PromptKind = Literal["manifest", "reports", "labels", "labels-from"]
KNOWN_LABELS: tuple[str, ...] = CHEXPERT_LABELS + tuple(n for n in NIH_LABELS if n not in CHEXPERT_LABELS)
NORMAL_SENTENCE = "No acute cardiopulmonary abnormality."

# The finding each label is written as; the rule labeler recognises every one of these phrases.
_PHRASES: dict[str, str] = {
    "Enlarged Cardiomediastinum": "enlarged cardiomediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "lung opacity",
    "Lung Lesion": "lung mass",
    "Edema": "pulmonary edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax",
    "Pleural Effusion": "pleural effusion",
    "Pleural Other": "pleural thickening",
    "Fracture": "rib fracture",
    "Support Devices": "support lines and tubes",
    # NIH ChestX-ray14 names
    "Effusion": "pleural effusion",
    "Infiltration": "pulmonary infiltrate",
    "Mass": "lung mass",
    "Nodule": "lung nodule",
    "Emphysema": "emphysema",
    "Fibrosis": "pulmonary fibrosis",
    "Pleural_Thickening": "pleural thickening",
    "Hernia": "hiatal hernia",
}


def label_phrase(name: str) -> str:
    """The words a template report uses for label ``name`` (any other label: its name, in lower case)."""
    return _PHRASES.get(name, name.replace("_", " ").lower())


def template_report(labels: Mapping[str, float]) -> str:
    """A short report that states ``labels``: positives first, then uncertain, then negatives.

    ``No Finding`` is not a finding: a row with no positive or uncertain finding reads as a normal study,
    and unknown (NaN) labels are not mentioned.

    Example:
        >>> template_report({"Cardiomegaly": 1.0, "Pneumonia": -1.0, "Pneumothorax": 0.0, "Edema": float("nan")})
        'Cardiomegaly. Possible pneumonia. No pneumothorax.'
    """
    findings = {name: value for name, value in labels.items() if name != "No Finding" and not pd.isna(value)}
    positive = [label_phrase(n) for n, v in findings.items() if v == 1.0]
    uncertain = [label_phrase(n) for n, v in findings.items() if v == -1.0]
    negative = [label_phrase(n) for n, v in findings.items() if v == 0.0]
    sentences = [p[0].upper() + p[1:] + "." for p in positive]
    sentences += [f"Possible {p}." for p in uncertain]
    if not positive and not uncertain:
        sentences.insert(0, NORMAL_SENTENCE)
    sentences += [f"No {p}." for p in negative]
    return " ".join(sentences)


@dataclass
class PromptPool:
    """The rows prompts are drawn from.

    Attributes:
        frame: one row per prompt: ``report``, ``view``, ``image`` (the source row's ``image_path``, or
            empty) and the label columns (float, NaN = unknown), in the source's row order.
        label_names: the label columns.
        source: the file the pool was read from.
        kind: ``manifest``, ``reports``, ``labels`` or ``labels-from``.
        root: the folder relative ``image`` paths are relative to (``None``: the rows have no images).
    """

    frame: pd.DataFrame
    label_names: list[str]
    source: Path
    kind: PromptKind
    root: Path | None = None

    def __len__(self) -> int:
        return len(self.frame)

    def positives(self) -> np.ndarray:
        """``(rows, labels)`` bool: the label is positive (1) in the row."""
        return self.frame[self.label_names].to_numpy(dtype=np.float32) == 1.0

    def fingerprint(self) -> str:
        """SHA-256 of the source file: a changed source changes the prompts."""
        return file_sha256(self.source)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_prompt_pool(source: str | os.PathLike, labels_only: bool = False, split: str = "train") -> PromptPool:
    """Read a prompt pool from a manifest, a CSV of reports or labels, or a text file of reports.

    Args:
        source: a manifest folder or file, a CSV or a ``.txt`` file (one report per line).
        labels_only: write every report from the labels (``--labels-from``), ignoring any report text.
        split: the split of a manifest source the prompts come from (a manifest without that split: all its rows,
            for ``train`` only; an empty ``val``/``test`` split is an error).

    Raises:
        MissingInputError: no such file or folder.
        InputError: the source holds no usable prompt (the message says which option fits instead).
    """
    path = Path(source)
    if path.is_dir() or labels_only:
        return _from_manifest(resolve_manifest_path(path), labels_only, split)
    if not path.is_file():
        raise MissingInputError(f"--prompts {path}: no such file or folder")
    if path.suffix.lower() == ".txt":
        reports = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return _from_reports(pd.DataFrame({"report": reports}), path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise ManifestError(f"{path}: not a readable UTF-8 CSV ({err})") from err
    if all(column in frame.columns for column in CORE_COLUMNS):
        return _from_manifest(path, labels_only=False, split=split)
    if "report" in frame.columns:
        return _from_reports(frame, path)
    return _from_labels(frame, path)


def _from_manifest(path: Path, labels_only: bool, split: str = "train") -> PromptPool:
    manifest = read_manifest(path)
    pool = manifest.split(split)
    if len(pool) == 0 and split != "train":
        raise InputError(f"{path}: the {split} split is empty; there are no {split} reports to use as prompts")
    if len(pool) == 0:
        pool = manifest
    frame = pool.frame
    out = frame[["report", "view", "image_path"]].rename(columns={"image_path": "image"}).reset_index(drop=True)
    for name in pool.label_names:
        out[name] = frame[name].to_numpy()
    if labels_only:
        out["report"] = [template_report(labels) for labels in out[pool.label_names].to_dict("records")]
        return PromptPool(out, pool.label_names, path, "labels-from", manifest.root)
    empty = out["report"].str.strip() == ""
    if empty.all():
        raise InputError(
            f"{path}: no row has a report to use as a prompt; for a dataset without reports, pass it as "
            "--labels-from to write reports from its labels"
        )
    if empty.any():
        logger.info("%s: %d prompt rows have an empty report and are not used as prompts", path, int(empty.sum()))
        out = out[~empty.to_numpy()].reset_index(drop=True)
    return PromptPool(out, pool.label_names, path, "manifest", manifest.root)


def _label_columns(frame: pd.DataFrame, path: Path) -> list[str]:
    names = [c for c in frame.columns if c in KNOWN_LABELS]
    ignored = [c for c in frame.columns if c not in names and c not in ("report", "view")]
    if ignored:
        logger.info("%s: columns %s are not label names and are ignored", path, ", ".join(map(repr, ignored)))
    return names


def _finish(frame: pd.DataFrame, names: list[str], path: Path) -> pd.DataFrame:
    out = pd.DataFrame({"report": frame["report"].astype(str).to_numpy()})
    view = frame["view"].astype(str).str.strip() if "view" in frame.columns else pd.Series(["UNKNOWN"] * len(frame))
    bad = ~view.isin(VIEWS)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ManifestError(f"{path}, row {i + 2}: view {view.iloc[i]!r} is not one of {list(VIEWS)}")
    out["view"] = view.to_numpy()
    out["image"] = ""
    for name in names:
        out[name] = _parse_label_column(frame[name], name, str(path)).to_numpy()
    return out


def _from_reports(frame: pd.DataFrame, path: Path) -> PromptPool:
    frame = frame[frame["report"].str.strip() != ""].reset_index(drop=True)
    if len(frame) == 0:
        raise InputError(f"{path}: no non-empty report to use as a prompt")
    names = _label_columns(frame, path)
    out = _finish(frame, names, path)
    if not names:
        from diffcxr_aug.data.labeler import RuleLabeler

        logger.info("%s: no label columns; labelling its %d reports with the rule labeler", path, len(out))
        labels = RuleLabeler().label(out["report"].tolist(), progress=False)
        names = list(labels.columns)
        for name in names:
            out[name] = labels[name].to_numpy()
    return PromptPool(out, names, path, "reports")


def _from_labels(frame: pd.DataFrame, path: Path) -> PromptPool:
    names = _label_columns(frame, path)
    if not names:
        raise InputError(
            f"{path}: neither a 'report' column nor label columns named as CheXpert or NIH ChestX-ray14 labels "
            f"(found {list(frame.columns)}); for another label set, prepare a manifest and pass --labels-from"
        )
    out = _finish(frame.assign(report=""), names, path)
    out["report"] = [template_report(labels) for labels in out[names].to_dict("records")]
    return PromptPool(out, names, path, "labels")


# ------------------------------------------------------------------------------------------ prompt order
class _Cycle:
    """Positions ``0..size-1`` in consecutive seeded permutations (each used once before any twice)."""

    def __init__(self, size: int, key: list[int]) -> None:
        self.size, self.key, self.used = size, key, 0
        self._perm = np.empty(0, dtype=np.int64)

    def next(self) -> int:
        epoch, position = divmod(self.used, self.size)
        if position == 0:
            self._perm = np.random.default_rng([*self.key, epoch]).permutation(self.size)
        self.used += 1
        return int(self._perm[position])


def prompt_rows(n_prompts: int, n: int, seed: int) -> np.ndarray:
    """Row positions (into the prompt pool) of images ``0..n-1``: consecutive seeded permutations, so every
    prompt is used once before any is used twice, and image ``i``'s prompt does not depend on ``n``."""
    epochs = (n + n_prompts - 1) // n_prompts
    return np.concatenate([np.random.default_rng([seed, 3, e]).permutation(n_prompts) for e in range(epochs)])[:n]


def balanced_prompt_rows(positives: np.ndarray, n: int, seed: int, target: float) -> np.ndarray:
    """Row positions of images ``0..n-1`` such that each label's positive share reaches ``target``.

    Image ``i`` goes, in turn, to the label furthest below ``target`` among images ``0..i`` (the next of
    that label's positive rows, cycled in seeded order); when no label is below it, to the next row of the
    plain order of :func:`prompt_rows`. So every prefix of the sequence is balanced (to within one image
    per label), a label with no positive row is left as it is, labels that cannot all reach ``target``
    (mutually exclusive ones whose targets add up to more than 1) end up as close to it as the others
    allow, and, as in :func:`prompt_rows`, image ``i``'s prompt does not depend on ``n``.

    Args:
        positives: ``(rows, labels)`` bool, the pool's positive labels.
        n: images.
        seed: the job seed.
        target: the share in (0, 1) each label should reach.
    """
    n_rows, n_labels = positives.shape
    plain = _Cycle(n_rows, [seed, 3])
    members = [np.flatnonzero(positives[:, j]) for j in range(n_labels)]
    cycles = [_Cycle(len(rows), [seed, 6, j]) for j, rows in enumerate(members)]
    unreachable = np.array([len(rows) == 0 for rows in members])
    counts = np.zeros(n_labels)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        deficit = target * (i + 1) - counts
        deficit[unreachable] = -np.inf
        j = int(np.argmax(deficit)) if n_labels else 0
        row = members[j][cycles[j].next()] if n_labels and deficit[j] > 0 else plain.next()
        out[i] = row
        counts += positives[row]
    return out


def prevalence(positives: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Positive share of each label over pool rows, each row weighted by ``counts`` (default: once)."""
    weights = np.ones(len(positives)) if counts is None else counts.astype(np.float64)
    return (weights @ positives) / max(weights.sum(), 1.0)
