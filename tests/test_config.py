from __future__ import annotations

import json

import pytest
import yaml

from diffcxr_aug.config import (
    PIPELINE_STEPS,
    RESOLVED_RECIPE_NAME,
    Recipe,
    RecipeError,
    load_recipe,
    write_resolved_recipe,
)


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


def test_generator_reuses_the_filters_vae_only_when_it_is_the_same_one(tmp_path, recipes_dir):
    from diffcxr_aug.augment.experiment import experiment_paths, filter_vae_for_generator

    whole = ["filter.vae_crop_size=null", "generator.vae_crop_size=null"]  # whole-image VAEs, as phantom-64's own
    recipe = load_recipe(recipes_dir / "quickstart.yaml", [f"output_dir={tmp_path}", *whole])
    paths = experiment_paths(recipe)
    assert filter_vae_for_generator(recipe, paths) is None  # the filter has not trained one yet
    folder = paths["filtered"] / "vae"
    folder.mkdir(parents=True)
    # What train_vae records of the VAE it trained, as the quickstart asks for it.
    trained = {"config": "kl-f4", "size": 64, "steps": 800, "batch_size": 32, "crop_size": None, "seed": recipe.seed}
    (folder / "metrics.json").write_text(json.dumps(trained))
    assert filter_vae_for_generator(recipe, paths) == folder
    # A crop the size of the image is a whole-image VAE: still the same one.
    (folder / "metrics.json").write_text(json.dumps(trained | {"crop_size": 64}))
    assert filter_vae_for_generator(recipe, paths) == folder
    # Trained otherwise (the recipe changed after the filter ran, say): the generator trains its own.
    # The last: a record that does not say its batch size (written by an older version).
    unknown_batch = {k: v for k, v in trained.items() if k != "batch_size"}
    changes = [{"steps": 1000}, {"size": 128}, {"config": "kl-f8"}, {"batch_size": 16}, {"crop_size": 32}, {"seed": 7}]
    for record in [trained | change for change in changes] + [unknown_batch]:
        (folder / "metrics.json").write_text(json.dumps(record))
        assert filter_vae_for_generator(recipe, paths) is None, record
    # A VAE named in the recipe is used as named.
    (folder / "metrics.json").write_text(json.dumps(trained))
    named = load_recipe(recipes_dir / "quickstart.yaml", [f"output_dir={tmp_path}", *whole, "generator.vae=kl-f4"])
    assert filter_vae_for_generator(named, paths) is None


@pytest.mark.parametrize("name", ["phantom-128.yaml", "quickstart.yaml"])
def test_recipes_train_one_vae_for_filter_and_generator(tmp_path, recipes_dir, name):
    # The hour of phantom-128 (and the quickstart's 20 minutes) count one VAE training: the filter's, which the
    # generator then loads. A recipe that changes the filter's VAE keys must change the generator's too.
    from diffcxr_aug.augment.experiment import experiment_paths, filter_vae_for_generator

    recipe = load_recipe(recipes_dir / name, [f"output_dir={tmp_path}"])
    assert recipe.steps.index("filter") < recipe.steps.index("train-generator") and recipe.generator.use_filtered
    paths = experiment_paths(recipe)
    (paths["filtered"] / "vae").mkdir(parents=True)
    f = recipe.filter
    trained = {"config": f.vae_config, "size": f.image_size, "steps": f.vae_steps, "batch_size": f.vae_batch_size}
    trained |= {"crop_size": f.vae_crop_size, "seed": recipe.seed}
    (paths["filtered"] / "vae" / "metrics.json").write_text(json.dumps(trained))
    assert filter_vae_for_generator(recipe, paths) == paths["filtered"] / "vae"
