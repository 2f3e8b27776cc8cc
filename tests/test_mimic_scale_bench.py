"""``bench/mimic_scale.py`` at a few dozen small films, so that the benchmark cannot rot: the layout it writes is
what the MIMIC-CXR adapter reads, the planted films are rejected by name, and every step runs."""

from __future__ import annotations

import gzip
import importlib
import re

import pandas as pd
import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bench(monkeypatch):
    """The script as a module; by name from ``bench/`` on the path, so that its spawned workers import it too."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    return importlib.import_module("mimic_scale")


SMALL = ["--side", "128", "--pool", "3", "--cache-size", "64", "--cache-workers", "1", "2", "--in-process"]


def test_the_layout_is_mimic_cxr_jpg_and_prepare_rejects_the_planted_films(bench, tmp_path):
    out = tmp_path / "bench"
    report = bench.main(["--n", "14", "--out", str(out), *SMALL, "--steps", "layout", "prepare", "cache"])
    assert [row["step"] for row in report["steps"]] == ["layout", "prepare", "cache-w1", "cache-w2"]
    assert report["planted_rejected"] == {"corrupt": True, "truncated": True}
    root = out / "mimic-cxr-jpg"
    films = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    assert len(films) == 14
    assert all(re.fullmatch(r"files/p1\d/p1\d{7}/s5\d{7}/[0-9a-f]{8}(-[0-9a-f]{8}){4}\.jpg", f) for f in films)
    with gzip.open(root / "mimic-cxr-2.0.0-metadata.csv.gz", "rt") as f:
        meta = pd.read_csv(f, dtype=str)
    assert len(meta) == 14 and meta["study_id"].nunique() == 7 and meta["subject_id"].nunique() == 3
    reports = list(root.glob("files/p1*/p1*/s5*.txt"))
    assert len(reports) == 7 and "FINDINGS:" in reports[0].read_text()
    results = {row["step"]: row["result"] for row in report["steps"]}
    assert results["prepare"] == {"rows": 12, "rejected": 2}
    assert results["cache-w2"] == {"workers": 2, "shape": [12, 64, 64]}
    assert "| cache-w2 |" in (out / "mimic_scale.md").read_text()


@pytest.mark.integration
def test_every_step_runs_at_forty_films(bench, tmp_path):
    out = tmp_path / "bench"
    argv = ["--n", "40", "--out", str(out), *SMALL, "--generator-steps", "2"]
    report = bench.main([*argv, "--synthesize-n", "4", "--synthesize-steps", "1"])
    results = {row["step"]: row["result"] for row in report["steps"]}
    assert list(results) == [
        "layout",
        "prepare",
        "cache-w1",
        "cache-w2",
        "latent-store",
        "latent-store-again",
        "lnfs",
        "generator",
        "synthesize",
        "classifier-loading",
    ]
    assert report["planted_rejected"] == {"corrupt": True, "truncated": True}
    assert (results["latent-store"]["encoded"], results["latent-store-again"]["encoded"]) == (38, 0)
    assert results["lnfs"]["images"] == 38 and results["generator"]["steps"] == 2
    assert results["classifier-loading"]["images"] == results["generator"]["train_images"]
    assert all(row["seconds"] >= 0 and row["peak_rss_mib"] > 0 for row in report["steps"])
