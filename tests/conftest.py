"""Shared test fixtures: tiny, seeded, on CPU, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread. On a busy 2-core box OpenMP threads spin-waiting on each other make them
    5-10x slower than they compute (modules that train models use it with ``pytest.mark.usefixtures``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fixtures_dir() -> Path:
    """``tests/fixtures/``: real CXR files and hand-labelled reports, with their licences (see its README)."""
    return FIXTURES


@pytest.fixture
def recipes_dir() -> Path:
    return REPO_ROOT / "recipes"


def make_tiny_manifest(folder: Path, n: int = 24, size: int = 32, seed: int = 0) -> Path:
    """A small manifest of learnable toy images (a bright disc for Cardiomegaly), 3 images per patient.

    For tests that need a manifest before (or without) the phantom world; real consumers use the phantom.
    """
    import numpy as np
    import pandas as pd

    from diffcxr_aug.data.images import save_png
    from diffcxr_aug.data.labels import CHEXPERT_LABELS
    from diffcxr_aug.data.manifest import write_manifest

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        radius = 0.3 if positive else 0.15
        img = 0.2 + 0.1 * rng.random((size, size))
        img[(yy - 0.55) ** 2 + (xx - 0.5) ** 2 < radius**2] = 0.8
        save_png(img, folder / "images" / f"{i:04d}.png")
        patient = i // 3
        split = ("train", "train", "val", "test")[patient % 4]
        row = {
            "image_path": f"images/{i:04d}.png",
            "patient_id": f"tiny-p{patient}",
            "study_id": f"tiny-s{i}",
            "view": "PA",
            "split": split,
            "report": "The heart is enlarged." if positive else "Normal heart size. No pneumothorax.",
        }
        row.update({name: "" for name in CHEXPERT_LABELS})
        row["Cardiomegaly"] = "1" if positive else "0"
        row["Pneumothorax"] = "0"
        rows.append(row)
    return write_manifest(pd.DataFrame(rows), folder)


@pytest.fixture
def tiny_manifest(tmp_path) -> Path:
    return make_tiny_manifest(tmp_path / "tiny")


# --- fake datasets in their official layouts (tests/test_adapters.py, tests/test_real_recipes.py) ------------------


def hannover_images(fixtures_dir: Path = FIXTURES) -> list[Path]:
    return sorted((fixtures_dir / "hannover").glob("*.png"))


def xray_sources(fixtures_dir: Path = FIXTURES) -> list[Path]:
    """Every real chest film in ``tests/fixtures`` (PNG and JPEG), in a fixed order."""
    xrv = fixtures_dir / "xrv"
    return [*hannover_images(fixtures_dir), xrv / "00000001_000.png", xrv / "00027426_000.png", xrv / "16747_3_1.jpg"]


def save_as_jpeg(source: Path, target: Path) -> None:
    from PIL import Image

    target.parent.mkdir(parents=True, exist_ok=True)
    Image.open(source).convert("L").save(target, quality=90)


def write_film(source: Path, target: Path, variant: int = 0, side: int | None = None) -> None:
    """``source`` as a greyscale film at ``target`` (format from the suffix); ``variant`` > 0 rotates and shifts the
    brightness a little, so that fixtures with more films than ``tests/fixtures`` holds have no exact duplicates;
    ``side`` scales the longer side down to it (a faster fixture)."""
    from PIL import Image, ImageEnhance

    image = Image.open(source).convert("L")
    if side is not None:
        image.thumbnail((side, side))
    if variant:
        image = image.rotate(2.0 * ((variant % 5) - 2), fillcolor=0)
        image = ImageEnhance.Brightness(image).enhance(0.9 + 0.05 * (variant % 4))
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target, **({"quality": 90} if target.suffix == ".jpg" else {}))


def write_mimic_layout(
    root: Path, images: list[tuple], labels: list[dict], reports: dict[tuple[str, str], str], side: int | None = None
) -> None:
    """MIMIC-CXR-JPG 2.0.0 as PhysioNet ships it: ``files/pXX/pSUBJECT/sSTUDY/DICOM.jpg``, ``sSTUDY.txt`` reports,
    and the metadata, split and (gzipped) CheXpert CSVs.

    Args:
        images: ``(subject, study, dicom_id, ViewPosition, source image or None for a missing file, official split,
            variant)`` rows (``variant`` optional: see :func:`write_film`).
        labels: CheXpert rows: ``subject_id``, ``study_id`` and label columns as strings (``"1.0"``, ``"-1.0"``).
        reports: ``(subject, study)`` -> the report file's text.
    """
    import gzip
    import shutil

    import pandas as pd

    from diffcxr_aug.data.labels import CHEXPERT_LABELS

    meta, split = [], []
    for subject, study, dicom, view, source, official, *variant in images:
        target = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        if source is not None:
            if source.suffix == ".jpg" and not variant and side is None:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, target)
            else:
                write_film(source, target, variant[0] if variant else 0, side)
        meta.append(
            {
                "dicom_id": dicom,
                "subject_id": subject,
                "study_id": study,
                "ViewPosition": view,
                "Rows": 1,
                "Columns": 1,
                "StudyDate": "21800506",
            }
        )
        split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": official})
    frame = pd.DataFrame(labels, columns=["subject_id", "study_id", *CHEXPERT_LABELS])
    with gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "wt") as f:  # the official files are gzipped
        frame.to_csv(f, index=False)
    pd.DataFrame(meta).to_csv(root / "mimic-cxr-2.0.0-metadata.csv", index=False)
    pd.DataFrame(split).to_csv(root / "mimic-cxr-2.0.0-split.csv", index=False)
    for (subject, study), text in reports.items():
        (root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt").write_text(text)


def write_nih_layout(
    root: Path,
    entries: list[tuple[str, str, str, str]],
    sources: dict[str, Path | tuple[Path, int]],
    train_val: list[str],
    test: list[str],
    side: int | None = None,
) -> None:
    """NIH ChestX-ray14 as unpacked: ``images_00N/images/NAME.png`` (three a folder here),
    ``Data_Entry_2017_v2020.csv`` and the official ``train_val_list.txt`` / ``test_list.txt``.

    Args:
        entries: ``(Image Index, Finding Labels, Patient ID, View Position)`` rows of the data-entry table.
        sources: image name -> the fixture film written under that name, or ``(film, variant)`` (see
            :func:`write_film`); names without one have no file.
    """
    import shutil

    import pandas as pd

    for i, (name, source) in enumerate(sources.items()):
        source, variant = source if isinstance(source, tuple) else (source, 0)
        target = root / f"images_{i // 3 + 1:03d}" / "images" / name
        if side is None and not variant and source.suffix == ".png":
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
        else:
            write_film(source, target, variant, side)
    pd.DataFrame(
        [
            {
                "Image Index": n,
                "Finding Labels": f,
                "Follow-up #": 0,
                "Patient ID": p,
                "Patient Age": 50,
                "Patient Gender": "M",
                "View Position": v,
            }
            for n, f, p, v in entries
        ]
    ).to_csv(root / "Data_Entry_2017_v2020.csv", index=False)
    (root / "train_val_list.txt").write_text("".join(f"{n}\n" for n in train_val))
    (root / "test_list.txt").write_text("".join(f"{n}\n" for n in test))


def write_iu_layout(root: Path, report_files: set[str] | None = None, n_reports: int | None = None) -> list[list[str]]:
    """IU X-ray (Open-i): ``NLMCXR_reports.tgz`` holding the chosen real report XMLs (from torchxrayvision's copy) and
    an empty ``NLMCXR_png/`` for the images; returns each chosen report's image ids, in archive order.

    Args:
        report_files: archive member names to keep (``ecgen-radiology/1.xml``), or
        n_reports: the first this many reports that name at least two images.
    """
    import tarfile
    import xml.etree.ElementTree as ET

    from diffcxr_aug.evaluation.labeler_eval import default_iu_archive

    (root / "NLMCXR_png").mkdir(parents=True, exist_ok=True)
    image_ids: list[list[str]] = []
    with tarfile.open(default_iu_archive()) as src, tarfile.open(root / "NLMCXR_reports.tgz", "w:gz") as dst:
        for member in src:
            if not member.isfile():
                continue
            if report_files is not None and member.name not in report_files:
                continue
            data = src.extractfile(member).read()
            ids = [el.get("id") for el in ET.fromstring(data).findall("parentImage") if el.get("id")]
            if report_files is None and len(ids) < 2:
                continue
            dst.addfile(member, src.extractfile(member))
            image_ids.append(ids)
            if n_reports is not None and len(image_ids) == n_reports:
                break
    return image_ids


def write_tiny_open_clip(clip_dir: Path, bert_dir: Path, tokenizer, context_length: int) -> dict:
    """A tiny open_clip model with an HF BERT text tower (BiomedCLIP's layout: ``hf_model_name`` names the BERT
    folder ``bert_dir``, saved before), as a ``local-dir:`` folder: tokenizer and ``open_clip_config.json``. Returns
    the config; the caller creates the model (``open_clip.create_model(f"local-dir:{clip_dir}")``) and saves its
    weights as ``open_clip_model.safetensors``."""
    clip_dir.mkdir(parents=True)
    tokenizer.save_pretrained(clip_dir)  # open_clip's local-dir reads the tokenizer from the model folder
    text_cfg = {
        "hf_model_name": str(bert_dir),
        "hf_tokenizer_name": str(bert_dir),
        "hf_proj_type": "linear",
        "hf_pooler_type": "cls_last_hidden_state_pooler",
        "context_length": context_length,
    }
    vision_cfg = {"image_size": 32, "layers": 1, "width": 16, "patch_size": 16, "head_width": 8}
    config = {"model_cfg": {"embed_dim": 8, "vision_cfg": vision_cfg, "text_cfg": text_cfg}}
    (clip_dir / "open_clip_config.json").write_text(json.dumps(config))
    return config
