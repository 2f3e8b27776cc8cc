"""Disease knowledge for DKIM: a row's CheXpert labels written out as template sentences.

Diff-CXR's disease-knowledge injection (stage 2) conditions an adapter on the labels of each image as well as
on its report. The labels become text ("There is a pleural effusion. There is cardiomegaly."), which the
stage-1 report encoder and token squeeze turn into the *knowledge tokens* the adapter cross-attends to.

A label is ``1`` (present), ``0`` (absent), ``-1`` (uncertain) or unknown (NaN, empty, ``None``), as in the
manifest. :class:`KnowledgeTemplates` holds one sentence template per state, the name a radiologist gives
each observation (``{finding}``; ``{a_finding}`` with its article, "a fracture"; ``{Finding}`` and
``{A_finding}`` capitalised) and, where the general template would read badly, the observation's own
sentence for a state ("The cardiomediastinal silhouette is enlarged."). The states written are a
switch: ``positive-only`` (present findings only: the reference implementation's choice according to
issue #16) or ``all`` (present, absent and uncertain). When no pathology is present or uncertain (CheXpert's
No Finding rule, in which Support Devices, not a pathology, does not count), the ``no_finding`` sentence
comes first. The labels' own ``No Finding`` column is not read: it must agree with the others anyway. So in
``positive-only`` mode a row whose only findings are uncertain has empty knowledge, the same text as the
knowledge dropped for classifier-free guidance: nothing is known for sure.

The module imports no torch (recipes validate :class:`KnowledgeTemplates` before any heavy import).
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from diffcxr_aug.data.labels import CHEXPERT_LABELS

KnowledgeStates = Literal["positive-only", "all"]
KNOWLEDGE_STATES = ("positive-only", "all")
NO_FINDING = "No Finding"
# Observations that get a sentence; No Finding has its own (``no_finding``).
OBSERVATIONS: tuple[str, ...] = tuple(name for name in CHEXPERT_LABELS if name != NO_FINDING)
# Present devices do not make an image abnormal (CheXpert's No Finding ignores them).
NOT_PATHOLOGIES = frozenset({"Support Devices"})
PLACEHOLDERS = ("finding", "Finding", "a_finding", "A_finding")
STATE_OF_VALUE = {1.0: "present", 0.0: "absent", -1.0: "uncertain"}


def placeholders_of(template: str) -> list[str]:
    """The ``{name}`` fields of a ``str.format`` template (``ValueError`` if it does not parse)."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"template {template!r} is not a valid format string ({err})") from None


def _check_template(template: str, required: bool) -> str:
    fields = placeholders_of(template)
    unknown = [name for name in fields if name not in PLACEHOLDERS]
    if unknown:
        raise ValueError(
            f"template {template!r} has unknown placeholder {{{unknown[0]}}}; the placeholders are {{finding}} (the "
            "observation's name), {a_finding} (with its article: 'a pneumothorax', 'atelectasis') and {Finding}, "
            "{A_finding} (capitalised)"
        )
    if required and not fields:
        raise ValueError(f"template {template!r} has no placeholder; put {{finding}} or {{a_finding}} for the name")
    return template


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelPhrasing(_Model):
    """How one observation is written.

    Attributes:
        finding: the name a radiologist uses mid-sentence ("pleural effusion"), put in for ``{finding}``.
        article: its indefinite article when it is countable ("a pleural effusion"), used by ``{a_finding}``;
            empty for a mass noun ("atelectasis").
        present: this observation's own template for the present state (``None``: the set's template).
        absent: likewise for absent.
        uncertain: likewise for uncertain.
    """

    finding: str = Field(min_length=1)
    article: Literal["", "a", "an"] = ""
    present: str | None = None
    absent: str | None = None
    uncertain: str | None = None

    @field_validator("present", "absent", "uncertain")
    @classmethod
    def _known_placeholders(cls, value: str | None) -> str | None:
        # An observation's own sentence may name it literally, so a placeholder is optional here.
        return None if value is None else _check_template(value, required=False)


