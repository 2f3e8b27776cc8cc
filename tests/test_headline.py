"""The headline experiment's parts: scoring against the phantom world's truth, labels with too few of a class left
out, the synthetic-only mode, and the headline (recipes/augment-phantom128.yaml) and DKIM
(recipes/dkim-phantom128.yaml) recipes run through the CLI at smoke size."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from diffcxr_aug.augment.mixing import training_stages
from diffcxr_aug.augment.results import scored_view
from diffcxr_aug.augment.sweep import _check_same_settings
from diffcxr_aug.augment.sweep_data import split_truth
from diffcxr_aug.classifiers.metrics import mask_thin_labels
from diffcxr_aug.classifiers.train import TrainResult
from diffcxr_aug.cli import app
from diffcxr_aug.config import ClassifierSection, load_recipe
from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.data.phantom import prepare_phantom
from diffcxr_aug.data.phantom.findings import findings_in, truth_labels
from diffcxr_aug.errors import InputError

runner = CliRunner()


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    return prepare_phantom(tmp_path_factory.mktemp("phantom"), n=60, size=64, seed=0, progress=False, workers=1)


def test_truth_labels_follow_the_worlds_definitions():
    assert findings_in("") == set()
    assert findings_in("pneumonia:0.50:left:lower;support_devices:0.30:ett") == {"pneumonia", "support_devices"}
    labels = truth_labels({"pneumonia", "support_devices"})
    assert len(labels) == 14 and set(labels.values()) == {0, 1}
    assert labels["Pneumonia"] == labels["Lung Opacity"] == labels["Support Devices"] == 1
    assert labels["No Finding"] == labels["Consolidation"] == 0
    normal = truth_labels({"support_devices"})
    assert normal["No Finding"] == 1 and normal["Lung Opacity"] == 0
    with pytest.raises(ValueError, match="unknown finding"):
        findings_in("dragon:0.5")


def test_truth_matches_every_label_the_report_states(phantom_data):
    """Where a phantom report states a label (1 or 0), the truth agrees, and the truth knows every cell."""
    manifest = read_manifest(phantom_data)
    truth = split_truth(manifest, manifest.label_names)
    stated = manifest.labels(manifest.label_names)
    assert truth.shape == stated.shape and not np.isnan(truth).any()
    known = (stated == 0) | (stated == 1)
    assert known.sum() > 0 and (truth[known] == stated[known]).all()
    # The reports leave many cells unknown that the truth fills in.
    assert known.mean() < 0.9


def test_truth_from_a_bad_row_names_the_file_and_row(phantom_data, tmp_path):
    manifest = read_manifest(phantom_data)
    bad = manifest.subset(manifest.frame.index)
    bad.frame.loc[bad.frame.index[3], "meta_findings"] = "dragon:0.5"
    with pytest.raises(InputError, match=r"row 5, meta_findings: unknown finding"):
        split_truth(bad, manifest.label_names)


def test_labels_with_too_few_of_a_class_are_not_scored():
    y = np.array([[1, 1, 0], [0, 1, 0], [0, 0, np.nan], [1, 0, 1]], dtype=float)
    masked = mask_thin_labels(y, 2)
    assert not np.isnan(masked[:, :2]).any() and np.isnan(masked[:, 2]).all()
    assert np.array_equal(mask_thin_labels(y, 1), y, equal_nan=True)


def test_synthetic_only_trains_one_shared_stage_pretrain_finetune_also_starts_with(phantom_data):
    manifest = read_manifest(phantom_data)
    synthetic = manifest.split("train")
    empty = synthetic.subset(synthetic.frame.index[:0])
    (only,) = training_stages("synthetic-only", empty, synthetic)
    first, _ = training_stages("pretrain-finetune", synthetic, synthetic)
    assert only.shared and (only.name, len(only.manifests)) == (first.name, len(first.manifests))
    with pytest.raises(InputError, match="needs synthetic images"):
        training_stages("synthetic-only", empty, None)


def test_a_result_is_read_back_from_its_history(tmp_path):
    history = [
        {"epoch": 0, "train_loss": None, "val_mauc": 0.5, "lr": None, "step": 0},
        {"epoch": 1, "train_loss": 0.7, "val_mauc": 0.62, "lr": 1e-3, "step": 32},
        {"epoch": 2, "train_loss": 0.6, "val_mauc": 0.62, "lr": 1e-4, "step": 64},
    ]
    (tmp_path / "history.json").write_text(json.dumps(history))
    result = TrainResult.from_history(tmp_path / "history.json")
    assert (result.best_val_mauc, result.best_epoch, result.epochs_run, result.steps) == (0.62, 1, 2, 64)


def test_the_truth_view_replaces_the_scores_and_keeps_the_reports():
    results = pd.DataFrame(
        {
            "mauc": [0.6],
            "auc_A": [0.6],
            "mauc_ci_low": [0.5],
            "mauc_ci_high": [0.7],
            "n_labels_scored": [1],
            "mauc_truth": [0.8],
            "mauc_truth_ci_low": [0.75],
            "mauc_truth_ci_high": [0.85],
            "n_labels_truth": [1],
            "auc_truth_A": [0.8],
        }
    )
    view = scored_view(results, "truth")
    assert (view["mauc"].item(), view["auc_A"].item(), view["mauc_ci_low"].item()) == (0.8, 0.8, 0.75)
    assert view["mauc_report"].item() == 0.6 and not any(c.startswith("auc_truth") for c in view.columns)
    assert scored_view(results, "report") is results
    with pytest.raises(InputError, match="no scores against the truth"):
        scored_view(results[["mauc", "auc_A"]], "truth")


def test_a_sweep_folder_from_before_a_new_setting_still_resumes(tmp_path):
    """A key added to the classifier section after a sweep ran, at its default, is how that sweep ran."""
    new = ClassifierSection().model_dump(mode="json")
    old = {k: v for k, v in new.items() if k not in ("min_label_support", "metric")}
    settings = {"data": "D", "data_config": {}, "synthetic": {}, "classifier": new, "precision": "no"}
    (tmp_path / "sweep.json").write_text(json.dumps({**settings, "classifier": old}))
    _check_same_settings(tmp_path / "sweep.json", settings)
    # Sweeps from before the classifiers trained under autocast ran in fp32: a bf16 run would not compare.
    with pytest.raises(InputError, match=r"precision \(no -> bf16\)"):
        _check_same_settings(tmp_path / "sweep.json", {**settings, "precision": "bf16"})
    changed = {**settings, "classifier": {**new, "min_label_support": 20}}
    with pytest.raises(InputError, match="classifier.min_label_support"):
        _check_same_settings(tmp_path / "sweep.json", changed)


def _smoke_overrides(recipes_dir) -> list[str]:
    """--set pairs that shrink the headline recipe's world, VAE, generator and sampler to the smoke recipe's."""
    smoke = yaml.safe_load((recipes_dir / "smoke.yaml").read_text())
    pairs = ["--set", f"vae={json.dumps(smoke['vae'])}"]  # the whole section: the smoke's VAE, at its size
    for section in ("data", "generator", "synthesize"):
        for key, value in smoke[section].items():
            pairs += ["--set", f"{section}.{key}={json.dumps(value)}"]
    return pairs


SETS = {"generated": "synthetic", "dkim": "synthetic-dkim", "dkim-balanced": "synthetic-dkim-balanced"}


def _run_at_smoke_size(recipe_path, out, recipes_dir, steps: str, classifier: dict, extra=()) -> pd.DataFrame:
    # Compiling is tested on its own (test_stage2); here it would only add minutes.
    args = ["run", str(recipe_path), "--set", f"output_dir={out}", "--set", f"steps={steps}"]
    args += ["--set", "generator.compile=false"]
    args += _smoke_overrides(recipes_dir) + list(extra)
    for key, value in classifier.items():
        args += ["--set", f"classifier.{key}={value}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return pd.read_csv(out / "classifiers" / "results.csv")


TINY_SWEEP = {
    "n_synthetic": "8",
    "epochs": "1",
    "patience": "1",
    "samples_per_epoch": "16",
    "batch_size": "8",
    "min_label_support": "2",
}


@pytest.mark.integration
def test_the_headline_recipe_runs_every_generator_classifier_fraction_mode_and_seed(tmp_path, recipes_dir):
    """#38: three generator trainings x two classifiers x fractions x modes x classifier seeds, every row in
    results.csv (generator_seed names the generator, model the classifier), and the headline tables from it."""
    from diffcxr_aug.augment.results import read_results
    from diffcxr_aug.augment.summary import headline_markdown

    recipe = load_recipe(recipes_dir / "augment-phantom128.yaml")
    c = recipe.classifier
    assert recipe.generator.seeds == [0, 1, 2] and not recipe.generator.dkim
    assert c.model == ["test_resnet", "resnet18"] and c.real_fracs == [0.01, 1.0]
    assert set(c.modes) == {"real", "mix", "synthetic-only"} and set(c.synthetic) == {"generated", "ceiling"}
    assert (c.metric, c.min_label_support, len(c.seeds)) == ("truth", 20, 3)
    assert c.patience >= c.epochs and isinstance(c.samples_per_epoch, int)  # every run takes the same steps
    assert recipe.synthesize.n >= 0.7 * recipe.data.n  # at least the real train split

    out = tmp_path / "headline"
    results = _run_at_smoke_size(
        recipes_dir / "augment-phantom128.yaml",
        out,
        recipes_dir,
        "[prepare,train-generator,synthesize,train-classifier]",
        {**TINY_SWEEP, "model": "[test_resnet,resnet10t]", "real_fracs": "[0.5,1.0]", "seeds": "[0,1]"},
        ["--set", "generator.dkim=false", "--set", "generator.seeds=[0,1]"],
    )
    generator = [None if pd.isna(g) else int(g) for g in results["generator_seed"]]
    columns = [results[c] for c in ("model", "real_frac", "mode", "source")]
    runs = set(zip(*columns, generator, results["seed"], strict=True))
    sets = [("generated", 0), ("generated", 1), ("ceiling", None)]
    expected = set()
    for m in ("test_resnet", "resnet10t"):
        for s in (0, 1):
            expected |= {(m, f, "real", "none", None, s) for f in (0.5, 1.0)}
            expected |= {(m, f, "mix", src, g, s) for f in (0.5, 1.0) for src, g in sets}
            expected |= {(m, 0.0, "synthetic-only", src, g, s) for src, g in sets}
    assert runs == expected and len(results) == len(expected) == 44
    # The generators' sets: the same prompts and the same noise, from two different models.
    frames = [read_manifest(out / f"synthetic-seed{g}").frame for g in (0, 1)]
    for column in ("prompt", "seed"):
        assert frames[0][column].tolist() == frames[1][column].tolist()
    assert frames[0]["meta_generator"].iloc[0] != frames[1]["meta_generator"].iloc[0]
    assert (out / "classifiers" / "runs" / "resnet10t").is_dir()  # a folder of runs per model
    tables = headline_markdown(scored_view(read_results(out / "classifiers" / "results.csv"), "truth"))
    assert "| classifier |" in tables and "generators ±" in tables
    assert tables.strip() in (out / "classifiers" / "summary.md").read_text()
    # The run report describes each generator's image set (there is no plain synthetic/ folder here).
    report = (out / "report.md").read_text().split("## Generated images")[1].split("\n## ")[0]
    assert "did not run" not in report
    for g in (0, 1):
        assert f"`synthetic-seed{g}/`: " in report and f"](synthetic-seed{g}/preview.png)" in report


@pytest.mark.integration
def test_the_dkim_recipe_samples_stage_1_and_2_from_the_same_prompts(tmp_path, recipes_dir):
    """The DKIM experiment (recipes/dkim-phantom128.yaml): stage 1 and stage 2 image for image, and stage 2 with
    balanced prompts, each a source of the classifier sweep."""
    recipe = load_recipe(recipes_dir / "dkim-phantom128.yaml")
    assert set(recipe.classifier.synthetic) == {"generated", "dkim", "dkim-balanced", "ceiling"}
    assert recipe.generator.dkim and recipe.synthesize.balance
    out = tmp_path / "dkim"
    results = _run_at_smoke_size(
        recipes_dir / "dkim-phantom128.yaml",
        out,
        recipes_dir,
        "[prepare,train-generator,synthesize,train-classifier]",
        {**TINY_SWEEP, "real_fracs": "[1.0]", "seeds": "[0]", "modes": "[real,mix,synthetic-only]"},
    )
    sources = ("generated", "dkim", "dkim-balanced", "ceiling")
    assert set(zip(results["mode"], results["source"], strict=True)) == {("real", "none")} | {
        (m, src) for m in ("mix", "synthetic-only") for src in sources
    }
    sets = {name: read_manifest(out / folder).frame for name, folder in SETS.items()}
    assert sets["generated"]["meta_generator"].nunique() == 1 and "meta_dkim_scale" not in sets["generated"]
    assert sets["dkim"]["meta_dkim_scale"].notna().all()
    for column in ("prompt", "seed"):
        assert sets["generated"][column].tolist() == sets["dkim"][column].tolist()
    jobs = {name: json.loads((out / folder / "synthesis.json").read_text()) for name, folder in SETS.items()}
    assert [jobs[name]["balance"] for name in SETS] == [None, None, 0.2]
    assert (results.loc[results["mode"] == "synthetic-only", "n_real"] == 0).all()
    assert results["mauc_truth"].between(0, 1).all() and (results["n_labels_truth"] >= 1).all()
    # The truth knows labels the reports leave open: more labels are scored against it.
    assert (results["n_labels_truth"] >= results["n_labels_scored"]).all()
    summary = (out / "classifiers" / "summary.md").read_text()
    assert "scored against the world's truth" in summary and "| 0 | synthetic-only | ceiling |" in summary
    report = (out / "report.md").read_text()
    assert "scored against the phantom world's truth" in report


def test_dkim_sources_need_a_stage_2_and_a_balance(recipes_dir, tmp_path):
    from diffcxr_aug.augment.layout import sampled_sets

    path = recipes_dir / "dkim-phantom128.yaml"
    sets = sampled_sets(load_recipe(path))
    assert {name: (s.generator, s.out, s.balance) for name, s in sets.items()} == {
        "generated": ("generator", "synthetic", None),
        "dkim": ("generator-dkim", "synthetic-dkim", None),
        "dkim-balanced": ("generator-dkim", "synthetic-dkim-balanced", 0.2),
    }
    # Without a DKIM source the one set is the final generator's, balanced as synthesize.balance says.
    (only,) = sampled_sets(load_recipe(path, ["classifier.synthetic=[generated, ceiling]"])).values()
    assert (only.generator, only.balance) == ("generator-dkim", 0.2)
    with pytest.raises(InputError, match="trains no stage 2: set generator.dkim: true"):
        sampled_sets(load_recipe(path, ["generator.dkim=false"]))
    with pytest.raises(InputError, match="dkim-balanced but synthesize.balance is not set"):
        sampled_sets(load_recipe(path, ["synthesize.balance=null"]))
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", str(path), "--set", f"output_dir={out}", "--set", "generator.dkim=false"])
    assert result.exit_code == 2 and "generator.dkim: true" in result.output
    assert not out.exists()  # refused before anything was written
