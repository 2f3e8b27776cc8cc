"""The ``accelerate.Accelerator`` a training run uses (:func:`start_accelerator`): its device and mixed precision,
with accelerate's one-precision-a-process rule lifted between runs in one process; and fp16's loss-scaler state,
which checkpoints carry (:func:`scaler_state`, :func:`restore_scaler`)."""

from __future__ import annotations

import os
from typing import Any

import torch

from diffcxr_aug.runtime import resolve_device, resolve_mixed_precision

# The checkpoint's state.json key of fp16's GradScaler state (the loss scale and its growth tracker).
GRAD_SCALER_KEY = "grad_scaler"


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


def scaler_state(accelerator: Any) -> dict[str, Any]:
    """fp16's GradScaler state for a checkpoint's ``state.json`` (nothing in bf16 and fp32, which scale no loss)."""
    return {} if accelerator.scaler is None else {GRAD_SCALER_KEY: accelerator.scaler.state_dict()}


def restore_scaler(accelerator: Any, state: dict[str, Any]) -> None:
    """fp16: the loss scale and its growth count of the checkpoint resumed, so that the resumed run skips and scales
    the steps the uninterrupted one does."""
    if accelerator.scaler is not None and state.get(GRAD_SCALER_KEY):
        accelerator.scaler.load_state_dict(state[GRAD_SCALER_KEY])
