"""What a trained pipeline folder (``train-generator``'s ``--out``) says about itself without loading its weights:
its identity, the image size it generates, whether it is a DKIM (stage-2) model, and its sampling cost."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from diffcxr_aug.generator.prompts import file_sha256


def component_config(generator: Path, component: str) -> dict[str, Any]:
    """The saved config of one pipeline component (``unet``, ``vae``, ``scheduler``, ``adapter``, ...)."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((generator / component / name).read_text())


def generator_id(generator: Path) -> str:
    """``<folder name>@<sha256 prefix>`` over every file of the pipeline's components (weights, configs,
    tokenizer): it changes when the generator is trained further or replaced in the same folder."""
    index = json.loads((generator / "model_index.json").read_text())
    digest = hashlib.sha256((generator / "model_index.json").read_bytes())
    for component, spec in sorted(index.items()):
        if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        for path in sorted(p for p in (generator / component).rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(generator)).encode())
            digest.update(file_sha256(path).encode())
    return f"{generator.name}@{digest.hexdigest()[:16]}"


def generator_image_size(generator: Path) -> int:
    """Image side the pipeline generates: the UNet's latent size times the VAE's downsampling factor."""
    unet, vae = component_config(generator, "unet"), component_config(generator, "vae")
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def has_adapter(generator: Path) -> bool:
    """Whether the pipeline folder holds a DKIM adapter (a stage-2 model)."""
    index = json.loads((generator / "model_index.json").read_text())
    return (index.get("adapter") or [None])[0] is not None and (generator / "adapter").is_dir()


def sampling_gflops(generator: Path, steps: int, guidance: float) -> dict[str, float]:
    """GFLOPs of one denoising step (a UNet pass at batch 1, and the DKIM adapter's when the folder has one, counted
    on the meta device) and of one image
    (``steps`` of them, twice each with classifier-free guidance); the VAE decode is not counted."""
    from diffusers import UNet2DConditionModel

    from diffcxr_aug.generator.configs import denoising_step_flops
    from diffcxr_aug.generator.disease_adapter import DiseaseKnowledgeAdapter

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(component_config(generator, "unet"))
        adapter = (
            DiseaseKnowledgeAdapter.from_config(component_config(generator, "adapter"))
            if has_adapter(generator)
            else None
        )
    num_tokens = int(component_config(generator, "token_squeeze")["num_tokens"])
    per_step = denoising_step_flops(unet, num_tokens, adapter) / 1e9
    return {"gflops_per_denoising_step": per_step, "gflops_per_image": per_step * steps * (2 if guidance > 1 else 1)}
