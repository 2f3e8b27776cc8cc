"""Adapter: NIH ChestX-ray14 in its official layout, and the map of its labels onto CheXpert's.

Layout read::

    ROOT/Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv)   Image Index, Finding Labels, Patient ID,
                                                              View Position, Patient Age, Patient Gender, ...
    ROOT/train_val_list.txt, ROOT/test_list.txt               official split (image names), optional
    ROOT/images*/.../*.png                                    images, in any sub-folders (images_001/images/...)

The manifest keeps NIH's own 14 label names (:data:`diffcxr_aug.data.labels.NIH_LABELS`), each 1 or 0
(NIH labels are complete: a finding not listed is absent, and "No Finding" rows are 0 everywhere). A
finding name outside those 14 rejects the row with that reason rather than being dropped or guessed.
:func:`nih_to_chexpert` maps a NIH manifest onto CheXpert names for users who want one label space.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from diffcxr_aug.data.adapters.common import SOURCE_COLUMN, index_dataset, meta_columns, normalize_view
from diffcxr_aug.data.labels import CHEXPERT_LABELS, NIH_LABELS, NIH_TO_CHEXPERT
from diffcxr_aug.data.manifest import Manifest, is_label_column
from diffcxr_aug.data.splits import DEFAULT_FRACTIONS, assign_patient_splits
from diffcxr_aug.data.tables import DatasetLayoutError, read_table, require_columns
from diffcxr_aug.errors import MissingInputError
from diffcxr_aug.types import DEFAULT_IMAGE_SIZE

logger = logging.getLogger(__name__)

DATA_ENTRY_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
NO_FINDING = "No Finding"
# Share of the official train_val patients carved out as val (NIH publishes no val list).
VAL_FRACTION = 0.1


def _find_data_entry(root: Path) -> Path:
    for name in DATA_ENTRY_NAMES:
        if (root / name).is_file():
            return root / name
    found = sorted(root.glob("Data_Entry_2017*.csv"))
    if found:
        return found[0]
    raise MissingInputError(f"{root}: no Data_Entry_2017*.csv (looked for {', '.join(DATA_ENTRY_NAMES)})")


def _index_png(root: Path, progress: bool) -> dict[str, Path]:
    """Image file name -> path, over every PNG under root (NIH ships them in 12 ``images_0XX`` folders)."""
    index: dict[str, Path] = {}
    stack = [root]
    bar = tqdm(desc="listing images", unit="file", disable=not progress)
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=True) and not entry.name.startswith("."):
                    stack.append(Path(entry.path))
                elif entry.name.lower().endswith(".png"):
                    index.setdefault(entry.name, Path(entry.path))
                    bar.update(1)
    bar.close()
    return index


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def prepare_nih(
    root: str | os.PathLike,
    out: str | os.PathLike,
    size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
    build_cache: bool = True,
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> Path:
    """Index NIH ChestX-ray14 into ``out/manifest.csv`` with NIH's 14 labels, ``rejected.csv`` and the cache.

    The official split is used when ``train_val_list.txt`` and ``test_list.txt`` are present (val is
    carved from train_val by patient, :data:`VAL_FRACTION` of its patients); otherwise the shared
    patient-level splitter assigns all three.

    Args:
        root: the ChestX-ray14 folder.
        out: output folder.
        size: image side of the cache.
        seed: seed of the patient-level splitter.
        split_fractions: patient shares of train, val and test for the rows without an official split.
        progress: progress bars.
        workers: decoding threads for the image check.
        build_cache: build the ``size`` px image cache after writing the manifest (``False``: the first
            step that reads the images builds it).
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise MissingInputError(f"{root}: no such folder (expected the ChestX-ray14 root)")
    entry_path = _find_data_entry(root)
    table = read_table(entry_path)
    table.columns = [c.strip() for c in table.columns]
    require_columns(table, ("Image Index", "Finding Labels", "Patient ID"), str(entry_path))
    images = _index_png(root, progress)

    rejected: list[dict] = []
    rows = []
    views = table["View Position"] if "View Position" in table.columns else pd.Series("", index=table.index)
    for i, (name, finding_labels, patient, view) in enumerate(
        zip(table["Image Index"].str.strip(), table["Finding Labels"], table["Patient ID"], views, strict=True)
    ):
        source = f"{entry_path.name} row {i + 2}"
        findings = [f.strip() for f in finding_labels.split("|") if f.strip()]
        unknown = [f for f in findings if f not in NIH_LABELS and f != NO_FINDING]
        if unknown or not findings:
            reason = f"unknown finding label(s) {unknown}" if unknown else "empty Finding Labels"
            reason += f"; NIH labels are {list(NIH_LABELS)} or 'No Finding'"
            rejected.append({"file": name, "reason": reason, "source": source})
            continue
        if NO_FINDING in findings and len(findings) > 1:
            rejected.append(
                {"file": name, "reason": f"'No Finding' listed together with {findings}", "source": source}
            )
            continue
        path = images.get(name)
        rows.append(
            {
                # A name with no file keeps its expected path; the scan then rejects it as missing.
                "image_path": str(path) if path is not None else str(root / "images" / name),
                "patient_id": patient.strip(),
                "study_id": name.rsplit(".", 1)[0],
                "view": normalize_view(view),
                "report": "",
                SOURCE_COLUMN: source,
                "_name": name,
                "_row": i,
                **{label: int(label in findings) for label in NIH_LABELS},
            }
        )
    if not rows:
        raise DatasetLayoutError(f"{entry_path}: no row with a valid Finding Labels value")
    candidates = pd.DataFrame(rows)
    kept = table.iloc[candidates["_row"].to_numpy()].reset_index(drop=True)
    extras = meta_columns(
        kept,
        {"Follow-up #": "followup", "Patient Age": "age", "Patient Gender": "sex", "Finding Labels": "finding_labels"},
    )
    candidates = pd.concat([candidates, extras], axis=1)
    candidates["split"] = _official_split(root, candidates, seed, rejected)
    candidates = candidates.loc[candidates["split"] != "reject"].drop(columns=["_name", "_row"])
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


