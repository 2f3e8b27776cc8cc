"""Recipes: YAML files validated by pydantic, overridden from the command line, frozen next to the outputs.

A recipe names registry entries and numbers, never code. Every section forbids unknown keys, so a typo
(``max_step`` for ``max_steps``) is an error that names the key, the file and the keys allowed there,
not a silently ignored setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, Field, ValidationError, field_validator, model_validator

from diffcxr_aug.errors import InputError
from diffcxr_aug.evaluation.faithfulness import REFERENCE_EPOCHS, REFERENCE_MODEL
from diffcxr_aug.generator.settings import FilterSettings, GeneratorSettings, SynthesisSettings, VAESettings
from diffcxr_aug.io import atomic_write_text
from diffcxr_aug.types import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NOISE_RATE,
    DEFAULT_PHANTOM_N,
    FEATURE_KINDS,
    PIPELINE_STEPS,
    ClassifierMetric,
    ClassifierMode,
    DatasetName,
    Device,
    MixedPrecision,
    PipelineStep,
    Settings,
    SyntheticChoice,
    UncertaintyPolicy,
    yaml_no,
)

RESOLVED_RECIPE_NAME = "recipe.resolved.yaml"


class RecipeError(InputError):
    """A recipe that cannot be used; the message names the file, the key and the fix."""


class Section(Settings):
    """A recipe section."""


class DataSection(Section):
    """What ``prepare`` indexes."""

    dataset: DatasetName = "phantom"
    root: Path | None = Field(None, description="dataset folder (not needed for phantom)")
    n: int = Field(DEFAULT_PHANTOM_N, ge=1, description="phantom: number of images")
    noise_rate: float = Field(
        DEFAULT_NOISE_RATE,
        ge=0.0,
        le=1.0,
        description="phantom: expected share of noisy images (laterals, inverted, ...); 0: clean",
    )
    size: int = Field(DEFAULT_IMAGE_SIZE, ge=32, le=1024, description="image side in pixels for the cache")
    split_fractions: tuple[float, float, float] = Field(
        (0.7, 0.1, 0.2),
        description="patient shares of train, val and test: the phantom world's, and those of a real dataset's rows "
        "without an official split",
    )
    # csv adapter
    csv: Path | None = None
    image_col: str = "image"
    label_cols: list[str] = Field(default_factory=list)
    report_col: str | None = None
    patient_col: str | None = None
    view_col: str | None = None


class LabelSection(Section):
    """``label``: CheXpert labels for free-text reports (the offline rule-based labeler, or CheXbert)."""

    text_col: str = Field("report", description="column of report text")
    id_col: str = Field("ID", description="column of report ids, copied to the output")
    checkpoint: Path | None = Field(None, description="CheXbert checkpoint (None: the offline rule-based labeler)")
    bert: str | None = Field(
        None,
        description="CheXbert only: BERT config + tokenizer, a local folder or hub id (default: the checkpoint's "
        "folder if it holds config.json, else bert-base-uncased)",
    )


class ClassifierSection(Section):
    """timm classifiers over real fractions x modes x seeds (``train-classifier`` and recipes)."""

    model: str | list[str] = Field(
        "resnet18",
        description="any timm model name, or a list: the sweep runs every cell once per model (results.csv's model)",
    )
    pretrained: bool = Field(False, description="start from the model's pretrained weights (hub or local cache)")
    pretrained_file: Path | None = Field(None, description="local weights file used as the pretrained weights")
    image_size: int | None = Field(
        None,
        ge=16,
        le=1024,
        description="training image side; None: the prepared data's size in a recipe, timm's default on the CLI",
    )
    real_fracs: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0])
    modes: list[ClassifierMode] = Field(default_factory=lambda: ["real", "mix", "pretrain-finetune"])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    # Recipes only: which images the synthetic modes use. "generated": the synthesize step's output;
    # "ceiling": perfect-generator images drawn from the phantom world's truth; "dkim": the stage-2 (DKIM) model's
    # images, from the same prompts and seeds as "generated", which is then the stage-1 model's (the recipe must
    # train stage 2: generator.dkim); "dkim-balanced": the stage-2 model's images with synthesize.balance (then
    # the only balanced set); "none"; or a folder. A list runs every synthetic mode once per source, against the
    # same real-only runs (results.csv's `source` column).
    synthetic: SyntheticChoice | list[SyntheticChoice] = "generated"
    n_synthetic: int | None = Field(
        None, ge=1, description="synthetic images used (default: all; ceiling: as many as real train)"
    )
    epochs: int = Field(10, ge=1)
    pretrain_epochs: int | None = Field(
        None, ge=1, description="pretrain-finetune: epochs on synthetic (default: epochs)"
    )
    samples_per_epoch: Annotated[int, Field(ge=1)] | Literal["matched", "one-pass"] = Field(
        "matched",
        description="images drawn per epoch: matched (as many as the real train split holds, for every run, so a "
        "low real fraction repeats its films: the count-matched duplicate-real control), one-pass (each run one "
        "pass over its own data: runs with more images take more steps, not a fair comparison) or a number",
    )
    patience: int = Field(3, ge=1, description="early stopping: epochs without a better validation mAUC")
    batch_size: int = Field(32, ge=2, description="at least 2: BatchNorm layers cannot train on one image")
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    uncertainty: UncertaintyPolicy = "ignore"
    augment: bool = Field(True, description="small rotation/shift/scale and brightness/contrast while training")
    hflip: bool = Field(False, description="random horizontal flips (off: laterality matters in a chest film)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    workers: int = Field(
        1,
        ge=1,
        description="runs trained at once, each in its own process with its share of the cores (a run's result "
        "does not depend on which process ran it); 2 on a 2-core CPU roughly halves a sweep of small models",
    )
    mixed_precision: Annotated[MixedPrecision, BeforeValidator(yaml_no)] = Field(
        "auto",
        description="autocast while training and testing: auto (bf16 on a GPU that has it, fp16 on one that has not, "
        "bf16 on a CPU with native bf16, else no), no, bf16, fp16 (a GPU, with loss scaling)",
    )
    n_bootstrap: int = Field(1000, ge=10, description="bootstrap resamples of the test images for the mAUC CI")
    min_label_support: int = Field(
        1, ge=1, description="a label counts in mAUC only with at least this many positives and negatives in test"
    )
    metric: ClassifierMetric = Field(
        "report",
        description="the mAUC the summary, gains and plot use: 'report' (labels from the test reports) or 'truth' "
        "(the phantom world's truth: every finding known present or absent; results.csv holds both)",
    )

    @field_validator("real_fracs")
    @classmethod
    def _fracs_in_range(cls, value: list[float]) -> list[float]:
        bad = [f for f in value if not 0.0 < f <= 1.0]
        if bad:
            raise ValueError(f"real fractions must lie in (0, 1], got {bad}")
        return value


class EvaluateSection(Section):
    """``evaluate``: FID/KID, faithfulness, privacy and compute, in a reference classifier's feature space."""

    enabled: bool = True
    model: str = Field(REFERENCE_MODEL, description="timm model of the reference classifier trained on the real data")
    epochs: int = Field(REFERENCE_EPOCHS, ge=1, description="epochs of that classifier")
    image_size: int | None = Field(None, ge=16, le=1024, description="None: the prepared data's size")
    features: list[str] = Field(
        default_factory=lambda: ["reference"],
        description="feature spaces of the fidelity table: reference, inception, xrv, open_clip:NAME_OR_DIR",
    )
    inception_weights: Path | None = Field(None, description="the pt_inception-2015-12-05 weights file (FID)")
    xrv_weights: str | None = Field(
        None, description="a torchxrayvision DenseNet-121 state dict file, or a torchxrayvision weights name"
    )
    mixed_precision: Annotated[MixedPrecision, BeforeValidator(yaml_no)] = Field(
        "auto",
        description="autocast of every network evaluate runs (the reference classifier, the feature spaces): auto "
        "(bf16 on a GPU that has it, fp16 on one that has not, fp32 on a CPU), no, bf16, fp16 (a GPU)",
    )
    min_label_support: int = Field(
        1,
        ge=1,
        description="a label is scored (the reference classifier's real-test mAUC, faithfulness) only with this many "
        "positives and negatives among the real test films",
    )

    @field_validator("features")
    @classmethod
    def _known_spaces(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v.partition(":")[0] not in FEATURE_KINDS]
        if unknown:
            raise ValueError(f"unknown feature space(s) {unknown}; choose {', '.join(FEATURE_KINDS)} (open_clip:NAME)")
        return value


