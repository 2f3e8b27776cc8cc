from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.manifest import ManifestError, read_manifest, write_manifest, write_rejected
from diffcxr_aug.data.splits import assign_patient_splits


def _frame(n: int = 6) -> pd.DataFrame:
    rows = []
    for i in range(n):
        row = {
            "image_path": f"images/{i}.png",
            "patient_id": f"p{i // 2}",
            "study_id": f"s{i}",
            "view": "PA",
            "split": "train",
            "report": "No acute findings.",
        }
        row.update({name: "" for name in CHEXPERT_LABELS})
        row["Cardiomegaly"] = ["1", "0", "-1", "", "1.0", "0"][i % 6]
        rows.append(row)
    return pd.DataFrame(rows)


def test_round_trip_keeps_labels_and_nan(tmp_path):
    path = write_manifest(_frame(), tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest.label_names == list(CHEXPERT_LABELS)
    cardio = manifest.labels(["Cardiomegaly"])[:, 0]
    np.testing.assert_array_equal(np.isnan(cardio), [False, False, False, True, False, False])
    assert list(cardio[~np.isnan(cardio)]) == [1, 0, -1, 1, 0]
    text = path.read_text()
    assert "1.0" not in text  # labels are written as integers
    assert manifest.image_paths()[0] == tmp_path / "images/0.png"


def test_bad_label_value_names_file_row_and_column(tmp_path):
    frame = _frame()
    frame.loc[3, "Edema"] = "yes"
    frame.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(ManifestError, match=r"manifest.csv, row 5: label column 'Edema' holds 'yes'"):
        read_manifest(tmp_path)


def test_missing_column_lists_found_columns(tmp_path):
    _frame().drop(columns=["view"]).to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['view'\]; found columns"):
        read_manifest(tmp_path)


def test_patient_in_two_splits_fails_loudly(tmp_path):
    frame = _frame()
    frame.loc[1, "split"] = "test"  # p0 is in train (row 0) and test (row 1)
    frame.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(ManifestError, match="more than one split.*'p0'"):
        read_manifest(tmp_path)


def test_bad_view_and_duplicate_path(tmp_path):
    frame = _frame()
    frame.loc[2, "view"] = "oblique"
    with pytest.raises(ManifestError, match="row 4: view 'oblique'"):
        write_manifest(frame, tmp_path)
    frame = _frame()
    frame.loc[2, "image_path"] = frame.loc[1, "image_path"]
    with pytest.raises(ManifestError, match="appears twice"):
        write_manifest(frame, tmp_path)
    assert not (tmp_path / "manifest.csv").exists()


def test_failed_write_keeps_previous_file(tmp_path):
    path = write_manifest(_frame(), tmp_path)
    before = path.read_bytes()
    bad = _frame()
    bad.loc[0, "split"] = "holdout"
    with pytest.raises(ManifestError):
        write_manifest(bad, tmp_path)
    assert path.read_bytes() == before


def test_split_subset_keeps_file_rows(tmp_path):
    frame = _frame()
    frame.loc[4:, "split"] = "test"
    write_manifest(frame, tmp_path)
    manifest = read_manifest(tmp_path)
    test = manifest.split("test")
    assert list(test.frame.index) == [4, 5]
    assert test.full is manifest
    with pytest.raises(ValueError, match="Unknown split"):
        manifest.split("holdout")


def test_patient_splits_are_deterministic_and_patient_level():
    ids = [f"patient{i // 3}" for i in range(3000)]
    a = assign_patient_splits(ids, seed=1)
    b = assign_patient_splits(list(reversed(ids)), seed=1)[::-1]
    np.testing.assert_array_equal(a, b)  # order of rows does not matter
    frame = pd.DataFrame({"patient_id": ids, "split": a})
    assert (frame.groupby("patient_id")["split"].nunique() == 1).all()
    shares = frame.drop_duplicates("patient_id")["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.7) < 0.05 and abs(shares["test"] - 0.2) < 0.05
    assert not np.array_equal(a, assign_patient_splits(ids, seed=2))
    with pytest.raises(ValueError, match="sum"):
        assign_patient_splits(ids, fractions=(0.5, 0.2, 0.2))


def test_rejected_written_even_when_empty(tmp_path):
    path = write_rejected([], tmp_path)
    assert pd.read_csv(path).columns.tolist() == ["file", "reason"]
    path = write_rejected([{"file": "a.png", "reason": "truncated", "row": 3}], tmp_path)
    assert pd.read_csv(path).iloc[0].to_dict() == {"file": "a.png", "reason": "truncated", "row": 3}
