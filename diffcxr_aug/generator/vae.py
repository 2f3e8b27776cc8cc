"""The latent space: a diffusers ``AutoencoderKL``, pretrained (SD VAE) or trained here on the manifest.

Diff-CXR works in the latent space of the Stable Diffusion VAE (256 px images -> 4 x 32 x 32 latents).
For real work load that VAE by hub id or local path with :func:`load_vae`; offline, :func:`train_vae`
fits a small KL-VAE from the registry :data:`VAE_CONFIGS` on the manifest itself and reports its
reconstruction PSNR/SSIM on the validation split.

Images enter and leave this module as ``(B, 1, H, W)`` floats in [0, 1]. A VAE with three input
channels (every SD VAE) gets the grey channel repeated, and its three output channels are averaged.
Latents are always returned multiplied by ``vae.config.scaling_factor`` (unit variance, as diffusion
expects), and :func:`decode` divides it back out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffcxr_aug.data.dataset import CXRDataset
from diffcxr_aug.data.manifest import Manifest
from diffcxr_aug.errors import InputError, MissingInputError
from diffcxr_aug.io import atomic_write_json
from diffcxr_aug.runtime import autocast, resolve_device, resolve_mixed_precision

logger = logging.getLogger(__name__)

SD_VAE_ID = "stabilityai/sd-vae-ft-mse"

# Registered architectures for VAEs trained here (downsampling factor: see downsample_factor).
VAE_CONFIGS: dict[str, dict[str, Any]] = {
    # Tests only: a few thousand parameters, factor 2.
    "tiny": {
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "mid_block_add_attention": False,
    },
    # Factor 4: 64 px -> 4 x 16 x 16, 128 px -> 4 x 32 x 32 (the latent shape of the paper's 256 px setting).
    # Narrow on purpose: the full-resolution layers dominate the cost, and this trains on 2 CPU cores
    # (128 px, batch 16: about 0.9 s a step).
    "kl-f4": {
        "block_out_channels": (16, 32, 64),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "mid_block_add_attention": False,
    },
    # Factor 8, the Stable Diffusion geometry at a small width (256 px -> 4 x 32 x 32).
    "kl-f8": {
        "block_out_channels": (16, 32, 64, 64),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "mid_block_add_attention": False,
    },
    # Factor 4 at 2x width, for a GPU.
    "kl-f4-wide": {
        "block_out_channels": (32, 64, 128),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 16,
        "mid_block_add_attention": True,
    },
}


# Training settings of a registered VAE that is not the generator config's own (that config carries its own).
VAE_TRAINING_DEFAULTS = {"steps": 1000, "batch_size": 32}


@dataclass(frozen=True)
class VAEPlan:
    """A recipe's latent space: a pretrained VAE to load (``pretrained``), or a registered one to train.

    Made by :func:`plan_vae` from the recipe's ``vae`` section and the generator config; the ``train-vae`` step,
    ``filter`` and ``train-generator`` all read this one plan, so they share one VAE.
    """

    pretrained: str | None
    config: str | None
    size: int
    steps: int
    batch_size: int
    crop_size: int | None

    def train(self, manifest: Manifest, out: str | os.PathLike, device: str, seed: int, progress: bool = True):
        """Train (or, when ``out`` holds it already, load) the planned VAE on ``manifest``; ``(vae, metrics)``."""
        if self.pretrained is not None:
            raise InputError(f"the recipe's VAE is pretrained ({self.pretrained}): there is nothing to train")
        return train_vae(
            manifest,
            out,
            config=self.config,
            size=self.size,
            steps=self.steps,
            batch_size=self.batch_size,
            crop_size=self.crop_size,
            device=device,
            seed=seed,
            progress=progress,
        )


def plan_vae(section: Any, generator: Any) -> VAEPlan:
    """The VAE of a recipe's ``vae`` section (a :class:`~diffcxr_aug.config.VAESettings`), its ``None`` keys
    taken from the generator config (a :class:`~diffcxr_aug.generator.configs.GeneratorConfig`)."""
    pretrained = section.pretrained
    config = section.config
    if pretrained is None and config is None:  # the generator config's own choice
        pretrained, config = (None, generator.vae) if generator.vae in VAE_CONFIGS else (generator.vae, None)
    if config is not None and config not in VAE_CONFIGS:
        raise InputError(
            f"vae.config {config!r} is not a registered VAE ({', '.join(VAE_CONFIGS)}); a pretrained hub id or "
            "folder goes in vae.pretrained"
        )
    # The generator config's training settings are for its own VAE; another architecture starts from train_vae's.
    own = config == generator.vae
    defaults = {
        "steps": generator.vae_steps if own else VAE_TRAINING_DEFAULTS["steps"],
        "batch_size": generator.vae_batch_size if own else VAE_TRAINING_DEFAULTS["batch_size"],
        "crop_size": generator.vae_crop_size if own else None,
    }
    return VAEPlan(
        pretrained=pretrained,
        config=None if pretrained is not None else config,
        size=section.size or generator.image_size,
        steps=section.steps or defaults["steps"],
        batch_size=section.batch_size or defaults["batch_size"],
        crop_size=section.crop_size if section.crop_size is not None else defaults["crop_size"],
    )


def build_vae(name: str = "kl-f4", sample_size: int = 64) -> AutoencoderKL:
    """A randomly initialised single-channel KL-VAE from the registry."""
    if name not in VAE_CONFIGS:
        raise InputError(f"Unknown VAE config {name!r}; choose one of: {', '.join(VAE_CONFIGS)}")
    cfg = dict(VAE_CONFIGS[name])
    depth = len(cfg["block_out_channels"])
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        sample_size=sample_size,
        scaling_factor=1.0,  # replaced by the measured latent std after training
        **cfg,
    )


def load_vae(
    name_or_path: str | os.PathLike,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
) -> AutoencoderKL:
    """Load a pretrained ``AutoencoderKL`` from a hub id (e.g. ``stabilityai/sd-vae-ft-mse``) or a local folder.

    A pipeline folder works too: its ``vae/`` subfolder is used when ``subfolder`` is not given.
    """
    path = Path(name_or_path)
    if subfolder is None and path.is_dir() and not (path / "config.json").is_file() and (path / "vae").is_dir():
        subfolder = "vae"
    if local_files_only is None:
        local_files_only = path.exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return AutoencoderKL.from_pretrained(
            str(name_or_path), subfolder=subfolder, cache_dir=cache_dir, local_files_only=local_files_only
        )
    except OSError as err:
        raise MissingInputError(
            f"Cannot load a VAE from {name_or_path!r} ({err}). Pass a local folder written by save_pretrained, "
            "or a hub id with internet access (or in the local HF cache)."
        ) from err


def downsample_factor(block_out_channels: Sequence[int]) -> int:
    """Image side / latent side of a KL-VAE with these encoder blocks (every block but the last halves the side)."""
    return 2 ** (len(block_out_channels) - 1)


def vae_downsample_factor(vae: AutoencoderKL) -> int:
    return downsample_factor(vae.config.block_out_channels)


def _to_vae_input(images: torch.Tensor, vae: AutoencoderKL) -> torch.Tensor:
    x = images * 2.0 - 1.0
    if vae.config.in_channels != x.shape[1]:
        x = x.expand(-1, vae.config.in_channels, -1, -1)
    return x.to(dtype=vae.dtype)


def _from_vae_output(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 1:
        x = x.mean(dim=1, keepdim=True)
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def encode(
    vae: AutoencoderKL, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``(B, 1, H, W)`` images in [0, 1] -> scaled latents (posterior mean, or a sample with ``sample=True``)."""
    posterior = vae.encode(_to_vae_input(images, vae)).latent_dist
    latents = posterior.sample(generator=generator) if sample else posterior.mean
    shift = vae.config.shift_factor or 0.0
    return (latents - shift) * vae.config.scaling_factor


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> ``(B, 1, H, W)`` images in [0, 1]."""
    shift = vae.config.shift_factor or 0.0
    return _from_vae_output(vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample)


@torch.no_grad()
def encode_manifest(
    vae: AutoencoderKL,
    manifest: Manifest,
    size: int,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    progress: bool = True,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Posterior-mean latents of every row of ``manifest`` (in row order), as a CPU float tensor; ``transform``
    applies to each image first (e.g. :func:`~diffcxr_aug.data.dataset.equalize`)."""
    device = resolve_device(device) if isinstance(device, str) else device
    vae = vae.to(device).eval()
    dataset = CXRDataset(manifest, size, transform=transform, progress=progress)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    chunks = []
    for batch in tqdm(loader, desc="encoding latents", disable=not progress, unit="batch"):
        chunks.append(encode(vae, batch["image"].to(device)).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)