DEFAULT_PHRASINGS: dict[str, LabelPhrasing] = {
    "Enlarged Cardiomediastinum": LabelPhrasing(
        finding="enlarged cardiomediastinum",
        present="The cardiomediastinal silhouette is enlarged.",
        absent="The cardiomediastinal silhouette is not enlarged.",
        uncertain="The cardiomediastinal silhouette may be enlarged.",
    ),
    "Cardiomegaly": LabelPhrasing(finding="cardiomegaly"),
    "Lung Opacity": LabelPhrasing(finding="lung opacity", article="a"),
    "Lung Lesion": LabelPhrasing(finding="lung lesion", article="a"),
    "Edema": LabelPhrasing(finding="pulmonary edema"),
    "Consolidation": LabelPhrasing(finding="consolidation"),
    "Pneumonia": LabelPhrasing(finding="pneumonia"),
    "Atelectasis": LabelPhrasing(finding="atelectasis"),
    "Pneumothorax": LabelPhrasing(finding="pneumothorax", article="a"),
    "Pleural Effusion": LabelPhrasing(finding="pleural effusion", article="a"),
    # CheXpert's Pleural Other is mostly pleural thickening (also plaques, scarring, fibrosis).
    "Pleural Other": LabelPhrasing(finding="pleural thickening"),
    "Fracture": LabelPhrasing(finding="fracture", article="a"),
    # Plural when absent: "There is no support device" is not how a report says it.
    "Support Devices": LabelPhrasing(finding="support device", article="a", absent="There are no support devices."),
}


