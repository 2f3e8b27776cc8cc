"""Ablation recipes: arms run as their own recipes on the shared data and VAE, one joint evaluation, one table."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from typer.testing import CliRunner

from diffcxr_aug.augment.ablation import arm_recipe
from diffcxr_aug.cli import app
from diffcxr_aug.config import RecipeError, load_recipe

runner = CliRunner()


def _tiny_ablation(recipes_dir, tmp_path, arms: dict, run: list[str] | None) -> tuple:
    """The smoke recipe's sizes with an ablation section (and the shipped ablation recipe's classifier design)."""
    smoke = yaml.safe_load((recipes_dir / "smoke.yaml").read_text())
    smoke["output_dir"] = str(tmp_path / "abl")
    smoke["classifier"] = {"model": "resnet10t", "synthetic": "generated", "real_fracs": [0.5], "modes": ["mix"]}
    smoke["classifier"] |= {"seeds": [0, 1], "epochs": 1, "batch_size": 16}
    smoke["ablation"] = {"baseline": "full", "arms": arms, "run": run, "records": str(tmp_path / "records")}
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(smoke, sort_keys=False))
    return path, tmp_path / "abl"


@pytest.mark.integration
def test_ablation_runs_arms_evaluates_them_together_and_tables_them(recipes_dir, tmp_path):
    arms = {
        "full": {},
        "no-dkim": {"generator.dkim": False},
        "k4": {"generator.num_tokens": 4, "filter.enabled": False},  # an arm that skips a step of its list
        "no-ava-tls": {"generator.ava_tls": False},
    }
    path, out = _tiny_ablation(recipes_dir, tmp_path, arms, run=["full", "no-dkim", "k4"])
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == f"report: {out / 'ablation.md'}"
    # The data and the VAE are made once; each arm links to them.
    assert (out / "data" / "manifest.csv").is_file() and (out / "vae" / "metrics.json").is_file()
    for arm in ("full", "k4"):
        assert os.readlink(out / "arms" / arm / "data") == "../../data"
        info = json.loads((out / "arms" / arm / "generator" / "training_info.json").read_text())
        assert info["vae"]["vae"] == str(out / "vae") and info["steps"] == 4
        assert not (out / "arms" / arm / "vae").exists()  # no arm trains a VAE of its own
    k4 = json.loads((out / "arms" / "k4" / "generator" / "training_info.json").read_text())
    assert k4["config"]["num_tokens"] == 4
    # no-dkim trains nothing: it samples the full arm's own stage-1 model.
    assert os.readlink(out / "arms" / "no-dkim" / "generator") == "../full/generator"
    assert not (out / "arms" / "no-dkim" / "generator-dkim").exists()
    assert set(json.loads((out / "arms" / "no-dkim" / "steps.json").read_text())) == {"synthesize", "train-classifier"}
    assert not (out / "arms" / "no-ava-tls").exists()  # not asked for

    table = json.loads((out / "ablation.json").read_text())
    rows = {row["arm"]: row for row in table["arms"]}
    assert [row["arm"] for row in table["arms"]] == ["full", "no-dkim", "k4", "no-ava-tls"]
    assert rows["no-ava-tls"]["run"] is False and all(rows[a]["run"] for a in ("full", "no-dkim", "k4"))
    report = json.loads((out / "evaluation" / "report.json").read_text())
    assert set(report["synthetic"]) == {"full", "no-dkim", "k4"}
    # At smoke size (120 films, 25 in test) the judge reads the real test films at chance (CI [0.22, 0.49]; 400
    # films and 8 epochs do no better), so the reference space and faithfulness are withheld, in the table too.
    assert report["judge"]["better_than_chance"] is False
    for arm in ("full", "no-dkim", "k4"):
        assert rows[arm]["faithfulness"] == {"mauc": None, "ci95": None} and rows[arm]["fid"]["reference"] is None
        assert rows[arm]["fid_notes"]["reference"].startswith("withheld")
    for arm in ("no-dkim", "k4"):
        down = rows[arm]["downstream"]["mix@0.5"]
        assert set(down["by_seed"]) == {"0", "1"} or set(down["by_seed"]) == {0, 1}
        base = rows["full"]["downstream"]["mix@0.5"]["by_seed"]
        expected = sum(down["by_seed"][s] - base[s] for s in down["by_seed"]) / 2
        assert down["paired_vs_baseline"]["mean"] == pytest.approx(expected)
    assert rows["full"]["generator"]["stage"] == 2 and rows["no-dkim"]["generator"]["stage"] == 1
    assert rows["full"]["generator"]["steps"] == {"stage1": 4, "stage2": 2}
    assert rows["full"]["generator"]["gflops_per_denoising_step"] > 0
    md = (out / "ablation.md").read_text()
    assert "| no-ava-tls | generator.ava_tls: false | not run |" in md
    assert "- FID (reference) not computed: withheld: the reference classifier is no better than chance" in md
    assert "| k4 | generator.num_tokens: 4, filter.enabled: false |" in md
    assert "filter" not in json.loads((out / "arms" / "k4" / "steps.json").read_text())
    records = tmp_path / "records"
    assert (records / "ablation.md").read_text() == md and (records / "k4" / "results.csv").is_file()

    # A rerun skips every finished step; the table is the same.
    again = runner.invoke(app, ["run", str(path)])
    assert again.exit_code == 0, again.output
    assert " ...  [elapsed" not in again.output  # no step ran
    assert json.loads((out / "ablation.json").read_text()) == table


def test_ablation_arms_are_checked_before_any_work(recipes_dir, tmp_path):
    path, out = _tiny_ablation(recipes_dir, tmp_path, {"full": {}, "typo": {"generator.num_token": 4}}, run=None)
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and "ablation arm 'typo': unknown key 'generator.num_token'" in result.output
    assert not out.exists()
    with pytest.raises(RecipeError, match="baseline 'full' is not one of the arms"):
        load_recipe(path, ["ablation.arms={a: {}}"])
    with pytest.raises(RecipeError, match="arms share the data"):
        load_recipe(path, ["ablation.arms={full: {}, b: {data.n: 10}}"])
    with pytest.raises(RecipeError, match=r"ablation.run names arm\(s\) \['c'\]"):
        load_recipe(path, ["ablation.arms={full: {}}", "ablation.run=[c]"])


def test_shipped_ablation_recipe_has_the_papers_arms(recipes_dir):
    recipe = load_recipe(recipes_dir / "ablation-phantom.yaml")
    arms = {name: arm_recipe(recipe, name) for name in recipe.ablation.arms}
    assert arms["full"].generator.dkim and arms["full"].filter.enabled and arms["full"].generator.ava_tls
    assert not arms["no-lnfs"].filter.enabled and not arms["no-ava-tls"].generator.ava_tls
    assert arms["no-dkim"].steps == ["synthesize", "train-classifier"]
    assert {arm.vae.pretrained for arm in arms.values()} == {"runs/ablation-phantom/vae"}  # the shared VAE
    assert [arms[k].generator.num_tokens for k in ("k32", "k128")] == [32, 128]
    assert recipe.classifier.real_fracs == [0.01] and recipe.classifier.modes == ["mix"]
    assert len(recipe.classifier.seeds) == 3
