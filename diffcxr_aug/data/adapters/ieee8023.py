"""Adapter: the ieee8023 COVID-19 image data collection (Cohen et al., 2020) in its GitHub layout.

Layout read (``github.com/ieee8023/covid-chestxray-dataset``; a 2020-06 snapshot: ``hida6/covid-chestxray-dataset``)::

    ROOT/metadata.csv     patientid, offset, sex, age, finding, view, modality, folder, filename, license,
                          clinical_notes, other_notes, ... (older snapshots: no ``folder``, "clinical notes")
    ROOT/images/FILE      X-ray films and CT slices, PNG or JPEG whatever the extension says
    ROOT/volumes/FILE     CT volumes (``.nii.gz``); the repository ships only a download link

One candidate row per metadata row. The report is the row's free text: ``clinical_notes`` plus ``other_notes``
when that describes the film rather than crediting its authors. Labels are the project's rule labeler on that
text combined with the collection's ``finding`` (:func:`finding_labels`, :func:`combine_labels`), plus the
collection's own diagnosis as one more label, ``COVID-19`` (:func:`covid_label`): the notes give the 14 CheXpert
observations almost only as positives, so the diagnosis is the one label with both classes in every split. Splits are
patient-level over ``patientid``. CT rows stay in the manifest with ``meta_modality`` CT (the noise filter can
drop them by metadata); every other metadata column is kept as ``meta_<column>``. A row whose file is missing,
undecodable, listed twice or a 3-D volume goes to ``rejected.csv`` with its reason, and so does every file in
the image folders that no row lists: each file of the collection is in the manifest or rejected by name.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from diffcxr_aug.data.adapters.common import SOURCE_COLUMN, index_dataset, normalize_view
from diffcxr_aug.data.labeler import NO_FINDING, POSITIVE, SUPPORT_DEVICES, UNCERTAIN, RuleLabeler
from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.manifest import META_PREFIX, REJECTED_NAME, write_rejected
from diffcxr_aug.data.reports import clean_text
from diffcxr_aug.data.splits import DEFAULT_FRACTIONS
from diffcxr_aug.data.tables import DatasetLayoutError, find_table, read_table, require_columns
from diffcxr_aug.errors import MissingInputError
from diffcxr_aug.types import DEFAULT_IMAGE_SIZE

logger = logging.getLogger(__name__)

METADATA = "metadata.csv"
DEFAULT_FOLDER = "images"  # snapshots before the CT volumes arrived have no ``folder`` column
PNEUMONIA = "Pneumonia"

# Every finding of the collection's 2020-06 snapshot that names a pneumonia: the viral (COVID-19, SARS, influenza,
# varicella), bacterial, fungal (Pneumocystis) and lipoid ones, as the collection's own loader counts them
# (torchxrayvision's COVID19_Dataset; later snapshots spell them "Pneumonia/Viral/COVID-19", caught by the word).
PNEUMONIA_FINDINGS = frozenset(
    {
        "covid-19",
        "sars",
        "mers",
        "mers-cov",
        "influenza",
        "varicella",
        "streptococcus",
        "klebsiella",
        "legionella",
        "e.coli",
        "mycoplasma bacterial pneumonia",
        "chlamydophila",
        "bacterial",
        "pneumocystis",
        "lipoid",
        "pneumonia",
    }
)
NO_FINDING_FINDINGS = frozenset({"no finding"})
UNKNOWN_FINDINGS = frozenset({"", "todo", "unknown"})  # not yet curated: the cell says nothing

# ``other_notes`` mostly credits the authors; those notes go to ``meta_other_notes`` only, not into the report.
_CREDIT_RE = re.compile(
    r"^\W*(?:credit|case courtesy|courtesy|image courtesy|image originally shared|since january 2020 elsevier|"
    r"department of radiology)",
    re.IGNORECASE,
)
# pandas names a header cell left empty "Unnamed: N": the snapshot's header ends with a comma, and five rows
# put a second note (a credit, or the film's description) in that 29th column.
_UNNAMED_RE = re.compile(r"^unnamed_\d+$")
_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")
_DOC_SUFFIXES = (".md", ".txt")  # volumes/DOWNLOAD.md and the like: documentation, not a film


def _column_key(name: str) -> str:
    """``"clinical notes"`` and ``"clinical_notes"``, ``"pO2 saturation"`` and ``"po2_saturation"`` alike."""
    return re.sub(r"\W+", "_", name.strip()).strip("_").lower()


def finding_labels(finding: str) -> tuple[dict[str, float], bool | None]:
    """The CheXpert labels a ``finding`` cell implies, and what it says about No Finding.

    The cell names the patient's diagnosis (``"COVID-19"``, ``"COVID-19, ARDS"``, ``"Pneumocystis"``,
    ``"No Finding"``, ``"todo"``; later snapshots ``"Pneumonia/Viral/COVID-19"``). A pneumonia of any cause gives
    ``Pneumonia`` 1; ``No Finding`` gives ``No Finding`` 1 and ``Pneumonia`` 0 (the column is the type of
    pneumonia, so it says there is none). ARDS and other diagnoses without a CheXpert twin give no label but
    still rule out No Finding.

    Returns:
        ``(labels, normal)``: the implied labels, and ``True`` (the finding says normal), ``False`` (it names an
        abnormality) or ``None`` (``todo``, empty: it says nothing).
    """
    terms = [t.strip().lower() for t in re.split(r"[,/;]", str(finding))]
    terms = [t for t in terms if t not in UNKNOWN_FINDINGS]
    if not terms:
        return {}, None
    if all(t in NO_FINDING_FINDINGS for t in terms):
        return {NO_FINDING: POSITIVE, PNEUMONIA: 0.0}, True
    if any(t in PNEUMONIA_FINDINGS or "pneumonia" in t for t in terms):
        return {PNEUMONIA: POSITIVE}, False
    return {}, False


COVID_19 = "COVID-19"  # the collection's own label, beside the 14 CheXpert observations


def covid_label(finding: str) -> float:
    """``COVID-19`` from a ``finding`` cell: 1 when it names COVID-19, 0 when it names another diagnosis or none
    (``No Finding``), NaN when it says nothing (``todo``, empty)."""
    terms = [t.strip().lower() for t in re.split(r"[,/;]", str(finding))]
    terms = [t for t in terms if t not in UNKNOWN_FINDINGS]
    if not terms:
        return math.nan
    return POSITIVE if any(t.replace(" ", "") in ("covid-19", "covid19") for t in terms) else 0.0


def _strongest(values: list[float]) -> float:
    # CheXpert's rule for several mentions of one observation, here the notes and the finding: 1 > -1 > 0.
    if POSITIVE in values:
        return POSITIVE
    if UNCERTAIN in values:
        return UNCERTAIN
    return values[0] if values else math.nan


def combine_labels(text_labels: Mapping[str, float] | None, finding: str) -> dict[str, float]:
    """The 14 CheXpert labels of one row: the labeler's on its notes combined with its ``finding``.

    Each observation takes the strongest of the two (positive beats uncertain beats negative, as the labeler
    aggregates mentions). No Finding is 1 when one source says normal (the finding, or notes that mention no
    abnormality) and neither names an abnormality; otherwise it is blank.

    Args:
        text_labels: the labeler's output on the row's report, or ``None`` when the row has no text (the labeler
            would call an empty report No Finding, which says nothing about the film).
        finding: the row's ``finding`` cell.
    """
    implied, finding_normal = finding_labels(finding)
    labels: dict[str, float] = {}
    for name in CHEXPERT_LABELS:
        if name == NO_FINDING:
            continue
        values = [implied.get(name, math.nan), (text_labels or {}).get(name, math.nan)]
        labels[name] = _strongest([v for v in values if not math.isnan(v)])
    text_normal = None if text_labels is None else text_labels.get(NO_FINDING) == POSITIVE
    abnormal = finding_normal is False or text_normal is False
    abnormal |= any(labels[n] in (POSITIVE, UNCERTAIN) for n in labels if n != SUPPORT_DEVICES)
    says_normal = finding_normal is True or text_normal is True
    labels[NO_FINDING] = POSITIVE if says_normal and not abnormal else math.nan
    return {name: labels[name] for name in CHEXPERT_LABELS}


def notes_report(clinical_notes: str, other_notes: list[str]) -> str:
    """The report of one row: its clinical notes, then each other note that describes the film (not a credit)."""
    parts = [clean_text(clinical_notes)]
    parts += [clean_text(note) for note in other_notes if not _CREDIT_RE.match(note)]
    parts = [p for p in parts if p]
    # A note that stops without a full stop would run into the next one and merge their sentences for the labeler.
    return " ".join(p if p.endswith((".", "!", "?")) else f"{p}." for p in parts)


def _is_volume(name: str) -> bool:
    return name.lower().endswith(_VOLUME_SUFFIXES)


def _unlisted_files(root: Path, folders: list[str], listed: set[str]) -> list[dict[str, str]]:
    """Rejected rows for every file of the image folders that no metadata row names."""
    rows = []
    for folder in folders:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if not path.is_file() or path.name.startswith(".") or path.name.lower().endswith(_DOC_SUFFIXES):
                continue
            if str(path) not in listed:
                rows.append(
                    {
                        "file": str(path),
                        "reason": f"not listed in {METADATA} (no patient id, notes or finding for it)",
                        "source": f"{folder}/ folder",
                    }
                )
    return rows


def prepare_ieee8023(
    root: str | os.PathLike,
    out: str | os.PathLike,
    size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
    build_cache: bool = True,
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> Path:
    """Index the ieee8023 COVID-19 collection into ``out/manifest.csv``, ``rejected.csv`` and the image cache.

    Args:
        root: the collection's folder (holding ``metadata.csv`` and ``images/``).
        out: output folder.
        size: image side of the cache.
        seed: seed of the patient-level splitter.
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
        raise MissingInputError(f"{root}: no such folder (expected the covid-chestxray-dataset checkout)")
    meta_path = find_table(root, [METADATA], "ieee8023 metadata table")
    table = read_table(meta_path)
    table.columns = [_column_key(c) for c in table.columns]
    require_columns(
        table,
        ("patientid", "filename", "finding", "view", "modality"),
        str(meta_path),
        hint="Expected the metadata.csv of github.com/ieee8023/covid-chestxray-dataset.",
    )
    table = table.apply(lambda column: column.str.strip())
    if "clinical_notes" not in table.columns:
        logger.warning("%s: no clinical_notes column; reports come from other_notes only", meta_path)
        table["clinical_notes"] = ""
    if "folder" not in table.columns:
        table["folder"] = DEFAULT_FOLDER
    note_columns = [c for c in table.columns if c == "other_notes" or _UNNAMED_RE.match(c)]
    meta_keep = [c for c in table.columns if c not in ("patientid", "filename", "clinical_notes", *note_columns)]

    rejected: list[dict] = []
    rows = []
    listed: set[str] = set()
    for i, record in enumerate(table.to_dict("records")):
        source = f"{meta_path.name} row {i + 2}"
        folder = record["folder"] or DEFAULT_FOLDER
        if not record["filename"]:
            rejected.append({"file": "", "reason": "empty 'filename' cell", "source": source})
            continue
        path = root / folder / record["filename"]
        listed.add(str(path))
        if _is_volume(record["filename"]):
            absent = "" if path.is_file() else "; the file is absent (the repository keeps volumes as a download link)"
            rejected.append(
                {
                    "file": str(path),
                    "reason": f"3-D volume ({record['modality'] or 'no modality'}), not a 2-D image{absent}",
                    "source": source,
                }
            )
            continue
        other_notes = [record[c] for c in note_columns if record[c]]
        stem = Path(record["filename"]).stem
        row = {
            "image_path": str(path),
            "patient_id": record["patientid"],
            # Films of one patient on one day (PA and lateral) form a study; without a day, each film is its own.
            "study_id": f"{record['patientid']}-d{record['offset']}" if record.get("offset") else stem,
            "view": normalize_view(record["view"]),
            "report": notes_report(record["clinical_notes"], other_notes),
            SOURCE_COLUMN: source,
            f"{META_PREFIX}other_notes": " ".join(other_notes),
        }
        for column in meta_keep:
            row[f"{META_PREFIX}{column}"] = record[column]
        rows.append(row)
    folders = sorted(set(table["folder"].replace("", DEFAULT_FOLDER)) | {DEFAULT_FOLDER})
    rejected += _unlisted_files(root, folders, listed)
    if not rows:
        reject_path = write_rejected(rejected, Path(out) / REJECTED_NAME)
        raise DatasetLayoutError(f"{meta_path}: no row names a 2-D image; every row is in {reject_path}")

    candidates = pd.DataFrame(rows)
    reports = candidates["report"].tolist()
    has_text = [bool(r) for r in reports]
    text_labels = RuleLabeler().label([r for r in reports if r], progress=progress).to_dict("records")
    text_iter = iter(text_labels)
    combined = [
        combine_labels(next(text_iter) if text else None, finding)
        for text, finding in zip(has_text, candidates[f"{META_PREFIX}finding"], strict=True)
    ]
    for name in CHEXPERT_LABELS:
        candidates[name] = ["" if math.isnan(row[name]) else str(int(row[name])) for row in combined]
    covid = [covid_label(finding) for finding in candidates[f"{META_PREFIX}finding"]]
    candidates[COVID_19] = ["" if math.isnan(value) else str(int(value)) for value in covid]
    logger.info(
        "%s: %d candidate films (%d with notes), %d rows or files rejected before the image check",
        meta_path,
        len(candidates),
        sum(has_text),
        len(rejected),
    )
    return index_dataset(
        candidates,
        out,
        size=size,
        seed=seed,
        rejected=rejected,
        progress=progress,
        workers=workers,
        build_cache=build_cache,
        split_fractions=split_fractions,
    )
