"""Compute of a synthetic set: what the generator's ``training_info.json`` and the job's ``synthesis.json``
recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def compute_summary(synthetic_dir: Path) -> dict[str, Any]:
    """Training and sampling cost, as far as the generator and the synthesis job recorded them."""
    job = _read_json(synthetic_dir / "synthesis.json") or {}
    keys = ("steps", "guidance", "n", "seconds", "images_timed", "images_per_second", "device")
    summary: dict[str, Any] = {key: job[key] for key in keys if key in job}
    generator = job.get("generator")
    info = _read_json(Path(generator) / "training_info.json") if generator else None
    if info:
        summary["generator"] = {
            "folder": generator,
            "config": info.get("config", {}).get("name"),
            "ava_tls": info.get("ava_tls"),
            "training_steps": info.get("steps"),
            # Every invocation that led to the weights; older folders only recorded the last one.
            "training_wall_minutes": info.get("wall_minutes_total", info.get("wall_minutes_this_invocation")),
            "training_wall_minutes_is_total": info.get("wall_minutes_total") is not None,
            "resumed_from_step": info.get("resumed_from_step"),
            "gflops_per_denoising_step": info.get("gflops_per_denoising_step"),
            "unet_params": info.get("unet_params"),
            "train_images": info.get("train_images"),
            "data": info.get("data"),
            "device": info.get("device"),
            "stage": info.get("stage", 1),
        }
        if info.get("stage") == 2:  # a DKIM model: its stage-1 model's cost too
            stage1 = _read_json(Path(info["dkim"]["stage1"]) / "training_info.json") or {}
            summary["generator"].update(
                stage1_folder=info["dkim"]["stage1"],
                stage1_training_steps=stage1.get("steps"),
                stage1_training_wall_minutes=stage1.get("wall_minutes_total"),
            )
        gflops = info.get("gflops_per_denoising_step")
        if gflops and "steps" in job:
            # Classifier-free guidance runs the UNet on the prompt and on the empty prompt at every step.
            passes = 2 if job.get("guidance", 0) > 1 else 1
            summary["gflops_per_image"] = float(gflops) * int(job["steps"]) * passes
    return summary
