from __future__ import annotations

import dataclasses

import pytest
import yaml
from pydantic import ValidationError

from diffcxr_aug.config import RESOLVED_RECIPE_NAME, Recipe, RecipeError, load_recipe, write_resolved_recipe
from diffcxr_aug.errors import InputError
from diffcxr_aug.generator.settings import VAESettings
from diffcxr_aug.types import PIPELINE_STEPS


def test_every_shipped_recipe_validates(recipes_dir):
    recipes = sorted(recipes_dir.glob("*.yaml"))
    assert recipes, "recipes/ holds no YAML"
    for path in recipes:
        recipe = load_recipe(path)
        assert isinstance(recipe, Recipe)
        assert recipe.name


def test_misspelled_key_names_key_file_and_allowed(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("generator:\n  max_step: 10\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "generator.max_step" in message
    assert str(path) in message
    assert "max_steps" in message  # the allowed keys are listed


def test_unknown_top_level_section(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("classifer:\n  epochs: 2\n")
    with pytest.raises(RecipeError, match="unknown key 'classifer'.*classifier"):
        load_recipe(path)


def test_wrong_type_is_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("classifier:\n  epochs: many\n")
    with pytest.raises(RecipeError, match="classifier.epochs"):
        load_recipe(path)


def test_fraction_out_of_range(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("classifier:\n  real_fracs: [0.0, 2.0]\n")
    with pytest.raises(RecipeError, match="real_fracs"):
        load_recipe(path)


def test_not_a_mapping_and_bad_yaml(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(path)
    path.write_text("a: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="no such recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_overrides_keep_types_and_reject_unknown(recipes_dir):
    recipe = load_recipe(recipes_dir / "smoke.yaml", ["classifier.epochs=3", "classifier.seeds=[4, 5]", "seed=7"])
    assert recipe.classifier.epochs == 3
    assert recipe.classifier.seeds == [4, 5]
    assert recipe.seed == 7
    with pytest.raises(RecipeError, match="classifier.epoch"):
        load_recipe(recipes_dir / "smoke.yaml", ["classifier.epoch=3"])
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(recipes_dir / "smoke.yaml", ["classifier.epochs"])


def test_steps_must_be_in_order():
    with pytest.raises(Exception, match="pipeline order"):
        Recipe(steps=["synthesize", "prepare"])
    assert Recipe().steps == list(PIPELINE_STEPS)


def test_resolved_recipe_round_trips(tmp_path, recipes_dir):
    recipe = load_recipe(recipes_dir / "smoke.yaml", [f"output_dir={tmp_path}"])
    path = write_resolved_recipe(recipe)
    assert path == tmp_path / RESOLVED_RECIPE_NAME
    again = Recipe.model_validate(yaml.safe_load(path.read_text()))
    assert again == recipe


@pytest.mark.parametrize("name", ["phantom-128.yaml", "quickstart.yaml", "smoke.yaml"])
def test_recipes_have_one_vae_for_filter_and_generator(tmp_path, recipes_dir, name):
    # The hour of phantom-128 (and the quickstart's 20 minutes) count one VAE training, the train-vae step's,
    # which the filter and the generator both load by path.
    from diffcxr_aug.augment.layout import experiment_paths, recipe_vae, recipe_vae_plan
    from diffcxr_aug.augment.plan import plan_steps
    from diffcxr_aug.generator.configs import resolve_config

    recipe = load_recipe(recipes_dir / name, [f"output_dir={tmp_path}"])
    steps = {step.name: step for step in plan_steps(recipe)}
    assert list(steps)[:4] == ["prepare", "train-vae", "filter", "train-generator"]
    plan = recipe_vae_plan(recipe)
    assert steps["filter"].settings["vae"] == steps["train-generator"].settings["vae"] == dataclasses.asdict(plan)
    assert plan.size == resolve_config(recipe.generator).image_size  # the filter encodes as the generator does
    assert steps["train-vae"].fingerprint in steps["filter"].settings["upstream"].values()
    assert steps["train-vae"].fingerprint in steps["train-generator"].settings["upstream"].values()
    # The generator step loads the train-vae folder (and moving the output folder redoes nothing).
    assert recipe_vae(recipe, experiment_paths(recipe)) == str(tmp_path / "vae")
    moved = {s.name: s for s in plan_steps(load_recipe(recipes_dir / name, [f"output_dir={tmp_path / 'x'}"]))}
    assert all(moved[n].fingerprint == steps[n].fingerprint for n in ("train-vae", "filter", "train-generator"))


def test_vae_section_edges():
    from diffcxr_aug.augment.layout import recipe_vae_plan

    # An explicit null is the default (a resolved recipe writes every key).
    assert Recipe.model_validate({"vae": {"size": None}}).vae == VAESettings()
    # The VAE keys of recipes from before the vae section are unknown keys now, named with the keys allowed.
    with pytest.raises(ValidationError, match="vae_config"):
        Recipe.model_validate({"filter": {"vae_config": "kl-f4"}})
    with pytest.raises(ValidationError, match="set the VAE in the recipe's vae section"):
        Recipe.model_validate({"generator": {"vae": "kl-f8"}})
    with pytest.raises(ValidationError, match="set one of them"):
        VAESettings(pretrained="some/vae", config="kl-f4")
    # One latent space, one image size: the filter encodes at the size the generator trains at.
    with pytest.raises(InputError, match=r"vae.size is 128 but the generator config 'phantom-64' trains at 64 px"):
        recipe_vae_plan(Recipe.model_validate({"vae": {"size": 128}}))
    assert recipe_vae_plan(Recipe.model_validate({"vae": {"size": 128}, "steps": ["prepare", "filter"]})).size == 128
    # YAML reads a bare `no` as False: both precision keys take it as "no".
    no = Recipe.model_validate(
        yaml.safe_load("generator:\n  mixed_precision: no\nsynthesize:\n  mixed_precision: no\n")
    )
    assert no.generator.mixed_precision == no.synthesize.mixed_precision == "no"


def _plan(recipe: Recipe):
    from diffcxr_aug.augment.plan import plan_steps

    return plan_steps(recipe)


def test_vae_plan_takes_unset_keys_from_the_generator_config():
    from diffcxr_aug.generator.configs import get_config
    from diffcxr_aug.generator.vae import plan_vae

    plan = plan_vae(VAESettings(), get_config("phantom-128"))
    assert (plan.config, plan.size, plan.steps, plan.batch_size, plan.crop_size) == ("kl-f4", 128, 1000, 16, 64)
    assert plan_vae(VAESettings(), get_config("paper-256")).pretrained == "stabilityai/sd-vae-ft-mse"
    assert plan_vae(VAESettings(crop_size=128, steps=5), get_config("phantom-128")).crop_size == 128
    with pytest.raises(InputError, match="vae.pretrained"):
        plan_vae(VAESettings(config="stabilityai/sd-vae-ft-mse"), get_config("phantom-128"))


def test_recipe_device_takes_a_gpu_index_and_names_the_choices(tmp_path):
    """``device: cuda:1`` validates (a recipe for a GPU machine, on any machine); a misspelling is one error that
    lists the choices."""
    path = tmp_path / "gpu.yaml"
    path.write_text("device: cuda:1\n")
    assert load_recipe(path).device == "cuda:1"
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert load_recipe(overrides=[f"device={device}"]).device == device
    for bad in ("gpu", "cuda:x", "cuda1", "CUDA", "cpu:0", "cuda:-1"):
        with pytest.raises(RecipeError, match=r"device: .*unknown device .*choose one of: auto, cpu, cuda, cuda:N"):
            load_recipe(overrides=[f"device={bad}"])


def test_evaluate_and_synthesize_take_every_precision():
    recipe = load_recipe(overrides=["evaluate.mixed_precision=fp16", "synthesize.mixed_precision=no"])
    assert recipe.evaluate.mixed_precision == "fp16" and recipe.synthesize.mixed_precision == "no"
    assert Recipe().evaluate.mixed_precision == "auto" and Recipe().synthesize.mixed_precision == "auto"
    assert Recipe().generator.gradient_checkpointing is False
    with pytest.raises(RecipeError, match="evaluate.mixed_precision"):
        load_recipe(overrides=["evaluate.mixed_precision=fp8"])
