"""Each adapter on a small fixture in its official layout, built in tmp_path from the real files of tests/fixtures."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from diffcxr_aug.cli import app
from diffcxr_aug.data.adapters import common
from diffcxr_aug.data.adapters.csv_folder import prepare_csv
from diffcxr_aug.data.adapters.iu_xray import guess_projection, prepare_iu_xray
from diffcxr_aug.data.adapters.mimic import prepare_mimic
from diffcxr_aug.data.adapters.nih import nih_to_chexpert, prepare_nih
from diffcxr_aug.data.cache import open_cache
from diffcxr_aug.data.images import load_image
from diffcxr_aug.data.labels import NIH_LABELS
from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.data.tables import DatasetLayoutError
from tests.conftest import hannover_images, write_iu_layout, write_mimic_layout, write_nih_layout

runner = CliRunner()
SIZE = 32


def _hannover(fixtures_dir: Path) -> list[Path]:
    return hannover_images(fixtures_dir)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _rejected(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "rejected.csv", dtype=str, keep_default_na=False)


def _check_cache(out: Path, n: int) -> None:
    manifest = read_manifest(out)
    images = open_cache(manifest, SIZE, build=False)
    assert images.shape == (n, SIZE, SIZE) and images.std() > 10


# --- MIMIC-CXR-JPG -----------------------------------------------------------------------------------


def _mimic_fixture(root: Path, fixtures_dir: Path) -> None:
    fixtures = fixtures_dir / "xrv"
    han = _hannover(fixtures_dir)
    # (subject, study, dicom_id, view, image source, split); the last image is truncated, one is missing.
    images = [
        ("10000032", "50414267", "d1", "PA", fixtures / "16747_3_1.jpg", "train"),
        ("10000032", "50414267", "d2", "LATERAL", han[0], "train"),
        ("10000032", "53189527", "d3", "AP", han[1], "train"),
        ("10000764", "57375967", "d4", "AP", fixtures / "00000001_000.png", "validate"),
        ("10000898", "50771383", "d5", "PA", han[2], "test"),
        ("10000898", "50771383", "d6", "LL", han[3], "test"),
        ("10000935", "51178377", "d7", "PA", None, "train"),
    ]
    labels = [
        {"subject_id": "10000032", "study_id": "50414267", "Cardiomegaly": "1.0", "Pleural Effusion": "-1.0"},
        {"subject_id": "10000032", "study_id": "53189527", "No Finding": "1.0"},
        {"subject_id": "10000898", "study_id": "50771383", "Edema": "0.0"},
    ]
    report = "FINAL REPORT\n INDICATION: ___ with cough.\n\n FINDINGS: Mild cardiomegaly.\n IMPRESSION: No ___ edema."
    write_mimic_layout(root, images, labels, {("10000032", "50414267"): report})
    _truncate(root / "files" / "p10" / "p10000898" / "s50771383" / "d6.jpg")


def test_mimic(tmp_path, fixtures_dir):
    root, out = tmp_path / "mimic-cxr-jpg", tmp_path / "out"
    _mimic_fixture(root, fixtures_dir)
    prepare_mimic(root, out, size=SIZE, progress=False)
    frame = read_manifest(out).frame.set_index("meta_dicom_id")
    assert sorted(frame.index) == ["d1", "d2", "d3", "d4", "d5"]
    assert frame.loc["d1", "report"] == "Findings: Mild cardiomegaly. Impression: No edema."
    assert frame.loc["d3", "report"] == ""  # no report file: empty, not dropped
    assert (frame.loc["d1", "Cardiomegaly"], frame.loc["d1", "Pleural Effusion"]) == (1.0, -1.0)
    assert frame.loc["d3", "No Finding"] == 1.0 and np.isnan(frame.loc["d4", "Cardiomegaly"])
    assert (
        frame.loc["d1", "split"] == "train"
        and frame.loc["d4", "split"] == "val"
        and frame.loc["d5", "split"] == "test"
    )
    assert list(frame.loc[["d1", "d2", "d3"], "view"]) == ["PA", "LATERAL", "AP"]
    assert frame.loc["d1", "patient_id"] == "10000032" and frame.loc["d1", "study_id"] == "50414267"
    assert Path(frame.loc["d1", "image_path"]).is_absolute()  # points into the dataset: nothing copied
    rejected = _rejected(out).set_index("file")
    assert len(rejected) == 2
    truncated = next(f for f in rejected.index if f.endswith("d6.jpg"))
    assert "truncated" in rejected.loc[truncated, "reason"]
    assert rejected.loc[truncated, "source"] == "mimic-cxr-2.0.0-metadata.csv row 7"
    assert "no such file" in rejected.loc[next(f for f in rejected.index if f.endswith("d7.jpg")), "reason"]
    _check_cache(out, 5)


def test_mimic_missing_column_is_named(tmp_path, fixtures_dir):
    root = tmp_path / "mimic-cxr-jpg"
    _mimic_fixture(root, fixtures_dir)
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv").rename(columns={"ViewPosition": "View"})
    meta.to_csv(root / "mimic-cxr-2.0.0-metadata.csv", index=False)
    with pytest.raises(DatasetLayoutError, match=r"missing column\(s\) \['ViewPosition'\]; found columns \[.*'View'"):
        prepare_mimic(root, tmp_path / "out", size=SIZE, progress=False)


# --- NIH ChestX-ray14 -----------------------------------------------------------------------------------


def test_nih(tmp_path, fixtures_dir):
    root, out = tmp_path / "nih", tmp_path / "out"
    fixtures = fixtures_dir / "xrv"
    han = _hannover(fixtures_dir)
    names = {
        "00000001_000.png": fixtures / "00000001_000.png",
        "00027426_000.png": fixtures / "00027426_000.png",
        "00000002_000.png": han[0],
        "00000002_001.png": han[1],
        "00000003_000.png": han[2],
        "00000004_000.png": han[3],
    }
    entries = [
        ("00000001_000.png", "Cardiomegaly", "1", "PA"),
        ("00027426_000.png", "No Finding", "27426", "PA"),
        ("00000002_000.png", "Effusion|Infiltration", "2", "AP"),
        ("00000002_001.png", "Mass|Nodule|Hernia", "2", "AP"),
        ("00000003_000.png", "Pneumonia", "3", "PA"),
        ("00000004_000.png", "Covid", "4", "PA"),  # not a NIH label: rejected, not guessed
        ("00000005_000.png", "No Finding", "5", "PA"),  # no image
    ]
    train_val = ["00000001_000.png", "00000002_000.png", "00000002_001.png", "00000005_000.png"]
    write_nih_layout(root, entries, names, train_val, ["00027426_000.png", "00000003_000.png", "00000004_000.png"])
    prepare_nih(root, out, size=SIZE, progress=False)
    manifest = read_manifest(out)
    frame = manifest.frame.set_index("study_id")
    assert manifest.label_names == list(NIH_LABELS)
    assert frame.loc["00000001_000", "Cardiomegaly"] == 1 and frame.loc["00000001_000", "Effusion"] == 0
    assert (frame.loc["00027426_000", list(NIH_LABELS)] == 0).all()  # No Finding: 0 everywhere
    assert frame.loc["00000002_001", ["Mass", "Nodule", "Hernia"]].tolist() == [1, 1, 1]
    assert frame.loc["00027426_000", "split"] == "test" and frame.loc["00000003_000", "split"] == "test"
    assert frame.loc["00000001_000", "split"] in ("train", "val")
    assert frame.loc["00000002_000", "split"] == frame.loc["00000002_001", "split"]
    assert frame.loc["00000002_000", "view"] == "AP" and frame.loc["00000002_000", "meta_sex"] == "M"
    rejected = _rejected(out)
    assert len(rejected) == 2
    assert (
        "unknown finding label(s) ['Covid']" in rejected.loc[rejected["file"] == "00000004_000.png", "reason"].iloc[0]
    )
    assert "no such file" in rejected.loc[rejected["file"].str.endswith("00000005_000.png"), "reason"].iloc[0]
    _check_cache(out, 5)

    mapped = nih_to_chexpert(manifest).set_index("study_id")
    assert mapped.loc["00000002_000", ["Pleural Effusion", "Lung Opacity"]].tolist() == [1, 1]
    assert mapped.loc["00000002_001", "Lung Lesion"] == 1 and mapped.loc["00000002_001", "meta_nih_hernia"] == 1
    assert mapped.loc["00027426_000", "No Finding"] == 1 and mapped.loc["00000001_000", "No Finding"] == 0
    assert mapped["Fracture"].isna().all()  # no NIH source: unknown, never 0


# --- IU X-ray -----------------------------------------------------------------------------------------


def test_iu_xray(tmp_path, fixtures_dir):
    root, out = tmp_path / "iu", tmp_path / "out"
    write_iu_layout(root, {"ecgen-radiology/1.xml", "ecgen-radiology/2.xml", "ecgen-radiology/4.xml"})
    han = _hannover(fixtures_dir)
    ids = [
        "CXR1_1_IM-0001-3001",
        "CXR1_1_IM-0001-4001",
        "CXR2_IM-0652-1001",
        "CXR2_IM-0652-2001",
        "CXR4_IM-2050-1001",
        "CXR4_IM-2050-2001",
    ]
    for image_id, source in zip(ids, han, strict=False):
        shutil.copy(source, root / "NLMCXR_png" / f"{image_id}.png")
    shutil.copy(han[6], root / "NLMCXR_png" / "CXR9999_IM-0000-1001.png")  # named by no report
    _truncate(root / "NLMCXR_png" / "CXR4_IM-2050-2001.png")
    # Kaggle-style projection table for one study (its file names carry no "CXR" prefix).
    pd.DataFrame(
        {
            "uid": [1, 1],
            "filename": ["1_IM-0001-3001.dcm.png", "1_IM-0001-4001.dcm.png"],
            "projection": ["Frontal", "Lateral"],
        }
    ).to_csv(root / "indiana_projections.csv", index=False)

    prepare_iu_xray(root, out, size=SIZE, progress=False)
    frame = read_manifest(out).frame.set_index("meta_image_id")
    assert sorted(frame.index) == ids[:5]
    first = frame.loc["CXR1_1_IM-0001-3001"]
    assert first["report"].startswith("Findings: The cardiac silhouette and mediastinum size are within normal")
    assert "XXXX" not in "".join(frame["report"])
    assert first["meta_mesh"] == "normal" and first["No Finding"] == 1 and first["Pneumothorax"] == 0
    assert first["patient_id"] == "CXR1" and first["split"] == frame.loc["CXR1_1_IM-0001-4001", "split"]
    # metadata beats the heuristic; frontal + caption "PA and Lateral" -> PA
    assert (first["meta_projection"], first["view"], first["meta_view_source"]) == (
        "frontal",
        "PA",
        "indiana_projections.csv",
    )
    assert frame.loc["CXR1_1_IM-0001-4001", "view"] == "LATERAL"
    assert frame.loc["CXR2_IM-0652-1001", "meta_view_source"] == "image heuristic"
    assert set(frame["meta_projection"]) <= {"frontal", "lateral", "unknown"}
    rejected = _rejected(out)
    reasons = dict(zip(rejected["file"].map(lambda f: Path(f).name), rejected["reason"], strict=True))
    assert "truncated" in reasons["CXR4_IM-2050-2001.png"]
    assert reasons["CXR9999_IM-0000-1001.png"] == "image named by no report"
    _check_cache(out, 5)


def test_projection_heuristic_never_calls_a_real_frontal_lateral(fixtures_dir):
    frontals = [*_hannover(fixtures_dir), *sorted((fixtures_dir / "xrv").glob("*.png"))]
    guesses = [guess_projection(load_image(p)) for p in frontals]
    assert "lateral" not in guesses and guesses.count("frontal") >= 0.85 * len(guesses)
    assert guess_projection(np.zeros((64, 64), np.float32)) == "unknown"


# --- csv ----------------------------------------------------------------------------------------------


def _csv_fixture(tmp_path: Path, fixtures_dir: Path) -> tuple[Path, Path]:
    """The Hannover images with their own metadata.csv, plus a label column and one truncated copy."""
    root = tmp_path / "folder"
    shutil.copytree(fixtures_dir / "hannover", root)
    root.chmod(0o755)
    meta = pd.read_csv(root / "metadata.csv", dtype=str, keep_default_na=False).iloc[:12]
    meta["covid"] = ["1", "1", "0", "-1", "", "1.0", "1", "0", "1", "1", "0", "maybe"]
    meta["report"] = "FINDINGS: Bilateral opacities ___. IMPRESSION: Pneumonia."
    shutil.copy(root / meta["file"].iloc[1], root / "broken.png")
    (root / "broken.png").chmod(0o644)
    _truncate(root / "broken.png")
    meta.loc[len(meta)] = {**meta.iloc[0].to_dict(), "file": "broken.png", "covid": "1"}
    csv = tmp_path / "labels.csv"
    meta.to_csv(csv, index=False)
    return root, csv


def test_csv_adapter_and_cli(tmp_path, fixtures_dir):
    root, csv = _csv_fixture(tmp_path, fixtures_dir)
    out = tmp_path / "out"
    args = [
        "prepare",
        "csv",
        "--root",
        str(root),
        "--csv",
        str(csv),
        "--image-col",
        "file",
        "--label-cols",
        "covid",
        "--patient-col",
        "patient_id",
        "--view-col",
        "projection",
        "--report-col",
        "report",
        "--out",
        str(out),
        "--size",
        str(SIZE),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    frame = manifest.frame
    assert manifest.label_names == ["covid"] and len(frame) == 11
    assert frame["covid"].tolist()[:6] == [1, 1, 0, -1, pytest.approx(np.nan, nan_ok=True), 1]
    assert set(frame["view"]) <= {"PA", "AP"} and frame["report"].iloc[0] == (
        "Findings: Bilateral opacities. Impression: Pneumonia."
    )
    assert "meta_sex" in frame.columns and (frame.groupby("patient_id")["split"].nunique() == 1).all()
    reasons = _rejected(out).set_index("source")["reason"]
    assert reasons["labels.csv row 13"] == "label value(s) {'covid': 'maybe'} are not 1, 0, -1 or empty"
    assert "truncated" in reasons["labels.csv row 14"]
    _check_cache(out, 11)


def test_csv_missing_column_names_it_and_lists_found_columns(tmp_path, fixtures_dir):
    root, csv = _csv_fixture(tmp_path, fixtures_dir)
    with pytest.raises(DatasetLayoutError, match=r"missing column\(s\) \['Covid'\]; found columns \['file', "):
        prepare_csv(root, tmp_path / "out", csv=csv, image_col="file", label_cols=["Covid"], progress=False)
    args = [
        "prepare",
        "csv",
        "--root",
        str(root),
        "--csv",
        str(csv),
        "--image-col",
        "path",
        "--label-cols",
        "covid",
        "--out",
        str(tmp_path / "out"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "['path']" in result.output and "found columns" in result.output


def test_interrupted_scan_resumes_where_it_stopped(tmp_path, fixtures_dir, monkeypatch):
    root, csv = _csv_fixture(tmp_path, fixtures_dir)
    out = tmp_path / "out"
    real_verify = common.verify_image
    calls: list[str] = []

    def interrupted(path):
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the scan
        calls.append(path)
        return real_verify(path)

    kwargs = dict(
        csv=csv, image_col="file", label_cols="covid", patient_col="patient_id", size=SIZE, progress=False, workers=1
    )
    monkeypatch.setattr(common, "verify_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_csv(root, out, **kwargs)
    assert not (out / "manifest.csv").exists()
    first_run = list(calls)

    calls.clear()
    monkeypatch.setattr(common, "verify_image", lambda p: (calls.append(p), real_verify(p))[1])
    prepare_csv(root, out, **kwargs)
    assert len(first_run) == 5 and not set(first_run) & set(calls)  # nothing checked twice
    assert len(first_run) + len(calls) == 12  # 12 distinct images in the table (one row rejected earlier)
    assert len(read_manifest(out)) == 11
    calls.clear()
    prepare_csv(root, out, **kwargs)  # a finished run reruns without checking anything again
    assert calls == []


def test_torn_scan_log_line_is_ignored(tmp_path, fixtures_dir):
    paths = [str(p) for p in _hannover(fixtures_dir)[:3]]
    common.scan(paths, tmp_path, progress=False, workers=1)
    log = tmp_path / common.SCAN_LOG
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])  # killed mid-write
    assert set(common._read_scan_log(log)) == set(paths[:2])
    entries = common.scan(paths, tmp_path, progress=False, workers=1)
    assert all(entries[p]["reason"] == "" for p in paths)


def test_csv_with_every_label_bad_writes_rejected_and_fails(tmp_path, fixtures_dir):
    root, csv = _csv_fixture(tmp_path, fixtures_dir)
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    table["covid"] = "positive"
    table.to_csv(csv, index=False)
    with pytest.raises(DatasetLayoutError, match="no usable row"):
        prepare_csv(root, tmp_path / "out", csv=csv, image_col="file", label_cols="covid", progress=False)
    assert len(_rejected(tmp_path / "out")) == len(table)


def test_view_names():
    assert [common.normalize_view(v) for v in ("pa", "AP AXIAL", "LL", "Lateral", "L", "", None, "oblique")] == [
        "PA",
        "AP",
        "LATERAL",
        "LATERAL",
        "LATERAL",
        "UNKNOWN",
        "UNKNOWN",
        "UNKNOWN",
    ]
