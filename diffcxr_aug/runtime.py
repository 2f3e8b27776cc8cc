"""Process-level settings shared by every command: device choice and logging."""

from __future__ import annotations

import contextlib
import logging
import os
import re

import torch

from diffcxr_aug.errors import InputError
from diffcxr_aug.types import CUDA_DEVICE_PATTERN, DEVICES

# A resolved mixed precision and the dtype autocast runs in (None: fp32, no autocast).
PRECISION_DTYPES: dict[str, torch.dtype | None] = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """Map ``auto|cpu|cuda[:N]`` onto a ``torch.device``; ``cuda`` without a GPU is an error, not a fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if re.fullmatch(CUDA_DEVICE_PATTERN, device):
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


def cuda_has_bf16(device: torch.device) -> bool:
    """Whether the GPU runs bf16 natively (compute capability 8.0 and later: A100, L40S, H100, ...).

    ``torch.cuda.is_bf16_supported()`` also says yes for a V100 or a T4, where bf16 is emulated and slower than fp16;
    on ROCm it is asked as it is.
    """
    if torch.version.hip is not None:
        return torch.cuda.is_bf16_supported()
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_mixed_precision(choice: str, device: torch.device, cpu_auto: str = "no") -> str:
    """``auto|no|bf16|fp16`` -> the precision to use on ``device``.

    ``auto`` is bf16 on a GPU that runs it natively and fp16 on one that does not (V100, T4: their tensor cores
    are fp16's; training then scales the loss). On a CPU it is ``cpu_auto`` when the CPU has native bf16 (callers
    pass ``"bf16"`` where they measured bf16 autocast to be faster on such a CPU) and ``no`` otherwise. An explicit
    choice is kept, except fp16 on a CPU, which autocast does not support there.
    """
    if choice == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_has_bf16(device) else "fp16"
        return cpu_auto if device.type == "cpu" and cpu_has_bf16() else "no"
    if choice not in PRECISION_DTYPES:
        raise InputError(f"Unknown mixed precision {choice!r}; choose one of: auto, {', '.join(PRECISION_DTYPES)}")
    if choice == "fp16" and device.type == "cpu":
        raise InputError("mixed precision fp16 needs a GPU; on a CPU use bf16 (or auto)")
    if choice == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(f"mixed precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16 or auto")
    return choice


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to a resolved ``precision`` (``no``, ``bf16``, ``fp16``) on ``device``; ``no`` runs in fp32."""
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"Unknown mixed precision {precision!r}; choose one of: {', '.join(PRECISION_DTYPES)}")
    dtype = PRECISION_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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
