"""The indexing core every real-data adapter shares.

An adapter reads its dataset's own tables into a *candidate* frame (one row per image it knows of, with
absolute ``image_path``, ids, view, report, labels, ``meta_*`` columns, an optional official ``split``
and a ``source`` column saying where the row came from), then calls :func:`index_dataset`, which

1. checks that every image decodes (:func:`scan_images`; a checkpointed scan, so an interrupted run
   picks up where it stopped),
2. moves every row that cannot be used into ``rejected.csv`` with its reason (missing or unreadable
   image, duplicate path, reasons the adapter found itself): nothing is dropped silently,
3. keeps the official split where there is one and gives every other patient a split from
   :func:`diffcxr_aug.data.splits.assign_patient_splits`,
4. writes ``manifest.csv`` and builds the image cache.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from diffcxr_aug.data.cache import open_cache
from diffcxr_aug.data.images import verify_image
from diffcxr_aug.data.labels import VIEWS
from diffcxr_aug.data.manifest import (
    CORE_COLUMNS,
    META_PREFIX,
    REJECTED_NAME,
    read_manifest,
    write_manifest,
    write_rejected,
)
from diffcxr_aug.data.splits import DEFAULT_FRACTIONS, assign_patient_splits
from diffcxr_aug.data.tables import DatasetLayoutError
from diffcxr_aug.errors import ImageReadError
from diffcxr_aug.types import DEFAULT_IMAGE_SIZE

logger = logging.getLogger(__name__)

SCAN_LOG = ".scan_log.jsonl"
SOURCE_COLUMN = "source"  # where a candidate row came from ("metadata.csv row 12"); goes to rejected.csv only

# View spellings in DICOM ViewPosition, NIH, MIMIC and hand-made CSVs -> the manifest's VIEWS.
_VIEW_ALIASES = {
    "PA": "PA",
    "POSTEROANTERIOR": "PA",
    "PA LLD": "PA",
    "PA RLD": "PA",
    "AP": "AP",
    "ANTEROPOSTERIOR": "AP",
    "AP AXIAL": "AP",
    "AP LLD": "AP",
    "AP RLD": "AP",
    "AP SUPINE": "AP",
    "AP ERECT": "AP",
    "LATERAL": "LATERAL",
    "LAT": "LATERAL",
    "L": "LATERAL",  # the ieee8023 COVID-19 collection's metadata
    "LL": "LATERAL",
    "RL": "LATERAL",
    "LEFT LATERAL": "LATERAL",
    "RIGHT LATERAL": "LATERAL",
    "XTABLE LATERAL": "LATERAL",
    "LAO": "UNKNOWN",
    "RAO": "UNKNOWN",
    "SWIMMERS": "UNKNOWN",
}


def normalize_view(value: object) -> str:
    """Map a view string (``"PA"``, ``"ap axial"``, ``"LL"``, ``"Lateral"``) onto PA, AP, LATERAL or UNKNOWN."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "UNKNOWN"
    key = " ".join(str(value).upper().replace("_", " ").split())
    if key in VIEWS:
        return key
    return _VIEW_ALIASES.get(key, "UNKNOWN")


# --- the checkpointed scan ---------------------------------------------------------------------------


