from __future__ import annotations

from typing import get_args

import pandas as pd
import pytest
from typer.testing import CliRunner

from diffcxr_aug.cli import app
from diffcxr_aug.cli import options as cli_options
from diffcxr_aug.config import RecipeError
from diffcxr_aug.data.cache import cache_files
from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.manifest import ManifestError, read_manifest
from diffcxr_aug.data.tables import DatasetLayoutError
from diffcxr_aug.errors import ImageReadError, InputError, MissingInputError, OutputInUseError
from diffcxr_aug.types import ClassifierMode, DatasetName

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
    assert result.exit_code == 2 and "--real-frac [0.0]: real fractions must lie in (0, 1]" in result.output
    result = runner.invoke(app, base + ["--mode", "pretrain-finetune"])  # without --synthetic: refused, not dropped
    assert result.exit_code == 2 and "--mode pretrain-finetune needs --synthetic" in result.output


def test_choices_in_help_come_from_the_config_literals():
    help_text = " ".join(runner.invoke(app, ["train-classifier", "--help"]).output.split())
    assert "mix | pretrain-finetune" in help_text and "real |" not in help_text
    assert cli_options.SYNTHETIC_MODES == tuple(m for m in get_args(ClassifierMode) if m != "real")
    # rich wraps the help in a box: its borders are not words
    help_text = " ".join(runner.invoke(app, ["prepare", "--help"]).output.replace("│", " ").split())
    assert ", ".join(get_args(DatasetName)) in help_text


def test_project_errors_are_input_errors_and_keep_their_builtin_bases():
    for error in (RecipeError, ManifestError, ImageReadError, DatasetLayoutError, MissingInputError):
        assert issubclass(error, InputError) and issubclass(error, ValueError)
    assert issubclass(MissingInputError, FileNotFoundError) and issubclass(OutputInUseError, FileExistsError)


@pytest.mark.parametrize("error", [ValueError("a bug"), KeyError("column"), FileNotFoundError("internal file")])
def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, error):
    """Only InputError means bad input; any other exception from the library is a bug and is not hidden."""
    import diffcxr_aug.augment.layout

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(diffcxr_aug.augment.layout, "prepare_data", broken)
    result = runner.invoke(app, ["prepare", "phantom", "--out", str(tmp_path)])
    assert result.exit_code == 1 and result.exception is error


def test_an_input_error_is_one_line(tmp_path, monkeypatch):
    import diffcxr_aug.augment.layout

    def bad_input(*args, **kwargs):
        raise MissingInputError(f"{tmp_path}/nowhere.csv: no such file")

    monkeypatch.setattr(diffcxr_aug.augment.layout, "prepare_data", bad_input)
    result = runner.invoke(app, ["prepare", "phantom", "--out", str(tmp_path)])
    assert result.exit_code == 2 and result.output == f"Error: {tmp_path}/nowhere.csv: no such file\n"


def test_device_is_checked_before_work(tmp_path):
    result = runner.invoke(app, ["filter", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "gpu"])
    assert result.exit_code == 2 and "Unknown device 'gpu'; choose one of: auto, cpu, cuda, cuda:N" in result.output


def test_prepare_takes_its_defaults_from_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 3\ndata:\n  dataset: phantom\n  n: 12\n  size: 32\n")
    result = runner.invoke(app, ["prepare", "--out", str(tmp_path / "data"), "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "data")
    assert len(manifest) == 12 and cache_files(manifest, 32)[0].is_file()
    result = runner.invoke(app, ["prepare", "--out", str(tmp_path / "d2"), "--recipe", str(recipe), "--n", "10"])
    assert result.exit_code == 0 and len(read_manifest(tmp_path / "d2")) == 10  # the option wins over the recipe
    result = runner.invoke(app, ["prepare", "--out", str(tmp_path / "d3"), "--recipe", str(recipe), "--size", "8"])
    assert result.exit_code == 2 and "--size 8: Input should be greater than or equal to 32" in result.output


def test_label_takes_its_columns_from_the_recipe(tmp_path):
    reports = tmp_path / "reports.csv"
    pd.DataFrame({"rid": ["a", "b"], "text": ["The heart is enlarged.", "No pneumothorax."]}).to_csv(reports)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("label:\n  text_col: text\n  id_col: rid\n")
    out = tmp_path / "labels.csv"
    result = runner.invoke(app, ["label", "--reports", str(reports), "--out", str(out), "--recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    labels = pd.read_csv(out)
    assert list(labels.columns) == ["rid", *CHEXPERT_LABELS] and labels["Cardiomegaly"].tolist()[0] == 1


def test_evaluate_takes_the_reference_classifier_from_the_recipe(tmp_path, tiny_manifest):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("evaluate:\n  model: resnet-9000\n")
    folder = str(tiny_manifest.parent)
    args = ["evaluate", "--real", folder, "--synthetic", folder, "--out", str(tmp_path / "e"), "--recipe", str(recipe)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Unknown timm model 'resnet-9000'" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["prepare", "phantom", "--n", "0"], "--n 0: Input should be greater than or equal to 1"),
        (["prepare", "phantom", "--size", "31"], "--size 31: Input should be greater than or equal to 32"),
        (["train-generator", "--data", "d", "--max-steps", "0"], "--max-steps 0: Input should be greater than or"),
        (["train-generator", "--data", "d", "--batch-size", "0"], "--batch-size 0: Input should be greater than or"),
        (["train-generator", "--data", "d", "--num-tokens", "0"], "--num-tokens 0: Input should be greater than or"),
        (["train-generator", "--data", "d", "--time-limit-minutes", "0"], "--time-limit-minutes 0.0: Input should be"),
        (["synthesize", "--generator", "g", "--n", "0"], "--n 0: Input should be greater than or equal to 1"),
        (["synthesize", "--generator", "g", "--n", "1", "--steps", "0"], "--steps 0: Input should be greater than"),
        (["synthesize", "--generator", "g", "--n", "1", "--guidance", "-1"], "--guidance -1.0: Input should be"),
        (["train-classifier", "--data", "d", "--real-frac", "1", "--batch-size", "1"], "--batch-size 1: Input should"),
        (["train-classifier", "--data", "d", "--real-frac", "1", "--epochs", "0"], "--epochs 0: Input should be"),
        (["train-classifier", "--data", "d", "--real-frac", "1.5"], "--real-frac [1.5]: real fractions must lie in"),
        (["evaluate", "--real", "r", "--synthetic", "s", "--size", "8"], "--size 8: Input should be greater than or"),
        (["evaluate", "--real", "r", "--synthetic", "s", "--epochs", "0"], "--epochs 0: Input should be greater than"),
    ],
)
def test_numeric_options_out_of_range_name_the_range_before_work(tmp_path, args, message):
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_the_smallest_phantom_prepares(tmp_path):
    result = runner.invoke(app, ["prepare", "phantom", "--n", "1", "--size", "32", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert len(read_manifest(tmp_path)) == 1


def test_run_refuses_to_start_under_several_processes(recipes_dir, monkeypatch):
    """Under torchrun / accelerate launch every process would run every step into the same folder: one line says
    which commands to launch on several GPUs instead."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    result = runner.invoke(app, ["run", str(recipes_dir / "smoke.yaml")])
    assert result.exit_code == 2 and "launch train-generator and synthesize" in result.output
    assert len(result.output.strip().splitlines()) == 1
