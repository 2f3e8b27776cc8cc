"""Classifiers are plain timm models built by name, single-channel, with timm's own data config.

Any name ``timm.list_models()`` knows works. ``pretrained=True`` loads the model's default weights
(timm fetches them from the Hugging Face hub or finds them in the local hub cache); offline, point
``pretrained_file`` at a local weights file instead. timm adapts a three-channel stem to one channel
(``in_chans=1`` sums the RGB filters) and drops a classifier head whose size does not match.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.data import resolve_data_config

from diffcxr_aug.errors import InputError, MissingInputError
from diffcxr_aug.io import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

MODEL_CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ClassifierConfig:
    """Everything needed to rebuild a trained classifier and feed it images, saved beside its weights."""

    model: str
    label_names: list[str]
    image_size: int
    mean: float
    std: float
    in_chans: int = 1


def create_classifier(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    pretrained_file: str | os.PathLike | None = None,
    in_chans: int = 1,
) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=..., num_classes=..., in_chans=...)`` with clear errors.

    Args:
        name: any timm model name (``resnet18``, ``densenet121``, ``convnext_tiny`` ...).
        num_classes: one output per label.
        pretrained: load the model's default pretrained weights.
        pretrained_file: a local weights file (``.safetensors``, ``.pth`` or ``.bin``) to use as the
            pretrained weights, for machines without hub access. Implies ``pretrained``.
        in_chans: input channels; 1 for radiographs.
    """
    if not timm.is_model(name):
        raise InputError(
            f"Unknown timm model {name!r}; any name from timm.list_models() works, e.g. resnet18, densenet121"
        )
    kwargs = {}
    if pretrained_file is not None:
        pretrained_file = Path(pretrained_file)
        if not pretrained_file.is_file():
            raise MissingInputError(f"pretrained_file {pretrained_file}: no such file")
        pretrained = True
        # timm reads weights from a local file when the pretrained config names one.
        kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if not pretrained:
            raise
        raise InputError(
            f"Could not load pretrained weights for {name!r} ({err}). Offline, download them once into the "
            "Hugging Face cache, pass a local weights file (classifier.pretrained_file), or train from "
            "random initialisation (--no-pretrained)."
        ) from err


def data_config(model: torch.nn.Module, image_size: int | None = None) -> dict:
    """timm's data config (``input_size``, ``mean``, ``std`` ...) for a single-channel model.

    ``image_size`` overrides the model's default input size. timm's means and standard deviations are
    per RGB channel; for one channel they are averaged, matching ``in_chans=1`` summing the RGB filters
    (a grey image is the same value in all three channels).
    """
    args = {"img_size": int(image_size)} if image_size is not None else {}
    config = resolve_data_config(args, model=model)
    in_chans = getattr(model, "in_chans", None) or _first_conv_in_channels(model)
    if in_chans == 1:
        config["mean"] = (float(sum(config["mean"]) / len(config["mean"])),)
        config["std"] = (float(sum(config["std"]) / len(config["std"])),)
        config["input_size"] = (1, *config["input_size"][1:])
    return config


def _first_conv_in_channels(model: torch.nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module.in_channels
    return 3


def save_classifier(model: torch.nn.Module, config: ClassifierConfig, folder: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``folder``, each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage or are views; contiguous copies are always accepted.
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_NAME, suffix=".safetensors") as tmp:
        save_file(state, str(tmp))
    atomic_write_json(folder / MODEL_CONFIG_NAME, asdict(config))
    return folder


def load_classifier(
    folder: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, ClassifierConfig]:
    """Rebuild a classifier saved by :func:`save_classifier` (architecture from its config, no pickle)."""
    folder = Path(folder)
    config_path, weights_path = folder / MODEL_CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise MissingInputError(f"{path}: missing; pass a folder written by save_classifier")
    config = ClassifierConfig(**json.loads(config_path.read_text(encoding="utf-8")))
    model = timm.create_model(
        config.model, pretrained=False, num_classes=len(config.label_names), in_chans=config.in_chans
    )
    model.load_state_dict(load_file(str(weights_path), device=str(device)))
    return model.to(device), config
