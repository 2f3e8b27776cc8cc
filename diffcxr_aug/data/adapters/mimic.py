"""Adapter: MIMIC-CXR-JPG (PhysioNet) in its official layout.

Layout read (``.csv`` or ``.csv.gz`` alike)::

    ROOT/mimic-cxr-2.0.0-metadata.csv     dicom_id, subject_id, study_id, ViewPosition, ...
    ROOT/mimic-cxr-2.0.0-chexpert.csv     subject_id, study_id, 14 CheXpert labels (or -negbio.csv)
    ROOT/mimic-cxr-2.0.0-split.csv        dicom_id, study_id, subject_id, split (train|validate|test)
    ROOT/files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg
    ROOT/files/pXX/pSUBJECT/sSTUDY.txt    report (MIMIC-CXR); also looked for under
                                          ROOT/mimic-cxr-reports/files/... (the unzipped mimic-cxr-reports.zip)

Labels are the official study-level CheXpert labels (NegBio's if the CheXpert file is absent); a study
missing from the label file gets empty (unknown) labels. The official split is kept (``validate`` ->
``val``). A metadata row whose JPEG is missing or unreadable goes to ``rejected.csv``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from diffcxr_aug.data.adapters.common import SOURCE_COLUMN, index_dataset, meta_columns, normalize_view
from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.reports import report_from_text
from diffcxr_aug.data.splits import DEFAULT_FRACTIONS
from diffcxr_aug.data.tables import DatasetLayoutError, find_table, read_table, require_columns
from diffcxr_aug.errors import MissingInputError
from diffcxr_aug.types import DEFAULT_IMAGE_SIZE

logger = logging.getLogger(__name__)

METADATA = "mimic-cxr-2.0.0-metadata.csv"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv"
NEGBIO = "mimic-cxr-2.0.0-negbio.csv"
SPLIT = "mimic-cxr-2.0.0-split.csv"
_SPLIT_NAMES = {"train": "train", "validate": "val", "val": "val", "validation": "val", "test": "test"}


def _study_dir(root: Path, subject_id: str, study_id: str) -> Path:
    return root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}"


def _read_report(root: Path, subject_id: str, study_id: str) -> str:
    relative = Path(f"p{subject_id[:2]}") / f"p{subject_id}" / f"s{study_id}.txt"
    for base in (root / "files", root / "mimic-cxr-reports" / "files", root / "reports" / "files"):
        path = base / relative
        if path.is_file():
            return report_from_text(path.read_text(encoding="utf-8", errors="replace"))
    return ""


def _labels(root: Path) -> tuple[pd.DataFrame, str]:
    try:
        path = find_table(root, [CHEXPERT], "CheXpert label table")
    except FileNotFoundError:
        path = find_table(root, [CHEXPERT, NEGBIO], "CheXpert or NegBio label table")
    table = read_table(path)
    require_columns(table, ("subject_id", "study_id", *CHEXPERT_LABELS), str(path))
    for name in CHEXPERT_LABELS:
        # The official files write 1.0 / 0.0 / -1.0 / empty; keep them, the manifest validates the values.
        table[name] = table[name].str.strip()
    return table.drop_duplicates(["subject_id", "study_id"]), path.name


def prepare_mimic(
    root: str | os.PathLike,
    out: str | os.PathLike,
    size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
    build_cache: bool = True,
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> Path:
    """Index MIMIC-CXR-JPG into ``out/manifest.csv`` (one row per JPEG), ``rejected.csv`` and the cache.

    Args:
        root: the MIMIC-CXR-JPG folder (holding the metadata, label and split tables and ``files/``).
        out: output folder.
        size: image side of the cache.
        seed: seed of the patient-level splitter (only used for images the official split does not list).
        split_fractions: patient shares of train, val and test for the rows without an official split.
        progress: progress bars.
        workers: decoding threads for the image check.
        build_cache: build the ``size`` px image cache after writing the manifest (``False``: the first
            step that reads the images builds it).

    Returns:
        The manifest path.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise MissingInputError(f"{root}: no such folder (expected the MIMIC-CXR-JPG root)")
    meta_path = find_table(root, [METADATA], "MIMIC-CXR-JPG metadata table")
    meta = read_table(meta_path)
    require_columns(meta, ("dicom_id", "subject_id", "study_id", "ViewPosition"), str(meta_path))
    meta[SOURCE_COLUMN] = [f"{meta_path.name} row {i + 2}" for i in range(len(meta))]

    labels, label_file = _labels(root)
    frame = meta.merge(labels, on=["subject_id", "study_id"], how="left", validate="many_to_one")
    try:
        split_path = find_table(root, [SPLIT], "official split")
        split = read_table(split_path)
        require_columns(split, ("dicom_id", "split"), str(split_path))
        split_map = split.drop_duplicates("dicom_id").set_index("dicom_id")["split"].str.strip().str.lower()
        unknown = sorted(set(split_map) - set(_SPLIT_NAMES))
        if unknown:
            raise DatasetLayoutError(
                f"{split_path}: unknown split value(s) {unknown}; expected {sorted(_SPLIT_NAMES)}"
            )
        frame["split"] = frame["dicom_id"].map(split_map).map(_SPLIT_NAMES).fillna("")
    except FileNotFoundError:
        logger.warning("%s: no %s; using the patient-level splitter for every image", root, SPLIT)
        frame["split"] = ""

    reports: dict[tuple[str, str], str] = {}
    for subject_id, study_id in frame[["subject_id", "study_id"]].drop_duplicates().itertuples(index=False):
        reports[(subject_id, study_id)] = _read_report(root, subject_id, study_id)

    candidates = pd.DataFrame(
        {
            "image_path": [
                str(_study_dir(root, s, st) / f"{d}.jpg")
                for d, s, st in zip(frame["dicom_id"], frame["subject_id"], frame["study_id"], strict=True)
            ],
            "patient_id": frame["subject_id"],
            "study_id": frame["study_id"],
            "view": frame["ViewPosition"].map(normalize_view),
            "split": frame["split"],
            "report": [reports[key] for key in zip(frame["subject_id"], frame["study_id"], strict=True)],
            SOURCE_COLUMN: frame[SOURCE_COLUMN],
        }
    )
    for name in CHEXPERT_LABELS:
        candidates[name] = frame[name].fillna("")
    extras = meta_columns(
        frame,
        {
            "dicom_id": "dicom_id",
            "ViewPosition": "view_position",
            "StudyDate": "study_date",
            "PerformedProcedureStepDescription": "procedure",
        },
    )
    candidates = pd.concat([candidates, extras], axis=1)
    candidates["meta_label_source"] = label_file
    return index_dataset(
        candidates,
        out,
        size=size,
        seed=seed,
        progress=progress,
        workers=workers,
        build_cache=build_cache,
        split_fractions=split_fractions,
    )
