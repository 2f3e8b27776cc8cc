"""Training checkpoints: ``OUT/checkpoints/checkpoint-<step>/``, what each holds, which one ``--resume`` continues
from, and keeping the newest ``checkpoints_total_limit``.

A checkpoint folder holds ``trainable.safetensors`` (the weights that train: all of stage 1, the adapter in stage 2),
``training_state.pt`` (optimizer, LR schedule and EMA, read back with ``weights_only=True``), ``state.json`` (step,
architecture, seed, AVA-TLS switch, settings, process count, wall time) and, for a scratch text encoder, its
``tokenizer/``. It is written into a temporary folder renamed into place, so a killed run leaves no half checkpoint.

Why not accelerate's ``save_state``/``load_state`` with ``ProjectConfiguration(automatic_checkpoint_naming=True,
total_limit=N)``: tried on accelerate 1.16, it names folders ``checkpoint_<number of saves>`` rather than
``checkpoint-<step>`` (so ``--resume latest``, the step in the name and the resume tests' layout would change), saves
the frozen stage-1 weights of a stage-2 run too, reads the registered EMA back by unpickling
(``weights_only=False``), sets the global random state on load, and records none of the metadata above; and its
``skip_first_batches`` skips a ``DataLoader``, which the loop has none of (each micro-step's rows and noise are
drawn from ``(seed, micro-step, rank)`` by :class:`~diffcxr_aug.generator.batches.BatchStream`, so resuming needs no
skipping at all).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from diffcxr_aug.errors import InputError, MissingInputError, OutputInUseError
from diffcxr_aug.io import atomic_write_json

if TYPE_CHECKING:
    from diffcxr_aug.generator.objective import DiffusionObjective

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_STATE = "state.json"
CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_TRAINING_STATE = "training_state.pt"


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``out/checkpoints``, oldest first."""
    folder = Path(out) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if suffix.isdigit() and (path / CHECKPOINT_STATE).is_file():
            found.append((int(suffix), path))
    return [p for _, p in sorted(found)]


def resolve_resume(out: Path, resume: str | os.PathLike | None) -> Path | None:
    """The checkpoint to continue from: ``None`` (fresh start), ``latest`` or a checkpoint folder."""
    existing = list_checkpoints(out)
    if resume is None:
        if existing:
            raise OutputInUseError(
                f"{out} already holds checkpoints (latest {existing[-1].name}); pass --resume latest to continue "
                "that run, or choose another --out"
            )
        return None
    if str(resume) == "latest":
        if not existing:
            logger.info("No checkpoint in %s: starting from scratch", out / CHECKPOINTS_DIR)
            return None
        return existing[-1]
    path = Path(resume)
    if not (path / CHECKPOINT_STATE).is_file():
        raise MissingInputError(
            f"--resume {resume}: not a checkpoint folder (no {CHECKPOINT_STATE}); pass 'latest' or one of "
            f"{[p.name for p in existing] or 'the checkpoint-N folders under OUT/checkpoints'}"
        )
    return path


def read_checkpoint_state(checkpoint: Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint: its step and what the run recorded (architecture, seed, ...)."""
    return json.loads((checkpoint / CHECKPOINT_STATE).read_text())


def save_checkpoint(
    out: Path,
    step: int,
    objective: DiffusionObjective,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    ema: Any,
    state: dict[str, Any],
    tokenizer: Any | None,
    total_limit: int | None,
) -> Path:
    """Write ``checkpoints/checkpoint-{step}`` atomically (a temporary folder renamed into place), then delete all but
    the newest ``total_limit`` checkpoints."""
    from safetensors.torch import save_file

    folder = out / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{step}"
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    keep = set(objective.checkpoint_keys())
    weights = {k: v.detach().contiguous().cpu() for k, v in objective.state_dict().items() if k in keep}
    save_file(weights, tmp / CHECKPOINT_WEIGHTS)
    torch.save(
        {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(), "ema": ema.state_dict()},
        tmp / CHECKPOINT_TRAINING_STATE,
    )
    if tokenizer is not None:  # the scratch encoder's tokenizer was learned from the data: keep it
        tokenizer.save_pretrained(tmp / "tokenizer")
    atomic_write_json(tmp / CHECKPOINT_STATE, {**state, "step": step})
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    if total_limit is not None:
        for old in list_checkpoints(out)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_trainable(objective: DiffusionObjective, checkpoint: Path) -> None:
    """Load a checkpoint's weights: all of the objective (stage 1) or the modules that train (stage 2)."""
    from safetensors.torch import load_file

    path = checkpoint / CHECKPOINT_WEIGHTS
    saved = load_file(path, device="cpu")
    missing, unexpected = objective.load_state_dict(saved, strict=False)
    expected = set(objective.checkpoint_keys())
    if unexpected or expected - set(saved):
        raise InputError(
            f"{path}: its weights do not match what this run trains (missing {sorted(expected - set(saved))[:3]}, "
            f"unexpected {unexpected[:3]}); it was written by another version or stage; start a fresh run in "
            "another --out"
        )


def load_training_state(checkpoint: Path, optimizer: torch.optim.Optimizer, lr_scheduler: Any, ema: Any) -> None:
    """Restore the optimizer, the LR schedule and the EMA a checkpoint saved."""
    state = torch.load(checkpoint / CHECKPOINT_TRAINING_STATE, map_location="cpu", weights_only=True)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:
        # e.g. an AVA-TLS-off run saved before its unused pooled projection was frozen: other trainable set.
        raise InputError(
            f"--resume {checkpoint}: its optimizer state does not match the parameters this version trains "
            f"({err}). It was written by another version of diffcxr-aug; finish it with that version, or start "
            "a fresh run in another --out."
        ) from err
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    ema.load_state_dict(state["ema"])
