"""Adapter: IU X-ray / Open-i (Indiana University chest X-ray collection) in its official layout.

Layout read::

    ROOT/NLMCXR_reports.tgz          the report XMLs (or the extracted ``ecgen-radiology/*.xml``)
    ROOT/**/<image id>.png           the images of NLMCXR_png.tgz, e.g. CXR1_1_IM-0001-3001.png
                                     (``<image id>.dcm`` from NLMCXR_dcm.tgz works too; Kaggle's
                                     ``1_IM-0001-3001.dcm.png`` names are recognised as well)
    ROOT/indiana_projections.csv     optional: ``uid, filename, projection`` (Frontal / Lateral)

Each XML is one study of one patient (IU publishes no patient ids, so the report id stands for both).
Its ``<AbstractText Label="FINDINGS|IMPRESSION|INDICATION|COMPARISON">`` sections are cleaned of the
``XXXX`` de-identification marks; the manifest's report is findings + impression. Its MeSH ``<major>``
terms go to ``meta_mesh`` (``;``-separated). Its ``<parentImage id="...">`` elements name its images.
The 14 CheXpert labels come from the offline rule labeler run on findings + impression.

View: DICOM images give ``ViewPosition``; otherwise ``indiana_projections.csv`` gives frontal or
lateral; otherwise :func:`guess_projection` looks at the image. A frontal image is PA or AP when the
study's caption says which ("PA and lateral", "AP portable"), else UNKNOWN. ``meta_projection`` keeps
frontal / lateral / unknown and ``meta_view_source`` where it came from.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from diffcxr_aug.data.adapters.common import SOURCE_COLUMN, index_dataset, normalize_view, scan
from diffcxr_aug.data.images import is_dicom, load_image
from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.reports import clean_text, format_report
from diffcxr_aug.data.splits import DEFAULT_FRACTIONS
from diffcxr_aug.data.tables import DatasetLayoutError, read_table, require_columns
from diffcxr_aug.errors import ImageReadError, MissingInputError
from diffcxr_aug.types import DEFAULT_IMAGE_SIZE

logger = logging.getLogger(__name__)

REPORTS_ARCHIVE = "NLMCXR_reports.tgz"
PROJECTIONS_CSV = "indiana_projections.csv"
_SECTION_KEYS = {
    "FINDINGS": "findings",
    "IMPRESSION": "impression",
    "INDICATION": "indication",
    "COMPARISON": "comparison",
}


def _iter_xml(root: Path) -> Iterator[tuple[str, bytes]]:
    archive = root / REPORTS_ARCHIVE if root.is_dir() else root
    if archive.is_file() and tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".xml"):
                    handle = tar.extractfile(member)
                    if handle is not None:
                        yield member.name, handle.read()
        return
    files = sorted(root.rglob("*.xml")) if root.is_dir() else []
    if not files:
        raise MissingInputError(f"{root}: no {REPORTS_ARCHIVE} and no report XML files (ecgen-radiology/*.xml)")
    for path in files:
        yield str(path.relative_to(root)), path.read_bytes()


def read_iu_reports(root: str | os.PathLike) -> pd.DataFrame:
    """Parse every Open-i report XML (from ``NLMCXR_reports.tgz`` or a folder of XMLs) into a frame.

    Columns: ``uid`` (e.g. ``CXR3029``), ``file``, ``findings``, ``impression``, ``indication``,
    ``comparison`` (cleaned of ``XXXX``), ``mesh_major`` and ``mesh_automatic`` (lists of MeSH strings
    such as ``"Opacity/lung/base/left"``), ``image_ids`` (list) and ``caption`` (first image caption).
    """
    rows = []
    for name, data in _iter_xml(Path(root)):
        try:
            tree = ET.fromstring(data)
        except ET.ParseError as err:
            raise DatasetLayoutError(f"{name}: not readable XML ({err})") from err
        uid_el = tree.find("uId")
        uid = uid_el.get("id") if uid_el is not None else Path(name).stem
        sections = {key: "" for key in _SECTION_KEYS.values()}
        for abstract in tree.iter("AbstractText"):
            key = _SECTION_KEYS.get((abstract.get("Label") or "").upper())
            if key:
                sections[key] = clean_text("".join(abstract.itertext()))
        images = [el.get("id") for el in tree.findall("parentImage") if el.get("id")]
        captions = [clean_text(el.findtext("caption") or "") for el in tree.findall("parentImage")]
        rows.append(
            {
                "uid": uid,
                "file": name,
                **sections,
                "mesh_major": [(m.text or "").strip() for m in tree.iter("major") if (m.text or "").strip()],
                "mesh_automatic": [(m.text or "").strip() for m in tree.iter("automatic") if (m.text or "").strip()],
                "image_ids": images,
                "caption": next((c for c in captions if c), ""),
            }
        )
    return pd.DataFrame(rows)


def _image_key(name: str) -> str:
    """Official image id of a file name: ``CXR1_1_IM-0001-3001.png`` and Kaggle ``1_IM-0001-3001.dcm.png``."""
    stem = name
    for suffix in (".png", ".dcm", ".dicom", ".jpg", ".jpeg"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    for suffix in (".dcm",):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return stem if stem.upper().startswith("CXR") else f"CXR{stem}"


def _index_images(root: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in (".png", ".dcm", ".dicom", ".jpg", ".jpeg") and path.is_file():
            index.setdefault(_image_key(path.name), path)
    return index


# --- frontal vs lateral -------------------------------------------------------------------------------


def guess_projection(image: np.ndarray) -> str:
    """``"frontal"``, ``"lateral"`` or ``"unknown"`` from the pixels, for IU images without metadata.

    The heuristic reads the column profile of the mid-chest band (rows at 25-65 % of the height). A
    frontal view shows two dark lung fields, one on each side of the bright mediastinum: two valleys
    (prominence >= 0.2 of the profile's range), one in each half, at least a quarter of the width apart.
    A lateral view superimposes both lungs into one broad dark field: a single valley at least 30 % of
    the width wide at half its prominence. Anything else is ``"unknown"``: a guess is never forced.

    Measured on the 49 real frontal images in ``shared/realcxr`` (NIH, SIIM, COVID, TBX11K, Hannover
    ICU AP films): 45 frontal, 4 unknown, 0 lateral. No lateral image was available offline, so its
    recall on laterals is unmeasured; use ``indiana_projections.csv`` or DICOM when it matters.
    """
    from scipy.ndimage import gaussian_filter1d
    from scipy.signal import find_peaks, peak_widths

    small = np.asarray(
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).resize((128, 128), Image.Resampling.BILINEAR),
        dtype=np.float32,
    )
    profile = gaussian_filter1d(small[32:83].mean(axis=0), 3)
    span = float(profile.max() - profile.min())
    if span < 1e-3:
        return "unknown"
    profile = (profile - profile.min()) / span
    valleys, _ = find_peaks(-profile, prominence=0.2)
    left, right = valleys[valleys < 64], valleys[valleys >= 64]
    if len(left) and len(right) and right.max() - left.min() >= 32:
        return "frontal"
    if len(valleys) == 1 and peak_widths(-profile, valleys, rel_height=0.5)[0][0] >= 0.3 * 128:
        return "lateral"
    return "unknown"


def _dicom_view(path: Path) -> str:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return normalize_view(getattr(ds, "ViewPosition", ""))


def _check_and_project(path: str) -> dict:
    """Scan step for IU: decode the image fully (so it is also verified) and guess its projection."""
    try:
        if is_dicom(path):
            load_image(path)
            view = _dicom_view(Path(path))
            projection = {"PA": "frontal", "AP": "frontal", "LATERAL": "lateral"}.get(view, "unknown")
            return {"reason": "", "projection": projection, "view": view, "view_source": "dicom"}
        return {"reason": "", "projection": guess_projection(load_image(path)), "view_source": "image heuristic"}
    except ImageReadError as err:
        return {"reason": str(err)}
    except Exception as err:  # pydicom header errors and the like: unreadable all the same
        return {"reason": f"{path}: {type(err).__name__}: {err}"}


def _frontal_view(caption: str) -> str:
    words = set(re.findall(r"[a-z]+", caption.lower()))
    if "pa" in words and "ap" not in words:
        return "PA"
    if ("ap" in words or "portable" in words) and "pa" not in words:
        return "AP"
    return "UNKNOWN"


_IM_RE = re.compile(r"IM-\d+-\d+", re.IGNORECASE)


def _projection_key(uid: str, name: str) -> tuple[str, str]:
    """(report number, ``IM-xxxx-xxxx``): the part Open-i ids (``CXR1_1_IM-0001-3001``) and Kaggle file
    names (``1_IM-0001-3001.dcm.png``, uid 1) share."""
    match = _IM_RE.search(name)
    return re.sub(r"\D", "", str(uid)), (match.group(0).upper() if match else _image_key(name))


def _read_projections(root: Path) -> dict[tuple[str, str], str]:
    path = root / PROJECTIONS_CSV
    if not path.is_file():
        return {}
    table = read_table(path)
    require_columns(table, ("uid", "filename", "projection"), str(path))
    return {
        _projection_key(u, f): p.strip().lower()
        for u, f, p in zip(table["uid"], table["filename"], table["projection"], strict=True)
    }


def prepare_iu_xray(
    root: str | os.PathLike,
    out: str | os.PathLike,
    size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
    build_cache: bool = True,
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> Path:
    """Index IU X-ray into ``out/manifest.csv`` (one row per image), ``rejected.csv`` and the cache.

    IU X-ray has no official split: the shared patient-level splitter assigns one (by report id).
    Reports without images and images no report names are listed in ``rejected.csv``. ``build_cache``: build the
    ``size`` px image cache after writing the manifest (``False``: the first step that reads the images builds it).
    """
    from diffcxr_aug.data.labeler import RuleLabeler

    root = Path(root).resolve()
    if not root.is_dir():
        raise MissingInputError(f"{root}: no such folder (expected the IU X-ray root)")
    out = Path(out)
    reports = read_iu_reports(root)
    images = _index_images(root)
    projections = _read_projections(root)
    rejected: list[dict] = []

    rows = []
    for report in reports.itertuples(index=False):
        if not report.image_ids:
            rejected.append({"file": report.file, "reason": "report lists no image", "source": report.file})
        for image_id in report.image_ids:
            path = images.get(image_id, root / f"{image_id}.png")
            rows.append({"image_id": image_id, "image_path": str(path), "uid": report.uid, "source": report.file})
    referenced = {r["image_id"] for r in rows}
    for key, path in images.items():
        if key not in referenced:
            rejected.append({"file": str(path), "reason": "image named by no report", "source": ""})
    if not rows:
        raise DatasetLayoutError(f"{root}: the reports name no images")
    frame = pd.DataFrame(rows)
    by_uid = reports.set_index("uid")
    # One decode per image: the scan verifies it and guesses its projection; index_dataset then finds
    # every image already checked in the scan log.
    entries = scan(frame["image_path"].tolist(), out, progress=progress, workers=workers, check=_check_and_project)

    views, projections_out, view_sources = [], [], []
    for image_id, path, uid in zip(frame["image_id"], frame["image_path"], frame["uid"], strict=True):
        entry = entries.get(path, {})
        if _projection_key(uid, image_id) in projections:
            projection, source = projections[_projection_key(uid, image_id)], PROJECTIONS_CSV
        else:
            projection, source = entry.get("projection", "unknown"), entry.get("view_source", "")
        if entry.get("view") in ("PA", "AP", "LATERAL"):
            view = entry["view"]
        elif projection == "lateral":
            view = "LATERAL"
        elif projection == "frontal":
            view = _frontal_view(by_uid.at[uid, "caption"])
        else:
            view = "UNKNOWN"
        views.append(view)
        projections_out.append(projection)
        view_sources.append(source)

    texts = [format_report(by_uid.loc[uid].to_dict()) for uid in frame["uid"]]
    unique_texts = dict.fromkeys(texts)
    labeled = RuleLabeler().label(list(unique_texts), progress=progress)
    label_rows = dict(zip(unique_texts, labeled.to_dict("records"), strict=True))
    candidates = pd.DataFrame(
        {
            "image_path": frame["image_path"],
            "patient_id": frame["uid"],
            "study_id": frame["uid"],
            "view": views,
            "report": texts,
            SOURCE_COLUMN: frame["source"],
            "meta_image_id": frame["image_id"],
            "meta_projection": projections_out,
            "meta_view_source": view_sources,
            "meta_indication": [by_uid.at[uid, "indication"] for uid in frame["uid"]],
            "meta_mesh": ["; ".join(by_uid.at[uid, "mesh_major"]) for uid in frame["uid"]],
        }
    )
    for name in CHEXPERT_LABELS:
        candidates[name] = [label_rows[t][name] for t in texts]
    candidates["meta_label_source"] = "rule labeler (findings + impression)"
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