class AblationSection(Section):
    """``run`` with arms: the recipe's loop once per arm, each arm the recipe with a few keys changed, then one
    table (:mod:`diffcxr_aug.augment.ablation`). The data and the VAE are shared; each arm filters, trains,
    synthesizes from the same prompts and seeds, and trains the downstream classifiers; one ``evaluate`` scores
    every finished arm with one reference classifier, so faithfulness is paired against the baseline."""

    arms: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="arm name -> the recipe keys it changes, dotted (generator.ava_tls: false); {} is the recipe "
        "as it stands",
    )
    baseline: str = Field("full", description="the arm every other is compared with (paired differences)")
    run: list[str] | None = Field(
        None, description="the arms to run now (None: all); the table lists every arm, those not run as 'not run'"
    )
    records: Path | None = Field(
        None, description="a folder the table, the joint evaluation and each arm's small records are copied to"
    )

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        import re

        bad = [name for name in value if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name)]
        if bad:
            raise ValueError(f"arm names are folder names (a-z, 0-9, - and _), got {bad}")
        for name, changes in value.items():
            for key in changes or {}:
                if key.split(".")[0] in ("ablation", "output_dir", "name", "steps", "data", "vae", "seed"):
                    raise ValueError(
                        f"arm {name!r} changes {key!r}: arms share the data, the VAE, the seed and the output folder"
                    )
        return value

    @model_validator(mode="after")
    def _known_arms(self) -> AblationSection:
        if self.arms and self.baseline not in self.arms:
            raise ValueError(f"ablation.baseline {self.baseline!r} is not one of the arms {list(self.arms)}")
        unknown = [name for name in self.run or [] if name not in self.arms]
        if unknown:
            raise ValueError(f"ablation.run names arm(s) {unknown} that ablation.arms does not define")
        return self