def _file_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _read_scan_log(log_path: Path) -> dict[str, dict]:
    """Results of earlier (possibly interrupted) scans; a torn last line from a killed run is ignored."""
    done: dict[str, dict] = {}
    if not log_path.is_file():
        return done
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
                done[entry["path"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # everything after a torn line is suspect
    return done


def _verify(path: str) -> dict:
    try:
        verify_image(path)
    except ImageReadError as err:
        return {"reason": str(err)}
    return {"reason": ""}


def scan(
    paths: Sequence[str],
    work_dir: Path,
    progress: bool = True,
    workers: int | None = None,
    check: Callable[[str], dict] | None = None,
    needs: Sequence[str] = (),
) -> dict[str, dict]:
    """Run ``check`` once per image, checkpointed; return ``{path: entry}`` (``entry["reason"]`` is ``""``
    for a readable image, else why not).

    Each result is appended to ``work_dir/.scan_log.jsonl`` (one JSON line, flushed per batch) as soon as
    it is known, keyed by path, file size and modification time. A rerun after an interruption (Ctrl-C,
    a killed job) reads the log and checks only the images it has no current result for; a file changed
    since is checked again. Appending whole lines is the atomic step: a crash can tear at most the last
    line, which the reader drops.

    Args:
        paths: absolute image paths (duplicates allowed; each file is checked once).
        work_dir: the output folder that holds the log.
        progress: show a progress bar with ETA.
        workers: decoding threads (PIL and pydicom release the GIL while decoding); default
            ``min(8, cpu_count)``.
        check: ``path -> {"reason": str, ...}``; defaults to decoding with :func:`verify_image`.
        needs: entry keys a logged result must carry to be reused (an adapter that stores extra facts,
            such as IU X-ray's projection, re-checks images a plain scan logged before).
    """
    check = check or _verify
    workers = workers or min(8, os.cpu_count() or 1)
    log_path = Path(work_dir) / SCAN_LOG
    log_path.parent.mkdir(parents=True, exist_ok=True)
    previous = _read_scan_log(log_path)
    results: dict[str, dict] = {}
    todo: list[str] = []
    for path in dict.fromkeys(paths):
        key = _file_key(path)
        entry = previous.get(path)
        if key is None:
            results[path] = {"reason": f"{path}: no such file"}
        elif (
            entry is not None
            and (entry.get("size"), entry.get("mtime_ns")) == key
            and (entry.get("reason") or all(k in entry for k in needs))
        ):
            results[path] = entry
        else:
            todo.append(path)
    if results:
        logger.info(
            "Scan: %d of %d images known already (checked or missing); checking %d",
            len(results),
            len(results) + len(todo),
            len(todo),
        )
    bar = tqdm(total=len(todo), desc="checking images", unit="img", disable=not progress, dynamic_ncols=True)
    with open(log_path, "a", encoding="utf-8") as log, ThreadPoolExecutor(max_workers=workers) as pool:
        # Bounded chunks keep memory flat and let Ctrl-C stop within one chunk.
        chunk = max(workers * 8, 32)
        for start in range(0, len(todo), chunk):
            batch = todo[start : start + chunk]
            for path, entry in zip(batch, pool.map(check, batch), strict=True):
                size, mtime_ns = _file_key(path) or (None, None)
                entry = {**entry, "path": path, "size": size, "mtime_ns": mtime_ns}
                results[path] = entry
                log.write(json.dumps(entry) + "\n")
                bar.update(1)
            log.flush()
    bar.close()
    return results


def scan_images(
    paths: Sequence[str], work_dir: Path, progress: bool = True, workers: int | None = None
) -> dict[str, str]:
    """:func:`scan` with the default decode check; returns ``{path: reason}`` for unreadable images only."""
    entries = scan(paths, work_dir, progress=progress, workers=workers)
    return {path: entry["reason"] for path, entry in entries.items() if entry.get("reason")}


# --- from candidates to manifest ---------------------------------------------------------------------


def assign_splits(
    frame: pd.DataFrame, seed: int, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> np.ndarray:
    """Official split where a row has one; the shared patient-level splitter for patients without one."""
    official = frame["split"].fillna("").astype(str) if "split" in frame.columns else pd.Series("", index=frame.index)
    splits = official.to_numpy(dtype=object).copy()
    missing = official == ""
    if missing.any():
        # A patient with an official split anywhere keeps it for all of their rows.
        known = frame.loc[~missing].groupby("patient_id")["split"].first() if (~missing).any() else pd.Series()
        # object dtype: with no official split at all the map is float NaN, which pandas will not fill with "".
        fill = frame.loc[missing, "patient_id"].map(known).astype(object)
        splits[missing.to_numpy()] = np.where(
            fill.notna(), fill.fillna(""), assign_patient_splits(frame.loc[missing, "patient_id"], fractions, seed)
        )
    return splits


def index_dataset(
    candidates: pd.DataFrame,
    out: str | os.PathLike,
    size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    rejected: list[dict] | None = None,
    progress: bool = True,
    workers: int | None = None,
    build_cache: bool = True,
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> Path:
    """Check, split and write a dataset's candidate rows as ``out/manifest.csv`` (+ ``rejected.csv``, cache).

    Args:
        candidates: one row per image: ``image_path`` (absolute), ``patient_id``, ``study_id``, ``view``,
            ``report``, label columns, ``meta_*`` columns, optional ``split`` (official; empty = none) and
            optional ``source`` (where the row came from, for rejected.csv).
        out: output folder.
        size: image side of the cache built at the end.
        seed: seed of the patient-level splitter.
        split_fractions: patient shares of train, val and test for the rows without an official split.
        rejected: rows the adapter already rejected (``file``, ``reason``, ``source``); more are added.
        progress: progress bars.
        workers: decoding threads for the scan.
        build_cache: build the ``size`` px image cache after writing the manifest.

    Returns:
        The manifest path.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rejected = list(rejected or [])
    frame = candidates.copy().reset_index(drop=True)
    if SOURCE_COLUMN not in frame.columns:
        frame[SOURCE_COLUMN] = [f"row {i + 1}" for i in range(len(frame))]
    for column in ("study_id", "report", "view"):
        if column not in frame.columns:
            frame[column] = "" if column != "view" else "UNKNOWN"
    frame["image_path"] = frame["image_path"].astype(str)
    frame["patient_id"] = frame["patient_id"].fillna("").astype(str).str.strip()

    def reject(mask: pd.Series, reasons) -> None:
        nonlocal frame
        if not mask.any():
            return
        reasons = pd.Series(reasons, index=frame.index)[mask] if not isinstance(reasons, str) else reasons
        for i in np.flatnonzero(mask.to_numpy()):
            idx = frame.index[i]
            reason = reasons if isinstance(reasons, str) else reasons.loc[idx]
            rejected.append(
                {"file": frame.at[idx, "image_path"], "reason": reason, "source": frame.at[idx, SOURCE_COLUMN]}
            )
        frame = frame.loc[~mask]

    reject(frame["patient_id"] == "", "no patient id")
    duplicated = frame["image_path"].duplicated()
    if duplicated.any():
        first = frame.drop_duplicates("image_path").set_index("image_path")[SOURCE_COLUMN]
        reject(duplicated, frame["image_path"].map(lambda p: f"duplicate image path (first listed at {first[p]})"))

    unreadable = scan_images(frame["image_path"].tolist(), out, progress=progress, workers=workers)
    reject(frame["image_path"].isin(list(unreadable)), frame["image_path"].map(lambda p: unreadable.get(p, "")))

    reject_path = write_rejected(rejected, out / REJECTED_NAME)
    if frame.empty:
        raise DatasetLayoutError(
            f"no usable image among {len(candidates)} candidate rows; every row is in {reject_path} with its reason"
        )
    frame["split"] = assign_splits(frame, seed, tuple(split_fractions))
    frame = frame.drop(columns=[SOURCE_COLUMN])
    columns = list(CORE_COLUMNS) + [c for c in frame.columns if c not in CORE_COLUMNS]
    manifest_path = write_manifest(frame[columns], out)
    logger.info(
        "Indexed %d images into %s; %d rows rejected (reasons in %s)",
        len(frame),
        manifest_path,
        len(rejected),
        reject_path,
    )
    if build_cache:
        open_cache(read_manifest(out), size, progress=progress)
    return manifest_path


def meta_columns(frame: pd.DataFrame, mapping: dict[str, str]) -> pd.DataFrame:
    """Copy dataset columns into ``meta_<name>`` columns (present ones only)."""
    return pd.DataFrame({f"{META_PREFIX}{new}": frame[old] for old, new in mapping.items() if old in frame.columns})
