"""Adapter: any folder of images plus a CSV whose columns are named on the command line.

``diffcxr-aug prepare csv --root DIR --csv FILE --image-col C --label-cols "A,B" [--report-col R]
[--patient-col P] [--view-col V] --out OUT``. Image paths in the CSV are relative to ``--root`` (or
absolute). Label cells may be ``1``/``0``/``-1``/empty (also ``1.0``, ``true``/``false``, ``yes``/``no``);
anything else rejects the row with the column and the value. Without ``--patient-col`` every image is its
own patient (the splits are then image-level, which leaks if a patient has several images: a warning
says so).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from diffcxr_aug.data.adapters.common import SOURCE_COLUMN, index_dataset, normalize_view
from diffcxr_aug.data.manifest import CORE_COLUMNS, META_PREFIX, REJECTED_NAME, RESERVED_COLUMNS, write_rejected
from diffcxr_aug.data.reports import report_from_text
from diffcxr_aug.data.splits import DEFAULT_FRACTIONS
from diffcxr_aug.data.tables import DatasetLayoutError, read_table, require_columns
from diffcxr_aug.errors import InputError, MissingInputError
from diffcxr_aug.types import DEFAULT_IMAGE_SIZE

logger = logging.getLogger(__name__)

_LABEL_VALUES = {
    "": "",
    "nan": "",
    "1": "1",
    "1.0": "1",
    "true": "1",
    "yes": "1",
    "0": "0",
    "0.0": "0",
    "false": "0",
    "no": "0",
    "-1": "-1",
    "-1.0": "-1",
    "uncertain": "-1",
}


def _parse_label_cell(value: str) -> str | None:
    return _LABEL_VALUES.get(str(value).strip().lower())


def prepare_csv(
    root: str | os.PathLike,
    out: str | os.PathLike,
    size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    csv: str | os.PathLike | None = None,
    image_col: str = "image",
    label_cols: Sequence[str] | str = (),
    report_col: str | None = None,
    patient_col: str | None = None,
    view_col: str | None = None,
    progress: bool = True,
    workers: int | None = None,
    build_cache: bool = True,
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> Path:
    """Index a folder of images described by a CSV into ``out/manifest.csv``, ``rejected.csv`` and the cache.

    Args:
        root: folder the CSV's image paths are relative to.
        out: output folder.
        size: image side of the cache.
        seed: seed of the patient-level splitter.
        split_fractions: patient shares of train, val and test for the rows without an official split.
        csv: the table (absolute, or relative to the working directory or to ``root``).
        image_col: column holding image paths.
        label_cols: label columns (a list or ``"A,B"``); their names become the manifest's label names.
        report_col: optional column of report text (sections extracted, de-identification markers removed).
        patient_col: optional column of patient ids (strongly advised: splits are patient-level).
        view_col: optional column of views (PA, AP, LATERAL, ...; anything else becomes UNKNOWN).
        progress: progress bars.
        workers: decoding threads for the image check.
        build_cache: build the ``size`` px image cache after writing the manifest (``False``: the first
            step that reads the images builds it).
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise MissingInputError(f"{root}: no such folder")
    if csv is None:
        raise InputError("prepare csv needs csv (the label table)")
    csv_path = Path(csv)
    if not csv_path.is_file() and (root / csv_path).is_file():
        csv_path = root / csv_path
    if not csv_path.is_file():
        raise MissingInputError(f"{csv}: no such file (looked in the working directory and in {root})")
    labels = (
        [c.strip() for c in label_cols.split(",")] if isinstance(label_cols, str) else [c.strip() for c in label_cols]
    )
    labels = [c for c in labels if c]
    if not labels:
        raise InputError("prepare csv needs at least one label column (--label-cols 'A,B')")
    clashes = [c for c in labels if c in CORE_COLUMNS or c in RESERVED_COLUMNS or c.startswith(META_PREFIX)]
    if clashes:
        raise InputError(f"label column name(s) {clashes} clash with the manifest's own columns; rename them")

    table = read_table(csv_path)
    optional = {"--report-col": report_col, "--patient-col": patient_col, "--view-col": view_col}
    wanted = [image_col, *labels, *(c for c in optional.values() if c)]
    require_columns(table, wanted, str(csv_path), hint="Name the columns with --image-col, --label-cols, ...")
    if len(set(labels)) != len(labels):
        raise InputError(f"--label-cols lists a column twice: {labels}")
    if patient_col is None:
        logger.warning(
            "%s: no --patient-col; every image is treated as its own patient, so a patient with several images "
            "can land in two splits",
            csv_path,
        )

    rejected: list[dict] = []
    rows = []
    for i, record in enumerate(table.to_dict("records")):
        source = f"{csv_path.name} row {i + 2}"
        raw_path = record[image_col].strip()
        if not raw_path:
            rejected.append({"file": "", "reason": f"empty {image_col!r} cell", "source": source})
            continue
        path = Path(raw_path) if Path(raw_path).is_absolute() else root / raw_path
        parsed = {name: _parse_label_cell(record[name]) for name in labels}
        bad = {name: record[name] for name, value in parsed.items() if value is None}
        if bad:
            rejected.append(
                {
                    "file": str(path),
                    "reason": f"label value(s) {bad} are not 1, 0, -1 or empty",
                    "source": source,
                }
            )
            continue
        row = {
            "image_path": str(path),
            "patient_id": record[patient_col].strip() if patient_col else raw_path,
            "study_id": Path(raw_path).stem,
            "view": normalize_view(record[view_col]) if view_col else "UNKNOWN",
            "report": report_from_text(record[report_col]) if report_col else "",
            SOURCE_COLUMN: source,
            **parsed,
        }
        for column, value in record.items():
            if column not in wanted:
                row[f"{META_PREFIX}{column}"] = value
        rows.append(row)
    if not rows:
        reject_path = write_rejected(rejected, Path(out) / REJECTED_NAME)
        raise DatasetLayoutError(f"{csv_path}: no usable row; every row is in {reject_path} with its reason")
    return index_dataset(
        pd.DataFrame(rows),
        out,
        size=size,
        seed=seed,
        rejected=rejected,
        progress=progress,
        workers=workers,
        build_cache=build_cache,
        split_fractions=split_fractions,
    )