class SynthesizeSection(SynthesisSettings):
    """The recipe's synthesize step: :class:`SynthesisSettings` for the images the classifiers use, and a set from
    the test split's reports for judging the generator."""

    held_out: int | None = Field(
        None,
        gt=0,
        description="also sample this many images from the test split's reports, which the generator never saw, "
        "into synthetic-held-out/: evaluate judges that set (against the real films those reports describe) "
        "and no classifier trains on it",
    )


class Recipe(Section):
    """One whole experiment: the loop ``prepare -> filter -> train-generator -> synthesize -> train-classifier
    -> evaluate`` and the settings of each step."""

    name: str = "experiment"
    output_dir: Path = Path("runs/experiment")
    seed: int = 0
    device: Device = "auto"
    steps: list[PipelineStep] = Field(default_factory=lambda: list(PIPELINE_STEPS))
    data: DataSection = Field(default_factory=DataSection)
    label: LabelSection = Field(default_factory=LabelSection)
    vae: VAESettings = Field(default_factory=VAESettings)
    filter: FilterSettings = Field(default_factory=FilterSettings)
    generator: GeneratorSettings = Field(default_factory=GeneratorSettings)
    synthesize: SynthesizeSection = Field(default_factory=SynthesizeSection)
    classifier: ClassifierSection = Field(default_factory=ClassifierSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    ablation: AblationSection | None = Field(
        None, description="arms: run the loop once per arm and write one comparison table (augment.ablation)"
    )

    @model_validator(mode="after")
    def _one_vae(self) -> Recipe:
        if self.generator.vae is not None:
            raise ValueError(
                f"generator.vae is {self.generator.vae!r}: that key is train-generator's --vae; set the VAE in the "
                "recipe's vae section (vae.pretrained for a hub id or folder, vae.config for an architecture to train)"
            )
        return self

    @model_validator(mode="after")
    def _steps_in_order(self) -> Recipe:
        order = [PIPELINE_STEPS.index(s) for s in self.steps]
        if order != sorted(set(order)):
            raise ValueError(f"steps must be distinct and in pipeline order {list(PIPELINE_STEPS)}, got {self.steps}")
        return self


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Keys a pydantic model accepts at the nested location ``loc`` (the parent of a bad key)."""
    current: Any = model
    for part in loc:
        field = current.model_fields.get(part) if isinstance(current, type) else None
        # A section may be optional (``KnowledgeTemplates | None``): look through the union.
        models = [t for t in (field.annotation, *get_args(field.annotation)) if _is_model(t)] if field else []
        if not models:
            return []
        current = models[0]
    return sorted(current.model_fields)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(p) for p in loc)
        if item["type"] == "extra_forbidden":
            parent = loc[:-1]
            allowed = _allowed_keys(Recipe, parent)
            where = ".".join(map(str, parent)) or "the top level"
            lines.append(f"{source}: unknown key {key!r}; keys allowed at {where}: {', '.join(allowed)}")
        else:
            lines.append(f"{source}: {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value); the value is read as YAML, so numbers and lists keep their types."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected key=value, e.g. --set classifier.epochs=3")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise RecipeError(f"--set {text!r}: empty key")
    return path, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def load_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe with ``yaml.safe_load``, apply ``--set`` overrides and validate the result."""
    data: dict = {}
    source = "recipe defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise RecipeError(f"{path}: no such recipe file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML ({err})") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping of sections, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{source} (with --set {' '.join(overrides)})"
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(err, source)) from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def write_resolved_recipe(recipe: Recipe, folder: str | os.PathLike | None = None) -> Path:
    """Freeze the fully resolved recipe next to the outputs, before any work starts."""
    folder = Path(folder) if folder is not None else recipe.output_dir
    path = folder / RESOLVED_RECIPE_NAME
    atomic_write_text(path, dump_recipe(recipe))
    return path
