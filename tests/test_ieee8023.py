"""The ieee8023 COVID-19 adapter on real films of the collection (tests/fixtures/ieee8023, in its own layout)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from diffcxr_aug.data.adapters.ieee8023 import combine_labels, finding_labels, notes_report, prepare_ieee8023
from diffcxr_aug.data.cache import open_cache
from diffcxr_aug.data.images import load_image
from diffcxr_aug.data.labeler import RuleLabeler
from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.manifest import read_manifest, write_manifest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ieee8023"
SIZE = 32
SEED = 3  # a seed that puts the fixture's seven patients in more than one split, so the split test means something
PERMISSIVE = {"CC BY", "CC BY 3.0", "CC BY 4.0", "CC BY-SA", "Apache 2.0"}
PNG_IN_JPG = "41182_2020_203_Fig5_HTML.jpg"
PALETTE = "thnov10p5641g006-c.png"
VOLUME = "coronacases_org_001.nii.gz"


def _metadata(root: Path) -> tuple[list[str], list[list[str]]]:
    with open(root / "metadata.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _by_file(out: Path) -> pd.DataFrame:
    frame = read_manifest(out).frame
    return frame.set_index(frame["image_path"].map(lambda p: Path(p).name))


def _rejected(out: Path) -> pd.DataFrame:
    frame = pd.read_csv(out / "rejected.csv", dtype=str, keep_default_na=False)
    return frame.set_index(frame["file"].map(lambda p: Path(p).name))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ieee8023")
    prepare_ieee8023(FIXTURE, out, size=SIZE, seed=SEED, progress=False, workers=2)
    return out


@pytest.fixture(scope="module")
def altered(tmp_path_factory) -> Path:
    """The fixture with one listed film deleted, one unlisted film added, and a lateral and a CT row appended.

    No lateral film or CT slice of the snapshot carries a permissive licence, so the two extra rows name copies of
    fixture films: the rows test the metadata path (view ``L``, modality CT), not the pixels.
    """
    root = tmp_path_factory.mktemp("collection") / "covid-chestxray-dataset"
    shutil.copytree(FIXTURE, root)
    (root / "images" / "ARDSSevere.png").unlink()
    shutil.copy(root / "images" / "cae2c0a9.jpg", root / "images" / "unlisted-film.jpg")
    shutil.copy(root / "images" / "41182_2020_203_Fig4_HTML.jpg", root / "images" / "lateral-stand-in.jpg")
    shutil.copy(root / "images" / "5f619d7e.jpg", root / "images" / "ct-slice-stand-in.jpg")
    header, rows = _metadata(root)
    column = {name: i for i, name in enumerate(header)}
    template = next(r for r in rows if r[column["filename"]] == "41182_2020_203_Fig4_HTML.jpg")
    lateral = list(template)
    lateral[column["filename"]], lateral[column["view"]] = "lateral-stand-in.jpg", "L"
    ct = next(list(r) for r in rows if r[column["filename"]] == VOLUME)
    ct[column["folder"]], ct[column["filename"]] = "images", "ct-slice-stand-in.jpg"
    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *rows, lateral, ct])
    out = root.parent / "prepared"
    prepare_ieee8023(root, out, size=SIZE, seed=SEED, progress=False, workers=2)
    return out


def test_every_fixture_row_is_permissively_licensed():
    header, rows = _metadata(FIXTURE)
    licences = {r[header.index("filename")]: r[header.index("license")].strip() for r in rows}
    assert set(licences.values()) <= PERMISSIVE, licences
    on_disk = {p.name for p in (FIXTURE / "images").iterdir()}
    assert on_disk == set(licences) - {VOLUME}
    assert all(max(Image.open(FIXTURE / "images" / name).size) <= 256 for name in on_disk)


def test_notes_become_reports_and_labels(prepared):
    frame = _by_file(prepared)
    assert len(frame) == 10
    film = frame.loc[PNG_IN_JPG]
    assert film["report"].startswith("Posteroanterior chest radiograph of patient 2")
    assert "Endotracheal tube in situ" in film["report"]
    assert film["Support Devices"] == 1 and film["Pneumonia"] == 1 and math.isnan(film["No Finding"])
    # other_notes that credit the authors stay out of the report and in the metadata.
    cyst = frame.loc["X-ray_of_cyst_in_pneumocystis_pneumonia_1.jpg"]
    assert "Credit" not in cyst["report"] and cyst["meta_other_notes"].startswith("Credit to Carolyn M. Allen")
    assert cyst["Pneumonia"] == 1  # finding Pneumocystis
    assert (frame["report"] != "").sum() == 7  # the three Hannover films have no notes
    assert {"meta_modality", "meta_license", "meta_finding", "meta_view", "meta_offset"} <= set(frame.columns)
    assert frame.loc["ARDSSevere.png", "meta_license"] == "CC BY-SA"


def test_finding_labels_films_without_notes(prepared):
    frame = _by_file(prepared)
    normal = frame.loc["cae2c0a9.jpg"]  # finding "No Finding", no notes
    assert normal["report"] == "" and normal["No Finding"] == 1 and normal["Pneumonia"] == 0
    assert normal[[n for n in CHEXPERT_LABELS if n not in ("No Finding", "Pneumonia")]].isna().all()
    covid = frame.loc["5f619d7e.jpg"]  # same patient, finding COVID-19
    assert covid["Pneumonia"] == 1 and math.isnan(covid["No Finding"])
    ards = frame.loc["ARDSSevere.png"]  # ARDS has no CheXpert twin, but it is not normal
    assert math.isnan(ards["Pneumonia"]) and math.isnan(ards["No Finding"])


def test_odd_files_decode_by_content(prepared):
    with Image.open(FIXTURE / "images" / PNG_IN_JPG) as img:
        assert (img.format, img.mode) == ("PNG", "RGBA")
    with Image.open(FIXTURE / "images" / PALETTE) as img:
        assert (img.format, img.mode) == ("PNG", "P")
    for name in (PNG_IN_JPG, PALETTE):
        gray = np.asarray(Image.open(FIXTURE / "images" / name).convert("RGB").convert("L"), dtype=np.float32) / 255
        np.testing.assert_allclose(load_image(FIXTURE / "images" / name), gray, atol=1 / 255)
    manifest = read_manifest(prepared)
    images = open_cache(manifest, SIZE, build=False)
    names = [Path(p).name for p in manifest.frame["image_path"]]
    for name in (PNG_IN_JPG, PALETTE):
        assert images[names.index(name)].std() > 10  # a film in the cache, not a blank decode


def test_volume_row_is_rejected_by_name(prepared):
    rejected = _rejected(prepared)
    assert list(rejected.index) == [VOLUME]
    assert "3-D volume (CT)" in rejected.loc[VOLUME, "reason"] and "absent" in rejected.loc[VOLUME, "reason"]
    assert rejected.loc[VOLUME, "source"] == "metadata.csv row 4"


def test_missing_and_unlisted_files_are_rejected_by_name(altered):
    rejected = _rejected(altered)
    assert rejected.loc["ARDSSevere.png", "reason"].endswith("no such file")
    assert rejected.loc["unlisted-film.jpg", "reason"].startswith("not listed in metadata.csv")
    assert rejected.loc["unlisted-film.jpg", "source"] == "images/ folder"
    # Every file of the collection and every row's file is in the manifest or rejected by name.
    root = altered.parent / "covid-chestxray-dataset"
    header, rows = _metadata(root)
    listed = {r[header.index("filename")] for r in rows}
    on_disk = {p.name for p in (root / "images").iterdir()}
    accounted = set(_by_file(altered).index) | set(rejected.index)
    assert listed | on_disk == accounted


def test_splits_are_patient_level(prepared):
    frame = read_manifest(prepared).frame
    assert frame.groupby("patient_id")["split"].nunique().max() == 1
    assert frame["split"].nunique() > 1
    assert set(frame.loc[frame["patient_id"] == "331b", "study_id"]) == {"331b-d10", "331b-d13"}


def test_views_and_modality(prepared, altered):
    frame = _by_file(prepared)
    assert frame.loc["3dedeb92.jpg", ["view", "meta_view"]].tolist() == ["AP", "AP Supine"]
    assert set(frame["view"]) == {"PA", "AP"}
    assert set(frame["meta_modality"]) == {"X-ray"}
    altered_frame = _by_file(altered)
    assert altered_frame.loc["lateral-stand-in.jpg", ["view", "meta_view"]].tolist() == ["LATERAL", "L"]
    ct = altered_frame.loc["ct-slice-stand-in.jpg"]
    assert (ct["view"], ct["meta_view"], ct["meta_modality"]) == ("UNKNOWN", "Axial", "CT")


@pytest.mark.parametrize(
    "finding, labels, normal",
    [
        ("COVID-19", {"Pneumonia": 1.0}, False),
        ("COVID-19, ARDS", {"Pneumonia": 1.0}, False),
        ("Pneumonia/Viral/COVID-19", {"Pneumonia": 1.0}, False),  # later snapshots' spelling
        ("Mycoplasma Bacterial Pneumonia", {"Pneumonia": 1.0}, False),
        ("Lipoid", {"Pneumonia": 1.0}, False),
        ("ARDS", {}, False),
        ("No Finding", {"No Finding": 1.0, "Pneumonia": 0.0}, True),
        ("todo", {}, None),
        ("", {}, None),
    ],
)
def test_finding_mapping(finding, labels, normal):
    assert finding_labels(finding) == (labels, normal)


def test_combine_labels_takes_the_strongest_and_guards_no_finding():
    labeler = RuleLabeler()
    # The notes negate pneumonia, the finding names one: positive beats negative, as for two mentions.
    labels = combine_labels(labeler("No pneumonia."), "COVID-19")
    assert labels["Pneumonia"] == 1 and math.isnan(labels["No Finding"])
    # Notes that find an effusion overrule a "No Finding" finding's No Finding, not its negative pneumonia.
    labels = combine_labels(labeler("Small left pleural effusion."), "No Finding")
    assert labels["Pleural Effusion"] == 1 and labels["Pneumonia"] == 0 and math.isnan(labels["No Finding"])
    labels = combine_labels(labeler("Unremarkable chest."), "todo")
    assert labels["No Finding"] == 1
    # No notes and a finding that says nothing: nothing is known (the labeler alone would say No Finding).
    assert all(math.isnan(v) for v in combine_labels(None, "todo").values())


def test_notes_report_joins_descriptions_and_drops_credits():
    notes = ["Case courtesy of Dr X, Radiopaedia.org", "removal of ECMO."]
    report = notes_report("Hazy infiltrates  in both lungs", notes)
    assert report == "Hazy infiltrates in both lungs. removal of ECMO."


def test_lnfs_drops_laterals_by_view_and_ct_by_modality_before_the_latents(altered, tmp_path):
    """Metadata first: the lateral film and the CT slice never reach LNFS; scores.csv names why each went."""
    from diffcxr_aug.generator.noise_filter import run_filter
    from diffcxr_aug.generator.settings import FilterSettings
    from diffcxr_aug.generator.vae import build_vae

    torch.manual_seed(0)
    vae = tmp_path / "vae"
    build_vae("tiny", sample_size=SIZE).save_pretrained(vae)
    section = FilterSettings(
        drop_views=["LATERAL"], drop_modalities=["ct"], n_clusters=2, manifold_components=2, discriminator_steps=5,
        threshold="contamination", contamination=0.1, min_cluster_share=0.1,
    )  # fmt: skip
    # LNFS fits on 20 images at least: the frontal films three times over (copies under new names), beside the two.
    manifest = read_manifest(altered)
    frame = manifest.frame.assign(image_path=[str(p) for p in manifest.image_paths()])
    frontal = frame[frame["view"] != "LATERAL"]
    copies = []
    for k in (1, 2):
        copy = frontal[frontal["meta_modality"] != "CT"].copy()
        for i, path in copy["image_path"].items():
            target = tmp_path / "copies" / f"{k}-{Path(path).name}"
            target.parent.mkdir(exist_ok=True)
            shutil.copy(path, target)
            copy.loc[i, "image_path"] = str(target)
        copies.append(copy)
    data = write_manifest(pd.concat([frame, *copies], ignore_index=True), tmp_path / "data" / "manifest.csv").parent
    run_filter(data, tmp_path / "f", section, vae=vae, size=SIZE, device="cpu", progress=False)
    scores = pd.read_csv(tmp_path / "f" / "scores.csv", keep_default_na=False)
    by_file = scores.assign(file=scores["image_path"].map(lambda p: Path(p).name)).set_index("file")
    assert by_file.loc["lateral-stand-in.jpg", "reason"] == "view LATERAL"
    assert by_file.loc["ct-slice-stand-in.jpg", "reason"] == "modality CT"
    assert by_file.loc["ct-slice-stand-in.jpg", "score"] == ""  # never scored
    kept = pd.read_csv(tmp_path / "f" / "manifest.csv")
    assert (
        not kept["image_path"]
        .map(lambda p: Path(p).name)
        .isin(["lateral-stand-in.jpg", "ct-slice-stand-in.jpg"])
        .any()
    )
    report = json.loads((tmp_path / "f" / "filter_report.json").read_text())
    assert (
        report["dropped_by_modality"] == {"modalities": ["CT"], "rows": 1} and report["dropped_by_view"]["rows"] == 1
    )


@pytest.mark.parametrize(
    ("finding", "label"),
    [("COVID-19", 1.0), ("COVID-19, ARDS", 1.0), ("Pneumonia/Viral/COVID-19", 1.0), ("Pneumocystis", 0.0),
     ("No Finding", 0.0), ("todo", None), ("", None)],
)  # fmt: skip
def test_covid_label_is_the_collections_own_diagnosis(finding, label, prepared):
    from diffcxr_aug.data.adapters.ieee8023 import covid_label

    value = covid_label(finding)
    assert (label is None and math.isnan(value)) or value == label
    assert "COVID-19" in read_manifest(prepared).label_names