@torch.no_grad()
def evaluate_vae(
    vae: AutoencoderKL, manifest: Manifest, size: int, batch_size: int = 64, device: str | torch.device = "auto"
) -> dict[str, float]:
    """Reconstruction PSNR and SSIM (torchmetrics, data range [0, 1]) over a manifest (e.g. the val split)."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    device = resolve_device(device) if isinstance(device, str) else device
    vae = vae.to(device).eval()
    # sync_on_compute=False: under torchrun only one process evaluates; torchmetrics would otherwise
    # all-gather on compute() and pair up with whatever collective the other processes are waiting in.
    psnr = PeakSignalNoiseRatio(data_range=1.0, sync_on_compute=False).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, sync_on_compute=False).to(device)
    loader = DataLoader(CXRDataset(manifest, size, progress=False), batch_size=batch_size, shuffle=False)
    for batch in loader:
        images = batch["image"].to(device)
        recon = decode(vae, encode(vae, images))
        psnr.update(recon, images)
        ssim.update(recon, images)
    return {"psnr": float(psnr.compute()), "ssim": float(ssim.compute()), "images": len(manifest)}


def _save_atomic(vae: AutoencoderKL, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def train_vae(
    manifest: Manifest,
    out: str | os.PathLike,
    config: str = "kl-f4",
    size: int = 64,
    steps: int = 2000,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-6,
    crop_size: int | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    mixed_precision: str = "auto",
) -> tuple[AutoencoderKL, dict[str, float]]:
    """Fit a small KL-VAE on the train split of ``manifest``, save it to ``out`` and report val PSNR/SSIM.

    The loss is L1 + MSE reconstruction plus a small KL term (the LDM recipe without its perceptual and
    adversarial terms, which need pretrained networks that are not available offline). After training
    the latent scaling factor is set to 1 / std of the training latents, as Rombach et al. do, so the
    diffusion model sees unit-variance latents.

    ``crop_size`` trains on random square crops of that size (a multiple of the downsampling factor)
    instead of whole images, as the LDM autoencoders were trained: the VAE is convolutional, so it encodes
    whole images afterwards, and each step costs (crop_size / size)^2 as much. Validation is on whole images.

    ``mixed_precision``: ``auto`` (bf16 autocast on a GPU that has it and on a CPU with native bf16: on the
    2-core AVX512-BF16 machine a kl-f4 step at 64 px and batch 32 takes about half the fp32 time; see
    ``bench/vae_precision.py``; fp16 on a GPU without bf16), ``no``, ``bf16`` or ``fp16`` (the loss scaled). The loss
    and the optimiser stay in fp32.

    A folder ``out`` that already holds a VAE trained with the same settings (its ``metrics.json``) is loaded
    instead of trained again, so a rerun of an interrupted job does not redo the VAE.
    """
    out = Path(out)
    dev = resolve_device(device)
    precision = resolve_mixed_precision(mixed_precision, dev, cpu_auto="bf16")
    settings = {
        "config": config,
        "size": size,
        "crop_size": crop_size,
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "learning_rate": learning_rate,
        "kl_weight": kl_weight,
        "mixed_precision": precision,
    }
    finished = _finished_vae(out, settings)
    if finished is not None:
        return finished
    # Seed the initialisation without leaving the caller's global random state changed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build_vae(config, sample_size=size)
    latent_shape(vae, size)  # the image side must be a multiple of the downsampling factor
    factor = vae_downsample_factor(vae)
    if crop_size is not None and not (factor <= crop_size <= size and crop_size % factor == 0):
        raise InputError(
            f"crop_size {crop_size} must be a multiple of the VAE's downsampling factor {factor} and at most the "
            f"image size {size}"
        )
    vae = vae.to(dev)
    train = manifest.split("train")
    if len(train) == 0:
        raise InputError(f"{manifest.source}: the train split is empty; cannot train a VAE")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        CXRDataset(train, size, progress=progress),
        batch_size=batch_size,
        shuffle=True,
        drop_last=False,
        generator=generator,
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = one_cycle_schedule(optimizer, learning_rate, steps)
    sample_generator = torch.Generator(device=dev).manual_seed(seed)
    # fp16 (a GPU without bf16) scales the loss so that small gradients do not underflow; bf16 and fp32 need not.
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    step, bar = 0, tqdm(total=steps, desc=f"training VAE {config}", disable=not progress, unit="step")
    vae.train()
    while step < steps:
        for batch in loader:
            images = batch["image"]
            if crop_size is not None and crop_size < size:
                images = random_crops(images, crop_size, generator)
            x = _to_vae_input(images.to(dev), vae)
            with autocast(dev, precision):
                posterior = vae.encode(x).latent_dist
                recon = vae.decode(posterior.sample(generator=sample_generator)).sample.float()
            loss_rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
            loss_kl = posterior.kl().float().mean() / math.prod(x.shape[1:])
            loss = loss_rec + kl_weight * loss_kl * math.prod(x.shape[1:])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix(rec=f"{loss_rec.item():.4f}")
            if step >= steps:
                break
    bar.close()
    vae.eval()
    with torch.no_grad():
        vae.register_to_config(scaling_factor=1.0)
        sample = encode_manifest(
            vae, train.subset(train.frame.index[: min(len(train), 512)]), size, device=dev, progress=False
        )
        std = float(sample.std())
        vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
    val = manifest.split("val")
    metrics = evaluate_vae(vae, val if len(val) else train, size, device=dev)
    metrics.update({**settings, "latent_std": std, "split": "val" if len(val) else "train"})
    _save_atomic(vae.cpu(), out)
    atomic_write_json(out / "metrics.json", metrics)
    logger.info("VAE %s: val PSNR %.2f dB, SSIM %.4f (saved to %s)", config, metrics["psnr"], metrics["ssim"], out)
    return vae, metrics


def _finished_vae(out: Path, settings: dict[str, Any]) -> tuple[AutoencoderKL, dict[str, Any]] | None:
    """The VAE in ``out`` with its metrics, when its ``metrics.json`` records exactly ``settings``."""
    record = out / "metrics.json"
    if not record.is_file():
        return None
    metrics = json.loads(record.read_text(encoding="utf-8"))
    differ = sorted(k for k, v in settings.items() if metrics.get(k) != v)
    if differ:
        logger.info(
            "%s holds a VAE trained with other settings (%s differ): training it again", out, ", ".join(differ)
        )
        return None
    logger.info("%s holds a finished VAE with these settings: loading it instead of training again", out)
    return load_vae(out), metrics


def one_cycle_schedule(
    optimizer: torch.optim.Optimizer, learning_rate: float, steps: int, warmup_share: float = 0.05
) -> torch.optim.lr_scheduler.OneCycleLR:
    """torch's one-cycle schedule over ``steps`` with a ``warmup_share`` warm-up, defined for every ``steps >= 1``.

    torch's warm-up phase ends at step ``warmup_share * steps - 1``. Below ``1 / warmup_share`` steps that is
    negative and torch skips the warm-up (the schedule anneals from the peak); at exactly ``1 / warmup_share``
    steps (20 for 5%) the phase has zero length and torch divides by zero, so that one step count skips the
    warm-up too (through a halved share), as every shorter run does. Every other step count is left unchanged.
    """
    if steps < 1:
        raise InputError(f"the VAE needs at least 1 training step, got {steps}")
    if warmup_share * steps - 1 == 0:
        warmup_share /= 2
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=steps, pct_start=warmup_share
    )


def random_crops(images: torch.Tensor, crop_size: int, generator: torch.Generator) -> torch.Tensor:
    """One random ``crop_size`` square per image of a ``(B, C, H, W)`` batch (positions drawn from ``generator``)."""
    height, width = images.shape[-2:]
    top = torch.randint(0, height - crop_size + 1, (len(images),), generator=generator).tolist()
    left = torch.randint(0, width - crop_size + 1, (len(images),), generator=generator).tolist()
    return torch.stack(
        [image[..., y : y + crop_size, x : x + crop_size] for image, y, x in zip(images, top, left, strict=True)]
    )


def latent_shape(vae: AutoencoderKL, size: int) -> tuple[int, int, int]:
    f = vae_downsample_factor(vae)
    if size % f:
        raise InputError(f"image size {size} is not divisible by the VAE's downsampling factor {f}")
    return (vae.config.latent_channels, size // f, size // f)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 1, H, W)`` in [0, 1] -> ``(B, H, W)`` uint8, for saving PNGs."""
    return (images.squeeze(1).clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
