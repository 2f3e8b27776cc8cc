"""Registered generator configurations: image size, VAE, text encoder, token squeeze, UNet, image tower.

One registry is the single source of truth for an architecture: training builds from it, the resolved
config is stored in every checkpoint (so ``--resume`` rebuilds exactly what was trained), and the saved
pipeline carries each component's own ``config.json``. Recipes name an entry (``generator.config``) and
may override the keys that :class:`~diffcxr_aug.config.GeneratorSettings` exposes; nothing else.

Entries:
    * ``tiny``: tests and ``recipes/smoke.yaml``; seconds on a CPU.
    * ``phantom-64`` / ``phantom-128``: the phantom world on 2 CPU cores (minutes to an hour), with a KL-VAE
      trained on the manifest first and the offline MiniLM text encoder, frozen.
    * ``paper-256``: the paper's setting: 256 px, the SD VAE (4 x 32 x 32 latents), BiomedCLIP's text
      tower, K = 77 condition tokens. Needs the two pretrained models (hub or local copies) and a GPU.
    * ``paper-512``: the same networks at 512 px (4 x 64 x 64 latents); about 4x paper-256's compute a step and
      memory an image, which ``generator.gradient_checkpointing`` brings down.
    * ``tiny-512``: tests (and ``bench/gpu_check.py --tiny``): the 512 px / 64 x 64-latent geometry and paper-256's
      block layout at ``tiny``'s widths, with a factor-8 KL-VAE trained here; seconds on a CPU.

This module imports no torch at import time (recipes are validated against :data:`GENERATOR_CONFIGS`
before any heavy import); the builders import diffusers lazily.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_args

from diffcxr_aug.errors import InputError
from diffcxr_aug.types import PredictionType, TextEncoderPolicy

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from diffcxr_aug.generator.settings import GeneratorSettings

logger = logging.getLogger(__name__)

TEXT_ENCODER_POLICIES: tuple[str, ...] = get_args(TextEncoderPolicy)
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)

BIOMEDCLIP_ID = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
PAPER_GFLOPS = 29.641  # Diff-CXR, arXiv 2410.20165: "the lowest computational complexity at 29.641 GFLOPs"


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything that fixes the generator's architecture and latent space.

    Attributes:
        name: registry name this config came from.
        image_size: training and sampling resolution in pixels.
        vae: a :data:`~diffcxr_aug.generator.vae.VAE_CONFIGS` name (trained here on the manifest first) or a
            pretrained ``AutoencoderKL`` hub id / folder.
        vae_steps: optimizer steps when the VAE is trained here.
        vae_batch_size: batch size of that VAE training.
        vae_crop_size: that VAE trains on random crops of this size (``None``: whole images); it is
            convolutional, so it still encodes whole images, and each step costs (crop / image size)^2 as much.
        text_encoder: ``minilm``, ``scratch``, an open_clip ``hf-hub:``/``local-dir:`` name, or a transformers
            model name / folder (see :mod:`~diffcxr_aug.generator.text_encoder`).
        text_encoder_policy: ``frozen``, ``finetune`` or ``train`` (``train`` is the only one for ``scratch``).
        max_text_tokens: encoder context with AVA-TLS on; report tokens past it are cut (and counted in the log).
        num_tokens: K, the number of condition tokens the UNet cross-attends to.
        cross_attention_dim: width of those tokens (the UNet's ``cross_attention_dim``).
        squeeze: :class:`~diffcxr_aug.generator.token_squeeze.TokenSqueeze` arguments (width, layers, heads,
            embed_dim).
        image_tower: :class:`~diffcxr_aug.generator.ava_tls.ImageTower` arguments.
        unet: ``UNet2DConditionModel`` arguments other than sizes fixed by the latent space and the tokens.
        scratch_text: ``BertConfig`` arguments and ``vocab_size`` of the ``scratch`` text encoder.
        prediction_type: ``epsilon`` or ``v_prediction``.
        num_train_timesteps: diffusion steps of the training schedule.
        beta_schedule: the DDPM beta schedule (``scaled_linear`` as in Stable Diffusion).
    """

    name: str
    image_size: int
    vae: str
    vae_steps: int
    vae_batch_size: int
    text_encoder: str
    text_encoder_policy: TextEncoderPolicy
    max_text_tokens: int
    num_tokens: int
    cross_attention_dim: int
    squeeze: dict[str, Any] = field(default_factory=dict)
    image_tower: dict[str, Any] = field(default_factory=dict)
    unet: dict[str, Any] = field(default_factory=dict)
    scratch_text: dict[str, Any] = field(default_factory=dict)
    prediction_type: PredictionType = "epsilon"
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    vae_crop_size: int | None = None

    def __post_init__(self) -> None:
        if self.text_encoder_policy not in TEXT_ENCODER_POLICIES:
            raise InputError(
                f"Unsupported text_encoder_policy {self.text_encoder_policy!r}; choose one of: "
                f"{', '.join(TEXT_ENCODER_POLICIES)}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(
                f"Unsupported prediction_type {self.prediction_type!r}; choose one of: {', '.join(PREDICTION_TYPES)}"
            )
        if self.text_encoder == "scratch" and self.text_encoder_policy != "train":
            raise InputError(
                f"text_encoder 'scratch' has no pretrained weights, so text_encoder_policy must be 'train', "
                f"got {self.text_encoder_policy!r}"
            )
        if self.text_encoder != "scratch" and self.text_encoder_policy == "train":
            raise InputError(
                f"text_encoder_policy 'train' (from scratch) needs text_encoder 'scratch', got text_encoder "
                f"{self.text_encoder!r}; use 'finetune' to train a pretrained encoder further"
            )
        if self.num_tokens < 1 or self.max_text_tokens < 2:
            raise InputError(
                f"num_tokens must be >= 1 and max_text_tokens >= 2, got {self.num_tokens}, {self.max_text_tokens}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneratorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"Unknown generator config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def _unet(
    block_out_channels: tuple[int, ...],
    cross_attention_levels: tuple[bool, ...],
    layers_per_block: int,
    attention_heads: int,
    norm_num_groups: int,
    transformer_layers_per_block: int = 1,
) -> dict[str, Any]:
    """UNet arguments with cross-attention only at the levels asked for (the cheap, low-resolution ones)."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cross_attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cross_attention_levels))
    return {
        "block_out_channels": tuple(block_out_channels),
        "down_block_types": down,
        "up_block_types": up,
        "layers_per_block": layers_per_block,
        # diffusers' historical naming: for UNet2DConditionModel ``attention_head_dim`` is the number of heads.
        "attention_head_dim": attention_heads,
        "norm_num_groups": norm_num_groups,
        "transformer_layers_per_block": transformer_layers_per_block,
    }


# The from-scratch report encoder of the phantom configs (``text_encoder: scratch``).
_SCRATCH_TEXT = {
    "vocab_size": 4000,
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 512,
}

# The paper's setting. BiomedCLIP's text tower is PubMedBERT (768 wide, 256-token context).
_PAPER_256 = GeneratorConfig(
    name="paper-256",
    image_size=256,
    vae="stabilityai/sd-vae-ft-mse",
    vae_steps=0,
    vae_batch_size=0,
    text_encoder=BIOMEDCLIP_ID,
    text_encoder_policy="frozen",
    max_text_tokens=256,
    num_tokens=77,
    cross_attention_dim=768,
    squeeze={"width": 768, "num_layers": 2, "num_heads": 12, "embed_dim": 512},
    image_tower={"block_out_channels": (128, 256, 512), "embed_dim": 512, "norm_num_groups": 32},
    unet=_unet(
        (192, 384, 768, 768), (False, True, True, True), layers_per_block=2, attention_heads=8, norm_num_groups=32
    ),
    scratch_text={
        "vocab_size": 16000,
        "hidden_size": 512,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "intermediate_size": 2048,
    },
)

GENERATOR_CONFIGS: dict[str, GeneratorConfig] = {
    "tiny": GeneratorConfig(
        name="tiny",
        image_size=32,
        vae="tiny",
        vae_steps=2,
        vae_batch_size=8,
        text_encoder="scratch",
        text_encoder_policy="train",
        max_text_tokens=64,
        num_tokens=8,
        cross_attention_dim=16,
        squeeze={"width": 16, "num_layers": 1, "num_heads": 2, "embed_dim": 16},
        image_tower={"block_out_channels": (8, 16), "embed_dim": 16, "norm_num_groups": 4},
        unet=_unet((16, 32), (False, True), layers_per_block=1, attention_heads=2, norm_num_groups=8),
        scratch_text={
            "vocab_size": 200,
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
        },
    ),
    # The paper-512 geometry at tiny's widths: 512 px through a factor-8 KL-VAE (trained here for 2 steps on
    # 64 px crops) to 4 x 64 x 64 latents, and paper-256's block layout (four levels, cross-attention at the
    # lower three: 32 x 32, 16 x 16, 8 x 8).
    "tiny-512": GeneratorConfig(
        name="tiny-512",
        image_size=512,
        vae="kl-f8",
        vae_steps=2,
        vae_batch_size=2,
        vae_crop_size=64,
        text_encoder="scratch",
        text_encoder_policy="train",
        max_text_tokens=64,
        num_tokens=8,
        cross_attention_dim=16,
        squeeze={"width": 16, "num_layers": 1, "num_heads": 2, "embed_dim": 16},
        image_tower={"block_out_channels": (8, 16), "embed_dim": 16, "norm_num_groups": 4},
        unet=_unet(
            (8, 16, 16, 16), (False, True, True, True), layers_per_block=1, attention_heads=2, norm_num_groups=4
        ),
        scratch_text={
            "vocab_size": 200,
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
        },
    ),
    # 64 px -> 4 x 16 x 16 latents; attention at 8 x 8 and 4 x 4 only. Sized for 2 CPU cores: about
    # 0.5 GFLOPs a denoising step, a squeeze as cheap as the UNet's own cross-attention projections.
    "phantom-64": GeneratorConfig(
        name="phantom-64",
        image_size=64,
        vae="kl-f4",
        vae_steps=1200,
        vae_batch_size=32,
        text_encoder="minilm",
        text_encoder_policy="frozen",
        max_text_tokens=256,
        num_tokens=77,
        cross_attention_dim=128,
        squeeze={"width": 128, "num_layers": 2, "num_heads": 4, "embed_dim": 128},
        image_tower={"block_out_channels": (32, 64, 128), "embed_dim": 128, "norm_num_groups": 8},
        unet=_unet((32, 64, 128), (False, True, True), layers_per_block=2, attention_heads=4, norm_num_groups=8),
        scratch_text=_SCRATCH_TEXT,
    ),
    # 128 px -> 4 x 32 x 32 latents (the latent shape of the paper's 256 px SD-VAE setting); attention at
    # 8 x 8 and 4 x 4. About 1 GFLOP a denoising step: the one-hour 2-core budget.
    "phantom-128": GeneratorConfig(
        name="phantom-128",
        image_size=128,
        vae="kl-f4",
        vae_steps=1000,
        vae_batch_size=16,
        vae_crop_size=64,
        text_encoder="minilm",
        text_encoder_policy="frozen",
        max_text_tokens=256,
        num_tokens=77,
        cross_attention_dim=128,
        squeeze={"width": 128, "num_layers": 2, "num_heads": 4, "embed_dim": 128},
        image_tower={"block_out_channels": (32, 64, 128), "embed_dim": 128, "norm_num_groups": 8},
        unet=_unet(
            (32, 64, 128, 128), (False, False, True, True), layers_per_block=1, attention_heads=4, norm_num_groups=8
        ),
        scratch_text=_SCRATCH_TEXT,
    ),
    "paper-256": _PAPER_256,
    # The paper's networks at 512 px. Convolutions and attention do not depend on the image size, so the UNet is
    # paper-256's (its weights load here); on 4 x 64 x 64 latents its cross-attention levels sit at 32 x 32,
    # 16 x 16 and 8 x 8, and a denoising step costs about 4x paper-256's.
    "paper-512": dataclasses.replace(_PAPER_256, name="paper-512", image_size=512),
}


def get_config(name: str) -> GeneratorConfig:
    if name not in GENERATOR_CONFIGS:
        raise InputError(f"Unknown generator config {name!r}; choose one of: {', '.join(GENERATOR_CONFIGS)}")
    return GENERATOR_CONFIGS[name]


def resolve_config(section: GeneratorSettings) -> GeneratorConfig:
    """The registered config of ``section.config`` with the section's non-``None`` overrides applied."""
    base = get_config(section.config)
    overrides = {
        key: getattr(section, key)
        for key in (
            "vae",
            "text_encoder",
            "text_encoder_policy",
            "num_tokens",
            "prediction_type",
        )
        if getattr(section, key) is not None
    }
    # A pretrained encoder named without a policy defaults to frozen, the scratch encoder to train.
    if "text_encoder" in overrides and "text_encoder_policy" not in overrides:
        overrides["text_encoder_policy"] = "train" if overrides["text_encoder"] == "scratch" else "frozen"
    return dataclasses.replace(base, **overrides) if overrides else base


def vae_downsample_factor_of(config: GeneratorConfig) -> int | None:
    """The VAE's downsampling factor when it is a registry entry (trained here), else ``None`` (known on load)."""
    from diffcxr_aug.generator.vae import VAE_CONFIGS, downsample_factor

    if config.vae in VAE_CONFIGS:
        return downsample_factor(VAE_CONFIGS[config.vae]["block_out_channels"])
    return None


def build_unet(
    config: GeneratorConfig, latent_channels: int = 4, latent_size: int | None = None
) -> UNet2DConditionModel:
    """A randomly initialised ``UNet2DConditionModel`` for ``config`` (SD geometry when ``latent_size`` is None:
    the pretrained SD VAE has factor 8)."""
    from diffusers import UNet2DConditionModel

    if latent_size is None:
        factor = vae_downsample_factor_of(config) or 8
        latent_size = config.image_size // factor
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        cross_attention_dim=config.cross_attention_dim,
        **config.unet,
    )


