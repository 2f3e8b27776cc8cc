"""DKIM knowledge text: labels -> template sentences, the state switch, and template validation."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml

from diffcxr_aug.config import RecipeError, load_recipe
from diffcxr_aug.generator.knowledge import (
    KnowledgeTemplates,
    knowledge_sentences,
    knowledge_text,
    knowledge_texts,
    load_templates,
)
from diffcxr_aug.generator.settings import GeneratorSettings

ROW = {"Cardiomegaly": 0, "Pleural Effusion": 1, "Pneumonia": -1, "Fracture": math.nan, "Support Devices": 1}


def test_each_state_has_its_sentence_and_all_writes_every_known_label():
    assert knowledge_sentences(ROW, states="all") == [
        "There is no cardiomegaly.",
        "Pneumonia may be present.",
        "There is a pleural effusion.",
        "There is a support device.",
    ]


def test_positive_only_drops_absent_and_uncertain():
    assert knowledge_text(ROW) == "There is a pleural effusion. There is a support device."


def test_no_finding_sentence_when_no_pathology_is_present_or_uncertain():
    assert knowledge_text({"Cardiomegaly": 0}) == "No acute cardiopulmonary abnormality."
    assert knowledge_text({}) == "No acute cardiopulmonary abnormality."
    # A device is not a pathology; the row's own No Finding value is not what decides.
    assert knowledge_text({"Support Devices": 1, "No Finding": 0}, states="all") == (
        "No acute cardiopulmonary abnormality. There is a support device."
    )
    # An uncertain pathology rules No Finding out (CheXpert's rule): positive-only then knows nothing.
    assert knowledge_text({"Pneumothorax": -1}) == ""
    assert knowledge_text({"Pneumothorax": -1}, states="all") == "A pneumothorax may be present."


def test_label_cells_as_the_manifest_holds_them():
    frame = pd.DataFrame(
        {"report": ["a", "b"], "Edema": [1.0, math.nan], "Lung Lesion": ["", "1"], "meta_age": [60, 70]}
    )
    assert knowledge_texts(frame) == ["There is pulmonary edema.", "There is a lung lesion."]
    with pytest.raises(ValueError, match="label 'Edema' holds 2"):
        knowledge_text({"Edema": 2})


def test_unknown_label_is_an_error_that_names_it():
    with pytest.raises(ValueError, match="unknown label 'Effusion'"):
        knowledge_text({"Effusion": 1})
    with pytest.raises(ValueError, match="none of the CheXpert label columns"):
        knowledge_texts(pd.DataFrame({"Effusion": [1]}))
    with pytest.raises(ValueError, match="unknown label 'Pleural Efusion'"):
        KnowledgeTemplates(labels={"Pleural Efusion": {"finding": "effusion"}})
    with pytest.raises(ValueError, match="No Finding has its own sentence"):
        KnowledgeTemplates(labels={"No Finding": {"finding": "nothing"}})


def test_missing_or_unknown_placeholder_is_an_error_that_names_it():
    with pytest.raises(ValueError, match="'There is something.' has no placeholder"):
        KnowledgeTemplates(present="There is something.")
    with pytest.raises(ValueError, match=r"unknown placeholder \{disease\}"):
        KnowledgeTemplates(absent="No {disease}.")
    with pytest.raises(ValueError, match=r"unknown placeholder \{x\}"):
        KnowledgeTemplates(labels={"Fracture": {"finding": "fracture", "present": "A {x}."}})
    with pytest.raises(ValueError, match=r"takes no placeholder \{finding\}"):
        KnowledgeTemplates(no_finding="No {finding}.")


def test_phrasing_overrides_replace_one_label_and_keep_the_others():
    templates = KnowledgeTemplates(
        present="Findings include {a_finding}.",
        labels={"Fracture": {"finding": "rib fracture", "article": "a"}},
    )
    assert knowledge_text({"Fracture": 1, "Atelectasis": 1}, templates) == (
        "Findings include atelectasis. Findings include a rib fracture."
    )
    assert (
        templates.sentence("Enlarged Cardiomediastinum", "present") == "The cardiomediastinal silhouette is enlarged."
    )
    assert len(templates.labels) == 13


def test_recipe_takes_templates_inline_or_from_a_file(tmp_path):
    inline = {"uncertain": "Possible {finding}.", "labels": {"Edema": {"finding": "edema"}}}
    path = tmp_path / "templates.json"
    path.write_text(json.dumps(inline))
    for value in (inline, str(path)):
        section = GeneratorSettings(dkim_templates=value, dkim_states="all")
        assert knowledge_text({"Edema": -1}, section.dkim_templates, section.dkim_states) == "Possible edema."
    assert load_templates(path) == load_templates(inline)
    # The resolved recipe carries the templates themselves, not the path.
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"generator": {"dkim_templates": str(path)}}))
    assert load_recipe(recipe).generator.dkim_templates.uncertain == "Possible {finding}."
    bad = tmp_path / "bad.yaml"
    bad.write_text("present: 'There is {disease}.'\n")
    recipe.write_text(yaml.safe_dump({"generator": {"dkim_templates": str(bad)}}))
    with pytest.raises(RecipeError, match=r"bad.yaml: present: .*\{disease\}"):
        load_recipe(recipe)
    recipe.write_text(yaml.safe_dump({"generator": {"dkim_states": "negative-only"}}))
    with pytest.raises(RecipeError, match="generator.dkim_states"):
        load_recipe(recipe)
