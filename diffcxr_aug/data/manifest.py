"""The common manifest (``manifest.csv``): one row per image, the schema of ``docs/contract.md``.

Every dataset adapter writes it, and every consumer (noise filter, generator training, classifiers,
evaluation) reads it through :func:`read_manifest`, which validates it once so that downstream code
can trust it.

Columns:
    * core: ``image_path, patient_id, study_id, view, split, report``;
    * reserved extras: ``noise`` (phantom ground truth), ``prompt`` and ``seed`` (synthetic images);
    * metadata: any column whose name starts with ``meta_`` (age, sex, DICOM ids, ...);
    * labels: every other column. A label cell is ``1``, ``0``, ``-1`` or empty (NaN = unknown).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from diffcxr_aug.data.labels import SPLITS, VIEWS
from diffcxr_aug.errors import InputError, MissingInputError
from diffcxr_aug.io import atomic_path

CORE_COLUMNS: tuple[str, ...] = ("image_path", "patient_id", "study_id", "view", "split", "report")
RESERVED_COLUMNS: tuple[str, ...] = ("noise", "prompt", "seed")
META_PREFIX = "meta_"
MANIFEST_NAME = "manifest.csv"
REJECTED_NAME = "rejected.csv"

# Strings read as "unknown" in a label cell.
_EMPTY_LABEL_STRINGS = {"", "nan", "NaN", "none", "None"}


class ManifestError(InputError):
    """A manifest that breaks the schema; the message names the file, the row and the fix."""


def is_label_column(name: str) -> bool:
    return name not in CORE_COLUMNS and name not in RESERVED_COLUMNS and not name.startswith(META_PREFIX)


def csv_row(index: int) -> int:
    """Line number of a data row in the CSV file (line 1 is the header)."""
    return int(index) + 2


def _parse_label_column(values: pd.Series, column: str, source: str) -> pd.Series:
    parsed = pd.to_numeric(
        values.astype(str).str.strip().replace(dict.fromkeys(_EMPTY_LABEL_STRINGS, "")), errors="coerce"
    )
    raw = values.astype(str).str.strip()
    not_empty = ~raw.isin(_EMPTY_LABEL_STRINGS) & values.notna()
    bad = not_empty & ~parsed.isin([1.0, 0.0, -1.0])
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ManifestError(
            f"{source}, row {csv_row(i)}: label column {column!r} holds {values.iloc[i]!r}; label cells must be "
            f"1, 0, -1 or empty. If {column!r} is metadata rather than a label, rename it to "
            f"'{META_PREFIX}{column}'."
        )
    return parsed.astype("float32")


def validate_manifest_frame(df: pd.DataFrame, source: str = "manifest") -> pd.DataFrame:
    """Check a manifest frame against the schema and return it normalised (labels as float32, NaN = unknown)."""
    missing = [c for c in CORE_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(
            f"{source}: missing column(s) {missing}; found columns {list(df.columns)}. "
            f"A manifest needs {list(CORE_COLUMNS)} plus one column per label."
        )
    df = df.copy()
    for column in ("image_path", "patient_id", "study_id", "view", "split"):
        df[column] = df[column].fillna("").astype(str).str.strip()
    df["report"] = df["report"].fillna("").astype(str)
    empty_path = df["image_path"] == ""
    if empty_path.any():
        i = int(np.flatnonzero(empty_path.to_numpy())[0])
        raise ManifestError(f"{source}, row {csv_row(i)}: empty image_path")
    empty_patient = df["patient_id"] == ""
    if empty_patient.any():
        i = int(np.flatnonzero(empty_patient.to_numpy())[0])
        raise ManifestError(f"{source}, row {csv_row(i)}: empty patient_id (needed for patient-level splits)")
    for column, allowed in (("view", VIEWS), ("split", SPLITS)):
        bad = ~df[column].isin(allowed)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ManifestError(
                f"{source}, row {csv_row(i)}: {column} {df[column].iloc[i]!r} is not one of {list(allowed)}"
            )
    duplicated = df["image_path"].duplicated()
    if duplicated.any():
        i = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise ManifestError(f"{source}, row {csv_row(i)}: image_path {df['image_path'].iloc[i]!r} appears twice")
    for column in df.columns:
        if is_label_column(column):
            df[column] = _parse_label_column(df[column], column, source)
    if "noise" in df.columns:
        df["noise"] = df["noise"].fillna("").astype(str)
    return df


def check_patient_splits(df: pd.DataFrame, source: str = "manifest") -> None:
    """Fail loudly when any patient appears in more than one split (leakage between train and test)."""
    per_patient = df.groupby("patient_id")["split"].nunique()
    leaking = per_patient[per_patient > 1]
    if len(leaking):
        examples = ", ".join(repr(p) for p in leaking.index[:5])
        raise ManifestError(
            f"{source}: {len(leaking)} patient(s) appear in more than one split (e.g. {examples}); "
            "splits must be patient-level. Re-split with diffcxr_aug.data.splits.assign_patient_splits."
        )


@dataclass
class Manifest:
    """A validated manifest and the folder its relative ``image_path`` values are relative to."""

    frame: pd.DataFrame
    root: Path
    source: str = "manifest"
    # The whole file this manifest was read from; a split or subset keeps it (and keeps the file's row
    # numbers as ``frame.index``) so that caches built once for the file serve every subset.
    parent: Manifest | None = None

    @property
    def full(self) -> Manifest:
        return self.parent if self.parent is not None else self

    @property
    def label_names(self) -> list[str]:
        return [c for c in self.frame.columns if is_label_column(c)]

    def __len__(self) -> int:
        return len(self.frame)

    def image_paths(self) -> list[Path]:
        """Absolute image paths, in row order."""
        return [p if p.is_absolute() else self.root / p for p in map(Path, self.frame["image_path"])]

    def labels(self, names: list[str] | tuple[str, ...] | None = None) -> np.ndarray:
        """Label matrix ``(rows, labels)`` as float32 with NaN for unknown; missing columns are all-NaN."""
        names = list(names) if names is not None else self.label_names
        out = np.full((len(self.frame), len(names)), np.nan, dtype=np.float32)
        for j, name in enumerate(names):
            if name in self.frame.columns:
                out[:, j] = self.frame[name].to_numpy(dtype=np.float32)
        return out

    def split(self, name: str) -> Manifest:
        if name not in SPLITS:
            raise ValueError(f"Unknown split {name!r}; choose one of {list(SPLITS)}")
        return self.subset(self.frame["split"] == name)

    def subset(self, mask_or_index) -> Manifest:
        """Rows selected by a boolean mask or by index labels (the file's row numbers)."""
        return Manifest(self.frame.loc[mask_or_index], self.root, self.source, parent=self.full)

    def clean(self) -> Manifest:
        """The rows whose ``noise`` column is empty (the phantom world's truth); every row without that column."""
        if "noise" not in self.frame.columns:
            return self
        return self.subset(self.frame["noise"].fillna("").astype(str).str.strip() == "")


def resolve_manifest_path(path: str | os.PathLike) -> Path:
    """Accept either a manifest file or a folder holding ``manifest.csv``."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise MissingInputError(
            f"No manifest at {path}; pass a folder written by `diffcxr-aug prepare` (or a manifest.csv file)"
        )
    return path


def read_manifest(path: str | os.PathLike, check_splits: bool = True) -> Manifest:
    """Read and validate a manifest (a ``manifest.csv`` file or the folder holding it)."""
    path = resolve_manifest_path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not a readable UTF-8 CSV ({err})") from err
    frame = validate_manifest_frame(frame, source=str(path)).reset_index(drop=True)
    if check_splits:
        check_patient_splits(frame, source=str(path))
    return Manifest(frame, path.parent, str(path))


def _format_label(value: float) -> str:
    return "" if pd.isna(value) else str(int(value))


def write_manifest(df: pd.DataFrame, path: str | os.PathLike, check_splits: bool = True) -> Path:
    """Validate and write a manifest atomically: core columns, then labels, then the rest."""
    path = Path(path)
    if path.suffix != ".csv":
        path = path / MANIFEST_NAME
    df = validate_manifest_frame(df, source=str(path))
    if check_splits:
        check_patient_splits(df, source=str(path))
    labels = [c for c in df.columns if is_label_column(c)]
    extras = [c for c in df.columns if c not in CORE_COLUMNS and c not in labels]
    out = df[list(CORE_COLUMNS) + labels + extras].copy()
    for column in labels:
        out[column] = out[column].map(_format_label)
    with atomic_path(path) as tmp:
        out.to_csv(tmp, index=False, encoding="utf-8")
    return path


def write_rejected(rows: list[dict[str, str]], path: str | os.PathLike) -> Path:
    """Write ``rejected.csv`` (``file, reason`` plus optional context), even when empty, atomically."""
    path = Path(path)
    if path.suffix != ".csv":
        path = path / REJECTED_NAME
    frame = pd.DataFrame(rows)
    for column in ("file", "reason"):
        if column not in frame.columns:
            frame[column] = pd.Series(dtype=str)
    frame = frame[["file", "reason"] + [c for c in frame.columns if c not in ("file", "reason")]]
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, encoding="utf-8")
    return path
