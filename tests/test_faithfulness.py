"""Faithfulness mAUC: a classifier trained on real images scores generated images against their prompts' labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffcxr_aug.evaluation.faithfulness import evaluate_faithfulness, masked_auc

pytestmark = pytest.mark.usefixtures("one_thread")


def test_masked_auc_scores_certain_cells_of_labels_with_both_classes():
    nan = np.nan
    y_true = np.array([[1, 0, 1], [0, 0, -1], [1, nan, 0], [0, 0, nan]], dtype=float)
    y_score = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.9], [0.8, 0.5, 0.7], [0.1, 0.2, 0.1]])
    result = masked_auc(y_true, y_score, ["a", "b", "c"])
    # a: perfect; b: one class only, not scored; c: only rows 0 and 2 are certain (1 scored 0.2, 0 scored 0.7).
    assert result["per_label"] == {"a": 1.0, "c": 0.0}
    assert result["mauc"] == pytest.approx(0.5) and result["n_images"] == 4


def test_evaluate_faithfulness_scores_every_set_with_one_classifier(tiny_manifest, tmp_path):
    folder = tiny_manifest.parent
    results = evaluate_faithfulness(folder, {"copy": folder}, tmp_path, size=32, epochs=1, batch_size=8, device="cpu")
    assert set(results) == {"classifier", "real_test", "copy"}
    assert results["copy"]["n_images"] == 24 and set(results["copy"]["per_label"]) == {"Cardiomegaly"}
    assert 0.0 <= results["copy"]["mauc"] <= 1.0
    assert json.loads((tmp_path / "faithfulness.json").read_text())["copy"]["n_images"] == 24
    assert "| copy | 24 |" in (tmp_path / "faithfulness.md").read_text()
    # A second call scores with the same saved judge instead of training another one.
    weights = tmp_path / "reference_classifier" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = evaluate_faithfulness(folder, {"copy": folder}, tmp_path, size=32, epochs=1, device="cpu")
    assert weights.stat().st_mtime_ns == stamp
    assert again["copy"]["mauc"] == pytest.approx(results["copy"]["mauc"])
