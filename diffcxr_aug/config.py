"""Recipes: YAML files validated by pydantic, overridden from the command line, frozen next to the outputs.

A recipe names registry entries and numbers, never code. Every section forbids unknown keys, so a typo
(``max_step`` for ``max_steps``) is an error that names the key, the file and the keys allowed there,
not a silently ignored setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffcxr_aug.io import atomic_write_text

PIPELINE_STEPS = ("prepare", "filter", "train-generator", "synthesize", "train-classifier", "evaluate")
PipelineStep = Literal["prepare", "filter", "train-generator", "synthesize", "train-classifier", "evaluate"]
DatasetName = Literal["phantom", "mimic-cxr", "iu-xray", "nih-cxr14", "csv"]
ClassifierMode = Literal["real", "mix", "pretrain-finetune"]

RESOLVED_RECIPE_NAME = "recipe.resolved.yaml"


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, the key and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DataSection(Section):
    """What ``prepare`` indexes."""

    dataset: DatasetName = "phantom"
    root: Path | None = Field(None, description="dataset folder (not needed for phantom)")
    n: int = Field(2000, ge=1, description="phantom: number of images")
    size: int = Field(128, ge=32, le=1024, description="image side in pixels for the cache")
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    # csv adapter
    csv: Path | None = None
    image_col: str = "image"
    label_cols: list[str] = Field(default_factory=list)
    report_col: str | None = None
    patient_col: str | None = None
    view_col: str | None = None


class FilterSection(Section):
    """Latent Noise Filtering (LNFS)."""

    enabled: bool = True
    vae: str | None = Field(None, description="VAE hub id or folder; None trains a small KL-VAE on the data")
    vae_config: str = Field("kl-f4", description="registered VAE architecture trained when `vae` is None")
    vae_steps: int = Field(1000, ge=1, description="training steps of that VAE")
    image_size: int = Field(64, ge=16, le=1024, description="image side the VAE encodes (must match the VAE)")
    n_clusters: int = Field(8, ge=2)
    contamination: float = Field(0.05, gt=0.0, lt=0.5, description="share of images flagged as noisy")
    threshold: Literal["contamination", "quantile"] = Field(
        "contamination",
        description="contamination: flag the top `contamination` share; quantile: flag scores above the "
        "`quantile` of the confident normal images' scores (the count follows the data)",
    )
    quantile: float = Field(0.995, gt=0.0, lt=1.0)
    known_noisy: Path | None = Field(
        None, description="CSV with an image_path column: images known to be noisy (supervise the discriminator)"
    )
    # Per-stage knobs (see diffcxr_aug.generator.noise_filter.LatentNoiseFilter).
    grid: int = Field(4, ge=1, description="spatial grid the latents are pooled to")
    min_cluster_share: float = Field(0.05, gt=0.0, le=0.5, description="clusters this large count as typical")
    normal_share: float = Field(0.7, gt=0.0, lt=1.0, description="share of images seeding the normal set")
    manifold_components: int = Field(256, ge=1, description="principal components of the normal-latent manifold")
    positive_share: float = Field(0.04, gt=0.0, lt=0.5, description="top manifold scores taught as noisy")
    negative_share: float = Field(0.6, gt=0.0, lt=1.0, description="bottom manifold scores taught as normal")
    discriminator_steps: int = Field(600, ge=1)
    max_fit: int = Field(20000, ge=100, description="images fitting stages 2 and 3 at most (all are scored)")


class GeneratorSection(Section):
    """Diff-CXR training (stage 1: LDM with AVA-TLS; stage 2: DKIM adapter)."""

    config: str = Field("phantom-64", description="registered generator configuration (tiny, phantom-64, ...)")
    use_filtered: bool = Field(True, description="train on the manifest kept by LNFS when the filter ran")
    ava_tls: bool = True
    dkim: bool = Field(False, description="stage 2: train the DKIM adapter after stage 1 (not built yet)")
    max_steps: int = Field(2000, ge=1)
    stage2_steps: int = Field(500, ge=0)
    batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    checkpoint_every: int = Field(500, ge=1)
    sample_every: int = Field(500, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"


class SynthesizeSection(Section):
    n: int = Field(1000, ge=1)
    steps: int = Field(25, ge=1)
    guidance: float = Field(4.0, ge=0.0)
    batch_size: int = Field(16, ge=1)
    prompts: Path | None = None


class ClassifierSection(Section):
    model: str = "resnet18"
    pretrained: bool = False
    real_fracs: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0])
    modes: list[ClassifierMode] = Field(default_factory=lambda: ["real", "mix", "pretrain-finetune"])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    n_synthetic: int | None = Field(None, ge=1)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    uncertainty: Literal["ignore", "ones", "zeros"] = "ignore"

    @field_validator("real_fracs")
    @classmethod
    def _fracs_in_range(cls, value: list[float]) -> list[float]:
        bad = [f for f in value if not 0.0 < f <= 1.0]
        if bad:
            raise ValueError(f"real fractions must lie in (0, 1], got {bad}")
        return value


class EvaluateSection(Section):
    enabled: bool = True


class Recipe(Section):
    """One whole experiment: the loop ``prepare -> filter -> train-generator -> synthesize -> train-classifier
    -> evaluate`` and the settings of each step."""

    name: str = "experiment"
    output_dir: Path = Path("runs/experiment")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    steps: list[PipelineStep] = Field(default_factory=lambda: list(PIPELINE_STEPS))
    data: DataSection = Field(default_factory=DataSection)
    filter: FilterSection = Field(default_factory=FilterSection)
    generator: GeneratorSection = Field(default_factory=GeneratorSection)
    synthesize: SynthesizeSection = Field(default_factory=SynthesizeSection)
    classifier: ClassifierSection = Field(default_factory=ClassifierSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)

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
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        current = field.annotation
    return sorted(current.model_fields)


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
