"""The ``accelerate.Accelerator`` a training run uses (:func:`start_accelerator`): its device and mixed precision,
with accelerate's one-precision-a-process rule lifted between runs in one process."""

from __future__ import annotations

import os
from typing import Any

import torch

from diffcxr_aug.runtime import resolve_device, resolve_mixed_precision


def start_accelerator(device: str, mixed_precision: str) -> tuple[Any, str]:
    """An ``Accelerator`` on ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) and the resolved mixed precision."""
    from accelerate import Accelerator

    resolved = resolve_device(device)  # validates, and fails clearly on 'cuda' without a GPU
    if resolved.type == "cuda" and resolved.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(resolved)
    # auto is bf16 on a CPU with native bf16 too: the phantom-128 step is 1.8x faster there, loss unchanged
    # (bench/perf.py; docs/results/perf).
    mixed_precision = resolve_mixed_precision(mixed_precision, resolved, cpu_auto="bf16")
    _forget_other_precision(mixed_precision)
    return Accelerator(cpu=resolved.type == "cpu", mixed_precision=mixed_precision), mixed_precision


def _forget_other_precision(mixed_precision: str) -> None:
    """Let a second run in one process (a notebook, a sweep, the test suite) use another precision.

    accelerate keeps one ``AcceleratorState`` a process and refuses an ``Accelerator`` whose precision differs from
    the first one's. Between two runs nothing of that state is in use, so its precision part is dropped (the
    process-group part, ``PartialState``, is kept), the way accelerate's own test utilities do between tests.
    """
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or not hasattr(AcceleratorState, "_reset_state"):
        return  # launched processes run one training each; and an accelerate without the hook keeps its rule
    state = getattr(AcceleratorState, "_shared_state", None)
    if state and str(state.get("_mixed_precision", mixed_precision)) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
