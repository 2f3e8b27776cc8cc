"""The pipeline folder a training run ends with (step 7 of :mod:`~diffcxr_aug.generator.training`): the EMA weights
as a :class:`~diffcxr_aug.generator.pipeline.DiffCXRPipeline` saved without a half-written state, the image tower,
``training_info.json`` (what was trained, how, and at what cost) and ``README.txt``."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffcxr_aug.generator.configs import PAPER_GFLOPS, GeneratorConfig
from diffcxr_aug.io import atomic_write_json, atomic_write_text
from diffcxr_aug.runtime import attention_backend_name

if TYPE_CHECKING:
    from diffcxr_aug.generator.training_run import TrainingRun

logger = logging.getLogger(__name__)

TRAINING_INFO = "training_info.json"


def save_trained_pipeline(run: TrainingRun, step: int) -> None:
    """7. The pipeline with the EMA weights, and ``training_info.json``. Nothing trained (a rerun of a finished
    job): the pipeline and its training_info.json, with the run's real timing, stay as they are."""
    out = run.out
    if step == run.start_step and (out / "model_index.json").is_file():
        logger.info("%s already trained to step %d; the pipeline folder is up to date", out, step)
        return
    run.ema.copy_to(run.ema_params)
    save_pipeline_folder(run.pipeline(device="cpu"), out)
    if run.tower is not None:
        run.model.image_tower.cpu().save_pretrained(out / "image_tower")
    minutes_this, minutes_total = run.wall_minutes()
    section = run.section
    info = {
        "stage": run.stage,
        "config": run.cfg.to_dict(),
        "ava_tls": run.ava_tls,
        "ava_tls_meaning": "squeeze all report tokens to K with InfoNCE image alignment"
        if run.ava_tls
        else "baseline: the encoder sees the first K tokens, linear projection, no alignment",
        "text_encoder": {
            "source": run.cfg.text_encoder if run.stage == 1 else run.bundle.source,
            "backend": run.bundle.backend,
            "policy": run.cfg.text_encoder_policy if run.stage == 1 else "frozen",
            "max_length": run.text_max_length,
            "train_reports_truncated": run.truncated,
        },
        "vae": run.vae_info,
        "unet_params": run.unet_params,
        "gflops_per_denoising_step": run.flops / 1e9,
        "paper_gflops": PAPER_GFLOPS,
        "steps": step,
        "stopped_by_time_limit": step < run.max_steps,
        # Wall clock of this invocation (VAE training included), and of every invocation that led to these
        # weights (None when resumed from a checkpoint that did not record it).
        "wall_minutes_this_invocation": minutes_this,
        "wall_minutes_total": minutes_total,
        "resumed_from_step": run.start_step,
        "seed": run.seed,
        "num_processes": run.accelerator.num_processes,
        "mixed_precision": run.mixed_precision,
        "attention": attention_backend_name(run.section.attention, run.dev),
        "compiled": section.compile,
        "compiled_networks": run.compiled,
        "device": str(run.dev),
        "data": str(Path(run.manifest.source).resolve()),
        "train_images": len(run.train),
        "section": section.model_dump(mode="json"),
    }
    if run.stage == 2:
        info["dkim"] = {
            "stage1": str(run.stage1.resolve()),
            "stage1_steps": run.stage1_info.get("steps"),
            "adapter_params": sum(p.numel() for p in run.adapter.parameters()),
            "knowledge_states": section.dkim_states,
            "knowledge_dropout": section.knowledge_cfg_dropout,
            "report_dropout": section.cfg_dropout,
            "squeeze_trained": section.stage2_unfreeze_squeeze,
            "learning_rate": run.learning_rate,
            "knowledge_example": run.knowledge[0],
        }
    atomic_write_json(out / TRAINING_INFO, info)
    atomic_write_text(out / "README.txt", _folder_readme(run.cfg, run.ava_tls, step, run.stage))


def _folder_readme(cfg: GeneratorConfig, ava_tls: bool, step: int, stage: int = 1) -> str:
    what = "stage-1 pipeline" if stage == 1 else "stage-2 pipeline (the stage-1 model plus the DKIM adapter)"
    return (
        f"Diff-CXR {what} ({cfg.name}, AVA-TLS {'on' if ava_tls else 'off'}, {step} steps).\n\n"
        "Load: DiffCXRPipeline.from_pretrained(this folder) (from diffcxr_aug.generator.pipeline).\n"
        "checkpoints/: resumable training state; logs/: loss.csv, loss.png; samples/: validation grids;\n"
        "training_info.json: the resolved configuration, encoder policy, VAE metrics and GFLOPs.\n"
    )


def save_pipeline_folder(pipeline: Any, out: Path) -> None:
    """``save_pretrained`` into ``out`` without a half-written state: components go to a temporary folder
    first, and ``model_index.json`` (what ``from_pretrained`` reads) is removed first and moved in last."""
    tmp = out / ".pipeline.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    (out / "model_index.json").unlink(missing_ok=True)
    for entry in sorted(tmp.iterdir()):
        if entry.name == "model_index.json":
            continue
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(entry, target)
    os.replace(tmp / "model_index.json", out / "model_index.json")
    shutil.rmtree(tmp, ignore_errors=True)
