from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffcxr_aug.cli import app
from diffcxr_aug.data.cache import cache_files
from diffcxr_aug.data.labeler import PHRASES_DIR
from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.data.phantom import NOISE_KINDS, prepare_phantom, render_study, sample_world
from diffcxr_aug.data.phantom.findings import Finding
from diffcxr_aug.data.phantom.reports import LABEL_FINDING
from diffcxr_aug.data.phantom.world import phantom_rows


def _digests(folder) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.parent.name != "cache")
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def rows_400() -> list[dict]:
    return phantom_rows(sample_world(400, seed=11, noise_rate=0.05), seed=11)


def test_same_seed_gives_identical_files_whatever_the_process_count(tmp_path):
    prepare_phantom(tmp_path / "a", n=64, size=64, seed=3, progress=False, workers=1)
    prepare_phantom(tmp_path / "b", n=64, size=64, seed=3, progress=False, workers=2)
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert len(a) == 64 + 2  # images, manifest.csv, rejected.csv
    assert a == b


def test_different_seed_differs_and_ids_are_namespaced(tmp_path):
    prepare_phantom(tmp_path / "a", n=12, size=64, seed=0, progress=False)
    prepare_phantom(tmp_path / "b", n=12, size=64, seed=1, progress=False)
    ma, mb = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert set(ma.frame["patient_id"]).isdisjoint(mb.frame["patient_id"])
    assert all(p.startswith("phantom-s1-p") for p in mb.frame["patient_id"])
    pa = Image.open(ma.image_paths()[0])
    pb = Image.open(mb.image_paths()[0])
    assert not np.array_equal(np.asarray(pa), np.asarray(pb))


def test_manifest_schema_images_and_cache(tmp_path):
    path = prepare_phantom(tmp_path, n=30, size=64, seed=5, progress=False)
    manifest = read_manifest(path)
    frame = manifest.frame
    assert len(frame) == 30
    assert set(CHEXPERT_LABELS) <= set(manifest.label_names)
    assert set(manifest.label_names) == set(CHEXPERT_LABELS)  # noise and meta_ columns are not labels
    assert {"noise", "meta_age", "meta_sex", "meta_findings"} <= set(frame.columns)
    assert set(frame["view"]) <= {"PA", "AP", "LATERAL"}
    assert (tmp_path / "rejected.csv").is_file()
    img = Image.open(manifest.image_paths()[0])
    assert img.mode == "L" and img.size == (64, 64)
    array_path, _ = cache_files(manifest, 64)
    assert np.load(array_path, mmap_mode="r").shape == (30, 64, 64)
    # Several studies per patient, and splits that keep patients whole (read_manifest checked it too).
    assert frame["patient_id"].nunique() < len(frame)


def test_clean_all_train_world(tmp_path):
    prepare_phantom(tmp_path, n=20, size=64, seed=9, noise_rate=0.0, split_fractions=(1.0, 0.0, 0.0), progress=False)
    frame = read_manifest(tmp_path).frame
    assert set(frame["split"]) == {"train"}
    assert (frame["noise"] == "").all()
    assert (frame["view"] != "LATERAL").all()


def test_every_label_has_positives_in_a_few_hundred_images(rows_400):
    for label in CHEXPERT_LABELS:
        values = np.array([r[label] for r in rows_400], dtype=float)
        assert (values == 1).sum() >= 8, label
    # The world is neither all sick nor all healthy.
    normal = np.mean([r["No Finding"] == 1 for r in rows_400])
    assert 0.15 < normal < 0.45


def test_noise_rate_and_kinds():
    world = sample_world(3000, seed=2, noise_rate=0.05)
    kinds = [t.noise for t in world if t.noise]
    assert 0.03 <= len(kinds) / len(world) <= 0.07
    assert set(kinds) == set(NOISE_KINDS)
    assert all(t.view == "LATERAL" for t in world if t.noise == "lateral")
    assert not any(t.noise for t in sample_world(500, seed=2, noise_rate=0.0))


def test_small_world_is_the_start_of_a_large_one():
    small, large = sample_world(50, seed=4), sample_world(300, seed=4)
    assert [t.describe() for t in small] == [t.describe() for t in large[:50]]
    assert np.array_equal(render_study(small[7], 64, 4), render_study(large[7], 64, 4))


def test_labels_follow_the_generating_truth(rows_400):
    for row in rows_400:
        present = {item.split(":")[0] for item in row["meta_findings"].split(";") if item}
        for label, finding in LABEL_FINDING.items():
            value = row[label]
            if finding in present:
                assert value in (1.0, -1.0), (label, row["report"])
            elif label in ("Pneumonia", "Atelectasis"):
                assert value != 1.0, (label, row["report"])  # an open differential may hedge it (-1)
            else:
                assert value != 1.0 and value != -1.0, (label, row["report"])
        opacity = bool(present & {"opacity", "consolidation", "pneumonia"})
        assert (row["Lung Opacity"] in (1.0, -1.0)) == opacity
        assert (row["No Finding"] == 1.0) == (not (present - {"support_devices"}))


