"""Process-level settings shared by every command: device choice and logging."""

from __future__ import annotations

import contextlib
import logging
import os
import re

import torch

from diffcxr_aug.errors import InputError
from diffcxr_aug.types import DEVICES


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


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 autocast can pay."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_mixed_precision(choice: str, device: torch.device, cpu_auto: str = "no") -> str:
    """``auto|no|bf16|fp16`` -> the precision to use on ``device``.

    ``auto`` is bf16 on a GPU that supports it; on a CPU it is ``cpu_auto`` when the CPU has native bf16
    (callers pass ``"bf16"`` where they measured bf16 autocast to be faster on such a CPU) and ``no`` otherwise.
    An explicit choice is kept, except fp16 on a CPU, which autocast does not support there.
    """
    if choice == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        return cpu_auto if device.type == "cpu" and cpu_has_bf16() else "no"
    if choice not in ("no", "bf16", "fp16"):
        raise InputError(f"Unknown mixed precision {choice!r}; choose one of: auto, no, bf16, fp16")
    if choice == "fp16" and device.type == "cpu":
        raise InputError("mixed precision fp16 needs a GPU; on a CPU use bf16 (or auto)")
    return choice


def attention_backend_name(choice: str, device: torch.device) -> str:
    """``auto|math|default`` -> the scaled-dot-product attention backend used on ``device``: auto is math on a CPU."""
    if choice == "auto":
        choice = "math" if device.type == "cpu" else "default"
    if choice == "math" and _math_attention() is None:  # torch < 2.3 cannot choose
        return "default"
    return choice


def _math_attention() -> contextlib.AbstractContextManager | None:
    """The math-backend context of ``torch.nn.attention.sdpa_kernel`` (torch >= 2.3), else ``None``."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    return sdpa_kernel([SDPBackend.MATH])


def attention_backend(choice: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Scaled-dot-product attention's math backend (``math``, and ``auto`` on a CPU), or torch's own choice.

    On a CPU torch picks its flash kernel, whose backward alone was 22% of a bf16 phantom-128 training step on the
    project's 2-core AVX512-BF16 box; the math backend (plain matmuls, which bf16 autocast runs natively) made that
    step 1.3x faster, and the fp32 step 1.05x (``bench/perf.py``). Its memory grows with the square of the latent
    tokens, which a CPU-sized model keeps small; on a GPU ``auto`` keeps torch's flash / memory-efficient kernels.
    """
    if attention_backend_name(choice, device) == "default":
        return contextlib.nullcontext()
    return _math_attention()


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Third-party chatter (HTTP retries, tokenizer fork warnings) hides the messages users need.
    for noisy in ("urllib3", "httpx", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
