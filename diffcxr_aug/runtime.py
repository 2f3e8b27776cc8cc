"""Process-level settings shared by every command: device choice and logging."""

from __future__ import annotations

import logging
import os
import re

import torch

from diffcxr_aug.config import DEVICES
from diffcxr_aug.errors import InputError


def resolve_device(device: str) -> torch.device:
    """Map ``auto|cpu|cuda[:N]`` onto a ``torch.device``; ``cuda`` without a GPU is an error, not a fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {device} was asked for, but torch sees no CUDA device; use --device cpu or auto"
            )
        return torch.device(device)
    raise InputError(f"Unknown device {device!r}; choose one of: {', '.join(DEVICES)}")


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Third-party chatter (HTTP retries, tokenizer fork warnings) hides the messages users need.
    for noisy in ("urllib3", "httpx", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
