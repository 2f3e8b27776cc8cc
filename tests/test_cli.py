from __future__ import annotations

import pytest
from typer.testing import CliRunner

from diffcxr_aug.cli import app

COMMANDS = ["prepare", "label", "filter", "train-generator", "synthesize", "train-classifier", "evaluate", "run"]

runner = CliRunner()


def test_help_lists_every_contract_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert "diffcxr-aug" in result.output


def test_run_with_misspelled_recipe_key_fails_with_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("classifier:\n  epoch: 3\n")
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 2
    assert "unknown key 'classifier.epoch'" in result.output
    assert "epochs" in result.output
    assert "Traceback" not in result.output


def test_run_with_bad_override(tmp_path, recipes_dir):
    result = runner.invoke(app, ["run", str(recipes_dir / "smoke.yaml"), "--set", "generator.max_steps=-1"])
    assert result.exit_code == 2
    assert "generator.max_steps" in result.output


def test_prepare_validates_before_work(tmp_path):
    result = runner.invoke(app, ["prepare", "imagenet", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown dataset 'imagenet'" in result.output
    result = runner.invoke(app, ["prepare", "mimic-cxr", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "needs --root" in result.output
    result = runner.invoke(app, ["prepare", "csv", "--out", str(tmp_path), "--root", str(tmp_path)])
    assert result.exit_code == 2 and "--label-cols" in result.output


def test_train_classifier_validates_mode_and_seeds(tmp_path):
    base = ["train-classifier", "--data", str(tmp_path), "--real-frac", "0.1", "--out", str(tmp_path / "o")]
    result = runner.invoke(app, base + ["--mode", "blend"])
    assert result.exit_code == 2 and "unknown --mode 'blend'" in result.output
    result = runner.invoke(app, base + ["--seeds", "a,b"])
    assert result.exit_code == 2 and "--seeds" in result.output
    result = runner.invoke(app, base + ["--real-frac", "0"])
    assert result.exit_code == 2 and "greater than 0" in result.output


@pytest.mark.usefixtures("one_thread")
def test_smoke_recipe_runs_every_step_of_the_loop(tmp_path, recipes_dir):
    """`run recipes/smoke.yaml`: prepare, filter, train-generator, synthesize, train-classifier, evaluate."""
    import json

    import pandas as pd

    out = tmp_path / "smoke"
    result = runner.invoke(app, ["run", str(recipes_dir / "smoke.yaml"), "--set", f"output_dir={out}"])
    assert result.exit_code == 0, result.output
    assert (out / "recipe.resolved.yaml").is_file()
    data = pd.read_csv(out / "data" / "manifest.csv")
    scores = pd.read_csv(out / "filtered" / "scores.csv")
    kept = pd.read_csv(out / "filtered" / "manifest.csv")
    assert len(scores) == len(data) == 120 and len(kept) == len(data) - scores["flagged"].sum() < len(data)
    info = json.loads((out / "generator" / "training_info.json").read_text())
    # generator.use_filtered (default true): stage 1 trains on the manifest the filter kept.
    assert info["steps"] == 4 and info["data"] == str(out / "filtered" / "manifest.csv")
    assert len(pd.read_csv(out / "synthetic" / "manifest.csv")) == 8
    results = pd.read_csv(out / "classifiers" / "results.csv")
    assert set(results["mode"]) == {"real", "mix"} and results["mauc"].between(0, 1).all()
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert report["synthetic"]["synthetic"]["n_images"] == 8
    assert report["synthetic"]["synthetic"]["compute"]["generator"]["training_steps"] == 4