def denoising_step_flops(unet: UNet2DConditionModel, num_tokens: int, adapter: Any | None = None) -> int:
    """FLOPs of one denoising step: one UNet forward at batch 1 with ``num_tokens`` condition tokens (and, with a
    DKIM ``adapter``, its forward on as many knowledge tokens, whose residuals the UNet adds).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (multiply and add counted separately, so
    FLOPs = 2 x MACs; matmuls and convolutions only). With classifier-free guidance a sampler step runs
    this twice. The count is taken on the meta device when the model lives there (no memory, no compute).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    param = next(unet.parameters())
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    sample = torch.zeros(1, unet.config.in_channels, *size, device=param.device, dtype=param.dtype)
    context = torch.zeros(1, num_tokens, unet.config.cross_attention_dim, device=param.device, dtype=param.dtype)
    timestep = torch.tensor([500], device=param.device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        residuals = {}
        if adapter is not None:
            down, mid = adapter(sample, timestep, encoder_hidden_states=context, return_dict=False)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        unet(sample, timestep, encoder_hidden_states=context, **residuals)
    return int(counter.get_total_flops())


def config_flops(config: GeneratorConfig) -> dict[str, float]:
    """GFLOPs of one denoising step and the UNet's parameter count, for a registered config (built on meta)."""
    import torch

    with torch.device("meta"):
        unet = build_unet(config)
    flops = denoising_step_flops(unet, config.num_tokens)
    return {
        "gflops_per_step": flops / 1e9,
        "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "latent_size": unet.config.sample_size,
    }
