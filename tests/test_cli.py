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