class KnowledgeTemplates(_Model):
    """The template set that writes labels as knowledge text (``generator.dkim_templates`` in a recipe).

    Attributes:
        present: sentence for an observation labelled 1; must hold one of the placeholders ``{finding}``,
            ``{a_finding}`` (with the article) or their capitalised forms ``{Finding}``, ``{A_finding}``.
        absent: for 0, likewise.
        uncertain: for -1, likewise.
        no_finding: the sentence written when no pathology is present (no placeholder).
        labels: observation name (CheXpert spelling) -> :class:`LabelPhrasing`. An entry given here replaces
            that observation's default entry whole; observations not given keep their defaults.
    """

    present: str = "There is {a_finding}."
    absent: str = "There is no {finding}."
    uncertain: str = "{A_finding} may be present."
    no_finding: str = "No acute cardiopulmonary abnormality."
    labels: dict[str, LabelPhrasing] = Field(default_factory=lambda: dict(DEFAULT_PHRASINGS))

    @field_validator("present", "absent", "uncertain")
    @classmethod
    def _needs_placeholder(cls, value: str) -> str:
        return _check_template(value, required=True)

    @field_validator("no_finding")
    @classmethod
    def _no_placeholder(cls, value: str) -> str:
        fields = placeholders_of(value)
        if fields:
            raise ValueError(f"no_finding {value!r} names no observation, so it takes no placeholder {{{fields[0]}}}")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _known_labels(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        unknown = [name for name in value if name not in OBSERVATIONS]
        if unknown:
            hint = " (No Finding has its own sentence: set no_finding)" if NO_FINDING in unknown else ""
            raise ValueError(
                f"unknown label {unknown[0]!r}{hint}; labels are the CheXpert observations: {', '.join(OBSERVATIONS)}"
            )
        return {**DEFAULT_PHRASINGS, **value}

    def sentence(self, label: str, state: Literal["present", "absent", "uncertain"]) -> str:
        """The sentence for ``label`` in ``state``."""
        phrasing = self.labels[label]
        template = getattr(phrasing, state) or getattr(self, state)
        finding = phrasing.finding
        a_finding = f"{phrasing.article} {finding}" if phrasing.article else finding
        return template.format(
            finding=finding, Finding=_capitalised(finding), a_finding=a_finding, A_finding=_capitalised(a_finding)
        )


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def read_templates_file(path: str | os.PathLike) -> KnowledgeTemplates:
    """A template set from a YAML or JSON file; a bad file is a ``ValueError`` naming it and the key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dkim_templates file {path} does not exist; give an inline mapping or a file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}  # JSON is YAML too
    except yaml.YAMLError as err:
        raise ValueError(f"dkim_templates file {path}: not valid YAML or JSON ({err})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"dkim_templates file {path}: expected a mapping, got {type(data).__name__}")
    try:
        return KnowledgeTemplates.model_validate(dict(data))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"dkim_templates file {path}: {problems}") from None


def load_templates(source: KnowledgeTemplates | Mapping[str, Any] | str | os.PathLike | None) -> KnowledgeTemplates:
    """A template set from a model, an inline mapping, a YAML/JSON file, or ``None`` (the defaults)."""
    if source is None:
        return KnowledgeTemplates()
    if isinstance(source, KnowledgeTemplates):
        return source
    if isinstance(source, (str, os.PathLike)):
        return read_templates_file(source)
    return KnowledgeTemplates.model_validate(dict(source))


def label_state(label: str, value: Any) -> str | None:
    """``present``, ``absent``, ``uncertain`` or ``None`` (unknown) for one label cell."""
    if value is None or (isinstance(value, str) and value.strip() in ("", "nan", "NaN", "None")):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.inf
    if math.isnan(number):
        return None
    if number not in STATE_OF_VALUE:
        raise ValueError(f"label {label!r} holds {value!r}; label values are 1, 0, -1 or empty (unknown)")
    return STATE_OF_VALUE[number]


def knowledge_sentences(
    labels: Mapping[str, Any], templates: KnowledgeTemplates | None = None, states: KnowledgeStates = "positive-only"
) -> list[str]:
    """The knowledge sentences of one row of labels, in CheXpert order.

    Args:
        labels: CheXpert label name -> value (1, 0, -1, NaN/empty/None); labels not given are unknown. Other
            keys are an error (a misspelled label would silently be unknown).
        templates: the template set (``None``: the defaults).
        states: ``positive-only`` or ``all``.
    """
    if states not in KNOWLEDGE_STATES:
        raise ValueError(f"Unsupported dkim_states {states!r}; choose one of: {', '.join(KNOWLEDGE_STATES)}")
    unknown = [name for name in labels if name not in CHEXPERT_LABELS]
    if unknown:
        raise ValueError(
            f"unknown label {unknown[0]!r}; labels are the CheXpert observations: {', '.join(CHEXPERT_LABELS)}"
        )
    templates = templates or KnowledgeTemplates()
    sentences, abnormal = [], False
    for name in OBSERVATIONS:
        state = label_state(name, labels.get(name))
        # CheXpert's No Finding rule: a present or uncertain pathology rules it out.
        abnormal |= state in ("present", "uncertain") and name not in NOT_PATHOLOGIES
        if state is not None and (states == "all" or state == "present"):
            sentences.append(templates.sentence(name, state))
    if not abnormal:
        sentences.insert(0, templates.no_finding)
    return sentences


def knowledge_text(
    labels: Mapping[str, Any], templates: KnowledgeTemplates | None = None, states: KnowledgeStates = "positive-only"
) -> str:
    """One row's knowledge text: its sentences joined by spaces."""
    return " ".join(knowledge_sentences(labels, templates, states))


def knowledge_texts(
    rows: Iterable[Mapping[str, Any]] | Any,
    templates: KnowledgeTemplates | None = None,
    states: KnowledgeStates = "positive-only",
) -> list[str]:
    """Knowledge text for each row of a label table.

    Args:
        rows: a ``pandas.DataFrame`` (a manifest: only its CheXpert label columns are read) or a sequence of
            label mappings (every key must be a CheXpert label).
        templates: the template set (``None``: the defaults).
        states: ``positive-only`` or ``all``.
    """
    if hasattr(rows, "columns") and hasattr(rows, "to_dict"):
        columns = [c for c in rows.columns if c in CHEXPERT_LABELS]
        if not columns:
            raise ValueError(
                f"the label table has none of the CheXpert label columns ({', '.join(CHEXPERT_LABELS)}); map other "
                "label sets onto them first (diffcxr_aug.data.labels.NIH_TO_CHEXPERT for NIH ChestX-ray14)"
            )
        rows = rows[columns].to_dict("records")
    if isinstance(rows, Mapping):
        raise ValueError("labels must be one mapping per image (a list of them) or a DataFrame, not one mapping")
    return [knowledge_text(row, templates, states) for row in rows]