def _mentions() -> dict[str, list[str]]:
    folder = PHRASES_DIR / "phrases" / "mention"  # the upstream CheXpert lists, as the package ships them
    out = {}
    for label in CHEXPERT_LABELS:
        path = folder / (label.lower().replace(" ", "_") + ".txt")
        out[label] = [line.strip().replace("_", " ").strip() for line in path.read_text().splitlines() if line.strip()]
    return out


def test_reports_use_chexpert_phrasing(rows_400):
    mentions = _mentions()
    mentions["Consolidation"] = ["consolidat"]  # the shipped consolidation list is empty
    for row in rows_400:
        text = row["report"].lower()
        for label in CHEXPERT_LABELS[1:]:
            if row[label] == row[label]:  # stated, hedged or denied: the report must name it
                assert any(m in text for m in mentions[label]), (label, row[label], row["report"])


def test_reports_look_like_reports(rows_400):
    reports = [r["report"] for r in rows_400]
    words = np.array([len(r.split()) for r in reports])
    assert words.min() <= 6 and (words > 77).mean() > 0.05
    assert any("___" in r for r in reports)
    assert any(re.search(r"\bno (pleural effusion or )?pneumothorax\b", r.lower()) for r in reports)
    assert any(re.search(r"\b(may represent|possible|cannot be excluded)\b", r.lower()) for r in reports)
    assert sum(r.startswith("EXAMINATION:") for r in reports) > 0.2 * len(reports)
    assert len(set(reports)) > 0.9 * len(reports)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "n must be"),
        ({"size": 16}, "size must be"),
        ({"noise_rate": 1.5}, "noise_rate"),
        ({"split_fractions": (0.5, 0.1, 0.1)}, "split_fractions"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prepare_phantom(tmp_path, **{"n": 4, "size": 64, **kwargs})


def test_cli_prepare_phantom(tmp_path):
    result = CliRunner().invoke(app, ["prepare", "phantom", "--n", "40", "--size", "64", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path)
    assert len(manifest) == 40 and set(manifest.frame["split"]) <= {"train", "val", "test"}
    args = ["prepare", "phantom", "--n", "40", "--size", "32", "--noise-rate", "0.5", "--out", str(tmp_path / "noisy")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    noisy = read_manifest(tmp_path / "noisy").frame
    assert 10 <= (noisy["noise"] != "").sum() <= 30  # 20 expected; the default 0.05 gives about 2
    assert set(noisy.loc[noisy["noise"] == "lateral", "view"]) <= {"LATERAL"}


@pytest.mark.parametrize(
    "finding",
    [
        Finding("cardiomegaly", 0.6),
        Finding("enlarged_cardiomediastinum", 0.6),
        Finding("opacity", 0.6, side="right", zone="lower"),
        Finding("lung_lesion", 0.6, side="left", zone="upper", kind="nodule", loc=(0.5, 0.5)),
        Finding("edema", 0.6, side="bilateral"),
        Finding("consolidation", 0.6, side="right", zone="lower", kind="lobar"),
        Finding("pneumonia", 0.6, side="left", zone="lower", kind="patchy"),
        Finding("atelectasis", 0.7, side="left", kind="lobar"),
        Finding("pneumothorax", 0.6, side="right"),
        Finding("pleural_effusion", 0.6, side="left"),
        Finding("pleural_other", 0.6, side="right", kind="lateral"),
        Finding("fracture", 0.6, side="left", kind="clavicle"),
        Finding("fracture", 0.8, side="right", kind="rib", items=(6, 7)),
        Finding("fracture", 0.3, side="left", kind="rib", items=(5,)),
        Finding("support_devices", 0.6, items=("ett", "cvc_rij"), extra={"ett_cm": 4.0}),
    ],
    ids=lambda f: f"{f.name}-{f.kind}" if f.kind else f.name,
)
def test_each_finding_is_drawn_where_it_should_be(finding):
    # The same study with and without one finding (anatomy and film noise are drawn from separate streams).
    base = next(t for t in sample_world(40, seed=0, noise_rate=0.0) if t.no_finding and t.view == "PA")
    normal = render_study(dataclasses.replace(base, findings={}), 64, 0).astype(float)
    sick = render_study(dataclasses.replace(base, findings={finding.name: finding}), 64, 0).astype(float)
    diff = sick - normal
    assert (np.abs(diff) > 12).sum() >= 8, finding.name  # visible at 64 px, not a stray pixel
    half = diff[:, :32] if finding.side == "right" else diff[:, 32:]  # patient's right is the image left
    other = diff[:, 32:] if finding.side == "right" else diff[:, :32]
    if finding.side in ("right", "left"):
        assert np.abs(half).sum() > 1.5 * np.abs(other).sum(), finding.name
    # Air (pneumothorax) darkens; everything else but a displaced bone (which moves density) adds density.
    if finding.name != "fracture":
        assert (diff.sum() < 0) == (finding.name == "pneumothorax"), finding.name