def _official_split(root: Path, candidates: pd.DataFrame, seed: int, rejected: list[dict]) -> np.ndarray:
    train_list, test_list = root / "train_val_list.txt", root / "test_list.txt"
    if not (train_list.is_file() and test_list.is_file()):
        logger.info("%s: no train_val_list.txt/test_list.txt; using the patient-level splitter", root)
        return np.full(len(candidates), "", dtype=object)
    train_val, test = _read_list(train_list), _read_list(test_list)
    names = candidates["_name"]
    split = np.where(names.isin(test), "test", np.where(names.isin(train_val), "train", "reject")).astype(object)
    for i in np.flatnonzero(split == "reject"):
        rejected.append(
            {
                "file": candidates["image_path"].iat[i],
                "reason": "listed in neither train_val_list.txt nor test_list.txt",
                "source": candidates[SOURCE_COLUMN].iat[i],
            }
        )
    in_train = split == "train"
    carved = assign_patient_splits(candidates.loc[in_train, "patient_id"], (1 - VAL_FRACTION, VAL_FRACTION, 0.0), seed)
    split[in_train] = carved
    return split


def nih_to_chexpert(manifest: Manifest | pd.DataFrame) -> pd.DataFrame:
    """A NIH manifest frame with its labels mapped onto the CheXpert names, where the meaning matches.

    Uses :data:`diffcxr_aug.data.labels.NIH_TO_CHEXPERT`: several NIH labels can feed one CheXpert label
    (Mass and Nodule -> Lung Lesion), which is then 1 if any is 1 and 0 if all are 0. CheXpert
    observations with no NIH source (Enlarged Cardiomediastinum, Fracture, Support Devices) are empty
    (unknown), never 0. "No Finding" is 1 where all 14 NIH labels are 0 and 0 otherwise. NIH labels
    without a CheXpert twin (Emphysema, Fibrosis, Hernia) are kept as ``meta_nih_<name>`` columns.
    """
    frame = manifest.frame if isinstance(manifest, Manifest) else manifest
    missing = [name for name in NIH_LABELS if name not in frame.columns]
    if missing:
        raise DatasetLayoutError(
            f"not a NIH manifest: missing label column(s) {missing}; found columns {list(frame.columns)}"
        )
    nih = frame[list(NIH_LABELS)].apply(pd.to_numeric, errors="coerce")
    out = frame[[c for c in frame.columns if not is_label_column(c)]].copy()
    for chexpert in CHEXPERT_LABELS:
        sources = [nih_name for nih_name, target in NIH_TO_CHEXPERT.items() if target == chexpert]
        if chexpert == "No Finding":
            out[chexpert] = (nih.fillna(0).sum(axis=1) == 0).astype("float32").where(nih.notna().all(axis=1))
        elif sources:
            out[chexpert] = nih[sources].max(axis=1, skipna=True).astype("float32")
        else:
            out[chexpert] = np.float32("nan")
    for nih_name in NIH_LABELS:
        if nih_name not in NIH_TO_CHEXPERT:
            out[f"meta_nih_{nih_name.lower()}"] = nih[nih_name]
    return out
