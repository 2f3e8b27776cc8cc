"""recipes/real-public.yaml, every step through `diffcxr-aug run`, on real pixels: the ten ieee8023 films of
tests/fixtures/ieee8023 (CC BY / CC BY-SA, their notes as the collection wrote them).

The shipped recipe is loaded as it is; only sizes, steps, counts, the splits and the seed are overridden (seed 36
with shares 0.5 / 0.25 / 0.25 puts the fixture's seven patients in all three splits, both COVID-19 classes in the test
split, so the held-out set has reports to draw from and the classifiers a label to score), and LNFS is
off: it needs at least 20 films (it runs on real films in tests/test_noise_filter.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from diffcxr_aug.cli import app
from diffcxr_aug.config import load_recipe
from diffcxr_aug.data.manifest import read_manifest
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "ieee8023"
RECIPE = REPO_ROOT / "recipes" / "real-public.yaml"


def test_shipped_recipe_reads_the_collection_the_issue_names():
    recipe = load_recipe(RECIPE)
    assert recipe.data.dataset == "ieee8023" and recipe.data.root is not None
    assert recipe.filter.drop_views == ["LATERAL"] and recipe.filter.drop_modalities == ["CT"]
    assert recipe.generator.report_source == "report" and recipe.synthesize.held_out
    assert recipe.classifier.samples_per_epoch == "matched" and len(recipe.classifier.seeds) == 3


@pytest.mark.integration
def test_real_public_recipe_runs_every_step_on_real_films(tmp_path: Path):
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"data.root={FIXTURE}",
        "seed=36",
        "data.split_fractions=[0.5,0.25,0.25]",
        "data.size=32",
        "vae.size=32",
        "vae.crop_size=16",
        "vae.steps=2",
        "vae.batch_size=4",
        "filter.enabled=false",  # LNFS needs 20 films; it runs on real films in test_noise_filter.py
        "generator.config=tiny",
        "generator.compile=false",
        "generator.max_steps=2",
        "generator.batch_size=4",
        "generator.checkpoint_every=2",
        "generator.sample_every=2",
        "generator.log_every=1",
        "generator.num_validation_reports=2",
        "generator.validation_steps=2",
        "synthesize.n=4",
        "synthesize.held_out=3",
        "synthesize.steps=2",
        "synthesize.batch_size=4",
        "classifier.seeds=[0]",
        "classifier.epochs=1",
        "classifier.batch_size=4",
        "classifier.num_workers=0",
        "classifier.workers=1",
        "classifier.n_bootstrap=10",
        "classifier.min_label_support=1",
        "evaluate.epochs=1",
    ]
    args = ["run", str(RECIPE)] + [item for text in overrides for item in ("--set", text)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "run"

    data = read_manifest(out / "data")
    assert data.frame["split"].value_counts().to_dict() == {"train": 5, "val": 2, "test": 3}
    assert (data.frame["report"].str.strip() != "").sum() == 7  # the notes are the reports (3 films have none)

    # The classifiers' images come from train-split notes; the held-out set from the test split's, which the
    # generator never trained on, and evaluate judges that set.
    train_reports = set(data.split("train").frame["report"])
    test_reports = set(data.split("test").frame["report"])
    synthetic = read_manifest(out / "synthetic").frame
    held_out = read_manifest(out / "synthetic-held-out").frame
    assert len(synthetic) == 4 and set(synthetic["prompt"]) <= train_reports
    assert len(held_out) == 3 and set(held_out["prompt"]) <= test_reports
    assert json.loads((out / "synthetic-held-out" / "synthesis.json").read_text())["prompt_split"] == "test"
    evaluation = json.loads((out / "evaluation" / "report.json").read_text())
    assert list(evaluation["synthetic"]) == ["held-out"] and evaluation["synthetic"]["held-out"]["n_images"] == 3

    results = pd.read_csv(out / "classifiers" / "results.csv")
    # synthetic-only uses no real film, so it runs once, at real fraction 0
    assert set(zip(results["real_frac"], results["mode"], strict=True)) == {
        (f, m) for f in (0.2, 1.0) for m in ("real", "mix")
    } | {(0.0, "synthetic-only")}
    assert (out / "report.md").is_file()


def test_the_montage_shows_only_films_anyone_may_reuse():
    import importlib.util

    path = REPO_ROOT / "bench" / "real_public_montage.py"
    spec = importlib.util.spec_from_file_location("real_public_montage", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for licence in ("CC BY", "CC BY 4.0", "CC BY-SA 4.0", "CC BY 3.0", "Apache 2.0"):
        assert module.reusable(licence), licence
    for licence in ("CC BY-NC-SA", "CC BY-NC-ND 4.0", "CC BY-ND", "", None, "listed as authorized for everyone"):
        assert not module.reusable(licence), licence
