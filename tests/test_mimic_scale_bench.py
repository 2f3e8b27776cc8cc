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


def _bench_script(monkeypatch, name: str):
    """A ``bench/`` script as a module; by name from ``bench/`` on the path, so that its spawned workers import it
    too."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    return importlib.import_module(name)


@pytest.fixture
def bench(monkeypatch):
    return _bench_script(monkeypatch, "mimic_scale")


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

    # Rerunning one step replaces its row and keeps the others (and the planted check) from the first record.
    again = bench.main(
        ["--n", "14", "--out", str(out), *SMALL[:-4], "--cache-workers", "2", "--in-process", "--steps", "cache"]
    )
    assert [row["step"] for row in again["steps"]] == ["layout", "prepare", "cache-w1", "cache-w2"]
    first = {row["step"]: row for row in report["steps"]}
    assert again["steps"][0] == first["layout"] and again["steps"][2] == first["cache-w1"]
    assert again["steps"][3]["seconds"] != first["cache-w2"]["seconds"]
    assert again["planted_rejected"] == {"corrupt": True, "truncated": True}


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


def _run_record(folder, n, cache_speedup=2.0):
    """A ``mimic_scale.json`` whose every step takes 5 s plus 10 ms a film (the cache's 2-worker build
    ``cache_speedup`` times faster than its 1-worker one) and holds memory flat."""
    import json

    steps = []
    for step in ["layout", "prepare", "cache-w1", "cache-w2", "latent-store", "lnfs", "generator", "synthesize"]:
        seconds = 5 + 0.01 * n
        if step == "cache-w2":
            seconds /= cache_speedup
        if step in ("generator", "synthesize"):
            seconds = 30.0
        steps.append({"step": step, "seconds": seconds, "peak_rss_mib": 900.0, "peak_anon_mib": 500.0})
    folder.mkdir(parents=True)
    record = {"n": n, "machine": {"cpus": 2}, "date": "2026-12-08 03:00", "steps": steps}
    (folder / "mimic_scale.json").write_text(json.dumps(record))
    return folder


@pytest.fixture
def growth_script(monkeypatch):
    return _bench_script(monkeypatch, "mimic_scale_growth")


def test_growth_fits_each_step_and_projects_the_target(growth_script, tmp_path):
    folders = [_run_record(tmp_path / str(n), n) for n in (10_000, 30_000, 100_000)]
    folders[0] = folders[0] / "mimic_scale.json"  # a run's JSON is read as well as its folder
    result = growth_script.main([*map(str, folders), "--target", "400000", "--out", str(tmp_path / "growth.md")])
    steps = result["steps"]
    a, b = steps["latent-store"]["fit"]
    assert a == pytest.approx(5) and b == pytest.approx(0.01)
    # 5 s of fixed cost over 10k films against 100k films: time per film 1.05 -> 1.005 s / 1,000 films.
    assert steps["latent-store"]["time_ratio"] == pytest.approx(10.05 / 10.5)
    assert steps["generator"]["time_ratio"] == pytest.approx(1.0)  # fixed work: seconds, not seconds a film
    assert steps["lnfs"]["anon_ratio"] == pytest.approx(1.0)
    assert steps["latent-store"]["estimate_s"] == pytest.approx(4005)
    # The layout, and the cache build the later steps do not read, stay out of the total on this machine.
    assert steps["layout"]["estimate_s"] is None and steps["cache-w1"]["estimate_s"] is None
    assert result["total_s"] == pytest.approx(4005 * 3 + 4005 / 2 + 2 * 30)
    # A 2x cache speedup from 1 to 2 workers is a parallel share of 1: 16 cores build the cache 16x faster than
    # one, the steps that ran on both cores here 8x faster; LNFS and the fixed work stay as measured.
    assert result["parallel_share"] == pytest.approx(1.0)
    assert steps["cache-w1"]["estimate_cores_s"] == pytest.approx(4005 / 16)
    assert steps["latent-store"]["estimate_cores_s"] == pytest.approx(4005 / 8)
    assert steps["lnfs"]["estimate_cores_s"] == pytest.approx(4005)
    assert "**" in (tmp_path / "growth.md").read_text()


def test_growth_needs_two_sizes(growth_script, tmp_path):
    folder = _run_record(tmp_path / "one", 10_000)
    with pytest.raises(SystemExit, match="two or more different N"):
        growth_script.main([str(folder)])
