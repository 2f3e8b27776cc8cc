"""Diff-CXR training under accelerate: stage 1, a report-conditioned latent diffusion model with AVA-TLS; stage 2,
the DKIM adapter on the frozen stage-1 model.

One explicit loop (:func:`train_generator`) runs on a CPU, one GPU, or many GPUs / CPU processes with
``accelerate launch`` or ``torchrun``. Its steps:

1-4. the latent space, the report encoder, the networks, the optimiser and the EMA: the build steps of
   :mod:`~diffcxr_aug.generator.training_run`;
5. optimizer steps of ``gradient_accumulation_steps`` micro-batches each: the diffusion loss (epsilon or
   v target, min-SNR weighted) with reports dropped to ``""`` at ``cfg_dropout`` for classifier-free
   guidance, plus ``align_weight`` x InfoNCE (:class:`~diffcxr_aug.generator.objective.DiffusionObjective`);
6. every ``checkpoint_every`` steps an atomic checkpoint (:mod:`~diffcxr_aug.generator.checkpoints`); every
   ``sample_every`` steps a grid of the fixed validation reports next to their real and generated images
   (:mod:`~diffcxr_aug.generator.sample_grids`); the loss log as CSV and PNG;
7. at the end, the EMA weights saved as a :class:`~diffcxr_aug.generator.pipeline.DiffCXRPipeline` in ``out``.

Resuming is exact: the batch of every micro-step and its noise, timesteps and dropped reports are drawn
from generators seeded by ``(seed, micro-step, rank)`` (:class:`~diffcxr_aug.generator.batches.BatchStream`), no
global random state is consumed (dropout is off everywhere), and a checkpoint holds the weights, the optimizer, the
LR schedule and the EMA. A run stopped at a checkpoint and resumed therefore ends with the same weights, bit for
bit, as one that never stopped (same device and process count).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from diffcxr_aug.data.manifest import Manifest, read_manifest
from diffcxr_aug.errors import InputError, MissingInputError, OutputInUseError
from diffcxr_aug.generator.accelerator import restore_scaler, scaler_state, start_accelerator
from diffcxr_aug.generator.batches import BatchStream
from diffcxr_aug.generator.checkpoints import read_checkpoint_state, resolve_resume, save_checkpoint
from diffcxr_aug.generator.configs import GeneratorConfig, resolve_config
from diffcxr_aug.generator.objective import compile_networks, describe_training_memory, enable_gradient_checkpointing
from diffcxr_aug.generator.pipeline_export import TRAINING_INFO, save_trained_pipeline
from diffcxr_aug.generator.sample_grids import SampleGrids
from diffcxr_aug.generator.settings import GeneratorSettings
from diffcxr_aug.generator.training_run import (
    TRAINED_VAE_DIR,
    TrainingRun,
    build_optimisation,
    build_stage1,
    build_stage2,
)
from diffcxr_aug.io import atomic_path
from diffcxr_aug.runtime import attention_backend

if TYPE_CHECKING:
    from diffcxr_aug.generator.vae import VAEPlan

logger = logging.getLogger(__name__)

LOSS_CSV = "logs/loss.csv"
LOSS_PNG = "logs/loss.png"
SAMPLES_DIR = "samples"
LOSS_COLUMNS = ("step", "loss", "loss_diffusion", "loss_align", "lr", "logit_scale", "elapsed_s")
# Holds the folder for the run; its text names the process that trains into it.
LOCK_FILE = ".train.lock"


# ----------------------------------------------------------------------------------------------- entry point
def train_generator(
    data: str | os.PathLike,
    out: str | os.PathLike,
    section: GeneratorSettings,
    stage: int = 1,
    resume: str | os.PathLike | None = None,
    device: str = "auto",
    seed: int = 0,
    generator: str | os.PathLike | None = None,
    vae_plan: VAEPlan | None = None,
    reseed: bool = False,
) -> Path:
    """Train Diff-CXR on the train split of the manifest in ``data``; write a pipeline folder.

    Stage 1 trains the LDM with AVA-TLS (``section.max_steps`` steps). Stage 2 (DKIM) loads the stage-1 pipeline
    folder ``generator``, freezes all of it (the token squeeze trains too with ``section.stage2_unfreeze_squeeze``)
    and trains only a :class:`~diffcxr_aug.generator.disease_adapter.DiseaseKnowledgeAdapter` built from its UNet,
    on each train row's knowledge text (its labels as template sentences), for ``section.stage2_steps`` steps at
    ``section.stage2_learning_rate``; the output is the stage-1 pipeline plus the adapter. Both stages share one
    loop and its guarantees (checkpoints, exact resume, logs, sample grids, time limit, ``training_info.json``).

    Args:
        data: a manifest folder or file (reports in ``report``; val rows feed the sample grids).
        out: the pipeline folder (``DiffCXRPipeline.from_pretrained(out)``), with ``checkpoints/``,
            ``logs/``, ``samples/``, ``trained_vae/`` (stage 1, when trained here) and ``training_info.json``.
        section: the recipe's ``generator`` section.
        stage: 1 (the LDM with AVA-TLS) or 2 (the DKIM adapter on the stage-1 model ``generator``).
        resume: ``None`` (fresh; refuses a folder that has checkpoints), ``latest`` (the newest checkpoint,
            or a fresh start when there is none) or a checkpoint folder.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (under ``accelerate launch`` each process takes its own).
        seed: seeds initialisation, data order and noise (a resumed run keeps the checkpoint's seed, unless
            ``reseed``).
        generator: stage 2 only: the stage-1 pipeline folder.
        vae_plan: stage 1, when the VAE is a registry name (trained here first): the recipe's ``vae`` settings
            (:func:`~diffcxr_aug.generator.vae.plan_vae`); ``None``: the config's.
        reseed: with ``resume``, draw the rest of the run's batches, noise and dropped reports from ``seed``
            instead of the checkpoint's seed: a branch of that checkpoint (e.g. several continuations of one
            model, each with its own seed). The branch is itself exactly resumable: its checkpoints record
            ``seed``.

    Returns:
        ``out``.
    """
    run_started = time.monotonic()
    if reseed and resume is None:
        raise InputError("--reseed branches a checkpoint with a new seed: pass it with --resume")
    if stage not in (1, 2):
        raise InputError(f"Unsupported stage {stage!r}; choose 1 (LDM + AVA-TLS) or 2 (the DKIM adapter)")
    out = Path(out)
    stage1 = _check_stage1_folder(generator, out) if stage == 2 else None  # (folder, its training_info.json)
    if stage == 1 and generator is not None:
        raise InputError("--generator names the stage-1 model that stage 2 trains on; pass it with --stage 2")
    manifest = conditioning_manifest(read_manifest(data), section.report_source)
    train = manifest.split("train")
    if len(train) == 0:
        raise InputError(f"{manifest.source}: the train split is empty; nothing to train the generator on")
    if (train.frame["report"].str.strip() == "").all():
        raise InputError(
            f"{manifest.source}: every train report is empty (a dataset without reports, such as NIH ChestX-ray14), "
            "so the generator would learn no conditioning; set generator.report_source: labels (train-generator "
            "--report-source labels) to train on template reports written from the labels"
        )
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock_folder(out)
    try:
        return _start(
            out, section, manifest, train, stage, stage1, resume, device, seed, run_started, vae_plan, reseed
        )
    finally:
        if lock is not None:
            lock.release()


def conditioning_manifest(manifest: Manifest, report_source: str) -> Manifest:
    """The manifest with the text the generator is conditioned on in ``report``: its own reports (``report``), or
    each row's labels written as a template report (``labels``, the sentences ``synthesize --labels-from`` writes)."""
    if report_source == "report":
        return manifest
    if report_source != "labels":
        raise InputError(f"Unsupported report_source {report_source!r}; choose report or labels")
    if not manifest.label_names:
        raise InputError(f"{manifest.source}: report_source labels needs label columns, and the manifest has none")
    from diffcxr_aug.generator.prompts import template_report

    frame = manifest.frame.copy()
    frame["report"] = [template_report(row) for row in frame[manifest.label_names].to_dict("records")]
    return Manifest(frame, manifest.root, manifest.source)


def _check_stage1_folder(generator: str | os.PathLike | None, out: Path) -> tuple[Path, dict[str, Any]]:
    """The stage-1 folder stage 2 trains on, and its ``training_info.json``; refused unless it is one."""
    if generator is None:
        raise InputError(
            "stage 2 trains the DKIM adapter on a stage-1 model: pass --generator STAGE1_DIR "
            "(the --out of a `train-generator --stage 1` run)"
        )
    stage1 = Path(generator)
    info = stage1 / TRAINING_INFO
    if not (stage1 / "model_index.json").is_file() or not info.is_file():
        raise MissingInputError(
            f"--generator {stage1}: not a trained pipeline folder (no model_index.json and {TRAINING_INFO}); "
            "train stage 1 into it first"
        )
    recorded = json.loads(info.read_text(encoding="utf-8"))
    if recorded.get("stage", 1) != 1:
        raise InputError(f"--generator {stage1}: that folder is a stage-2 model; stage 2 trains on a stage-1 folder")
    if stage1.resolve() == out.resolve():
        raise InputError(
            f"--out {out} is the stage-1 folder itself; stage 2 writes a new pipeline folder (the stage-1 "
            "components plus the adapter), so choose another --out"
        )
    return stage1, recorded


def _lock_folder(out: Path) -> FileLock | None:
    """Hold ``out/.train.lock`` for the run (released when the process ends, however it ends), so that a second
    training started on the same folder fails at once instead of interleaving its checkpoints, logs and VAE with the
    first. Only the first process of a multi-process run locks."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    path = out / LOCK_FILE
    lock = FileLock(path, timeout=0, on_acquired=_name_owner)
    try:
        lock.acquire()
    except Timeout:
        try:
            owner = path.read_text().strip()
        except OSError:  # Windows keeps the locked first byte from other readers: the message names no process
            owner = ""
        raise OutputInUseError(
            f"{out} is being trained by {owner or 'another process'}; wait for it to finish (or stop it), or choose "
            "another --out"
        ) from None
    return lock


def _name_owner(fd: int) -> None:
    """Write this process into the lock file it holds (through the locked descriptor, the one Windows lets write)."""
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"pid {os.getpid()}\n".encode())


def _start(
    out: Path,
    section: GeneratorSettings,
    manifest: Manifest,
    train: Manifest,
    stage: int,
    stage1: tuple[Path, dict[str, Any]] | None,
    resume: str | os.PathLike | None,
    device: str,
    seed: int,
    run_started: float,
    vae_plan: VAEPlan | None = None,
    reseed: bool = False,
) -> Path:
    """Resolve the checkpoint and the architecture, start accelerate, train, and always end accelerate."""
    checkpoint = resolve_resume(out, resume)
    stage1, stage1_info = stage1 if stage1 is not None else (None, {})
    if stage == 1:
        cfg, ava_tls = resolve_config(section), section.ava_tls
    else:  # the stage-1 model decides the architecture
        cfg, ava_tls = GeneratorConfig.from_dict(stage1_info["config"]), bool(stage1_info["ava_tls"])
    start_step, state = 0, {}
    # Architecture, seed and AVA-TLS switch come from the checkpoint on resume (the section may not change them).
    if checkpoint is not None:
        state = read_checkpoint_state(checkpoint)
        if int(state.get("stage", 1)) != stage:
            raise InputError(
                f"--resume {checkpoint}: a stage-{state.get('stage', 1)} checkpoint, and this run trains stage "
                f"{stage}; resume it with --stage {state.get('stage', 1)}, or choose another --out"
            )
        fresh = GeneratorConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        cfg = GeneratorConfig.from_dict(state["config"])
        if fresh != cfg or bool(state["ava_tls"]) != ava_tls or (int(state["seed"]) != seed and not reseed):
            logger.warning(
                "Resuming %s: architecture, ava_tls and seed are the checkpoint's, not the recipe's", checkpoint
            )
        if stage == 2 and state.get("stage1") != str(stage1.resolve()):
            logger.warning(
                "Resuming %s: it was trained on stage-1 model %s, now %s", checkpoint, state["stage1"], stage1
            )
        ava_tls, start_step = bool(state["ava_tls"]), int(state["step"])
        _check_foreign_checkpoint_vae(out, checkpoint, cfg)
        if reseed:
            logger.info(
                "Branching %s (seed %s) with seed %d from step %d", checkpoint, state["seed"], seed, start_step
            )
        else:
            seed = int(state["seed"])

    accelerator, mixed_precision = start_accelerator(device, section.mixed_precision)
    if checkpoint is not None and state.get("mixed_precision", mixed_precision) != mixed_precision:
        logger.warning(
            "Resuming %s, trained in %s, in %s (mixed_precision %s here)",
            checkpoint, state["mixed_precision"], mixed_precision, section.mixed_precision,
        )  # fmt: skip
    run = TrainingRun(
        stage, cfg, section, manifest, train, out, accelerator, seed, ava_tls, checkpoint, start_step,
        mixed_precision, run_started, stage1=stage1, stage1_info=stage1_info, checkpoint_state=state,
        vae_plan=vae_plan,
    )  # fmt: skip
    try:
        if stage == 1:
            build_stage1(run)
        else:
            build_stage2(run)
        if section.gradient_checkpointing:  # before accelerate wraps the objective (DDP)
            logger.info("Gradient checkpointing: %s", ", ".join(enable_gradient_checkpointing(run.objective)))
        build_optimisation(run)
        restore_scaler(accelerator, state)
        if run.main:  # what a process needs, before the first step
            logger.info("%s", describe_training_memory(
                run.model, [run.vae, run.bundle.model], run.ema_params, mixed_precision, cfg.num_tokens,
                accelerator.num_processes, section.batch_size, section.gradient_checkpointing, run.dev,
            ))  # fmt: skip
        if section.compile:
            run.compiled = compile_networks(run.model)
            logger.info("Compiling %s (torch.compile, inductor); the first steps wait for it", ", ".join(run.compiled))
        step = _loop(run)
        if run.main:
            save_trained_pipeline(run, step)
        accelerator.wait_for_everyone()
        return out
    finally:
        accelerator.end_training()


def _check_foreign_checkpoint_vae(out: Path, checkpoint: Path, cfg: GeneratorConfig) -> None:
    """A checkpoint from another run's folder whose VAE that run trained itself (``trained_vae/``) is refused: here
    a new VAE would be trained, and the checkpoint's UNet would denoise in a latent space it never saw."""
    from diffcxr_aug.generator.vae import VAE_CONFIGS

    if cfg.vae not in VAE_CONFIGS or (out / TRAINED_VAE_DIR / "metrics.json").is_file():
        return
    origin = checkpoint.resolve().parent.parent
    if origin != out.resolve():
        raise InputError(
            f"--resume {checkpoint}: that run trained its own {cfg.vae} VAE ({origin / TRAINED_VAE_DIR}); copy that "
            f"folder to {out / TRAINED_VAE_DIR} so that {out} continues in the same latent space"
        )


# ---------------------------------------------------------------------------------------------------- the loop
def _loop(run: TrainingRun) -> int:
    """5-6. Optimizer steps of ``gradient_accumulation_steps`` micro-batches, checkpoints, logs and grids; returns
    the last step.

    Longer than the package's other functions on purpose: it is the training loop in the form diffusers' training
    examples use (one ``while`` over steps: batch, forward/backward under the attention backend, clip, optimiser,
    EMA, then log / checkpoint / sample on their cadences), read top to bottom; the pieces with their own logic
    (the batch stream, checkpoint writing, the loss log, the sample grids, the time limit) are functions, most in
    their own modules.
    """
    from diffcxr_aug.generator.ava_tls import same_text_mask
    from diffcxr_aug.generator.figures import save_loss_plot
    from diffcxr_aug.generator.text_encoder import encode_tokens, tokenize

    section, accelerator, dev, main = run.section, run.accelerator, run.dev, run.main
    objective, model, max_steps = run.objective, run.model, run.max_steps
    train_reports = run.train.frame["report"].tolist()
    grids = SampleGrids(run.manifest, section.num_validation_reports, run.seed, run.cfg.image_size)
    # Training wall time before this invocation, as of the checkpoint resumed from (None: an older checkpoint that
    # did not record it). Time spent after the last checkpoint of an interrupted run is lost with its work.
    run.prior_minutes = 0.0
    if run.checkpoint is not None:
        run.prior_minutes = run.checkpoint_state.get("wall_minutes")
        previous = run.checkpoint_state.get("num_processes")
        if previous not in (None, accelerator.num_processes):
            logger.warning(
                "Resuming with %d processes, checkpoint had %d: data order differs",
                accelerator.num_processes,
                previous,
            )
    loss_csv = run.out / LOSS_CSV
    if main:
        if run.checkpoint is None:
            loss_csv.unlink(missing_ok=True)
        else:
            _truncate_loss_log(loss_csv, run.start_step)
    scratch_tokenizer = run.bundle.tokenizer if run.cfg.text_encoder == "scratch" and run.stage == 1 else None

    def text_inputs(texts: list[str]) -> dict[str, torch.Tensor]:
        if run.text_cache is not None:
            return run.text_cache.batch(texts, dev, pad_to=run.text_max_length if section.compile else 0)
        tokens = tokenize(run.bundle.tokenizer, texts, run.text_max_length, dev)
        if run.trainable_text:
            return tokens  # encoded inside the objective, with gradients
        with torch.no_grad(), accelerator.autocast():  # a frozen encoder run every step: in the step's precision
            states, mask = encode_tokens(run.bundle.model, tokens)
        return {"states": states, "attention_mask": mask}

    accum = section.gradient_accumulation_steps
    stream = BatchStream(
        len(run.train), section.batch_size, run.seed, accelerator.process_index, accelerator.num_processes
    )
    null_text = text_inputs([""])
    step = run.start_step
    started = time.time()
    pending: list[dict[str, Any]] = []
    name = run.cfg.name if run.stage == 1 else f"{run.cfg.name} DKIM adapter"
    bar = tqdm(total=max_steps, initial=step, desc=f"training {name}", disable=not main, unit="step")
    objective.train()
    while step < max_steps:
        totals: dict[str, float] = {}
        for k in range(accum):
            micro = step * accum + k
            rows = stream.indices(micro)
            generator = stream.generator(micro)
            batch_latents = run.latents[rows]
            noise = torch.randn(batch_latents.shape, generator=generator)
            timesteps = torch.randint(0, run.cfg.num_train_timesteps, (len(rows),), generator=generator)
            drop = torch.rand(len(rows), generator=generator) < section.cfg_dropout
            reports = [train_reports[i] for i in rows]
            knowledge = {}
            if run.stage == 2:  # the knowledge is dropped independently of the report, so each can be guided alone
                drop_knowledge = torch.rand(len(rows), generator=generator) < section.knowledge_cfg_dropout
                knowledge = {
                    "knowledge": text_inputs([run.knowledge[i] for i in rows]),
                    "drop_knowledge": drop_knowledge.to(dev),
                }
            sync = contextlib.nullcontext() if k == accum - 1 else accelerator.no_sync(objective)
            with sync, attention_backend(section.attention, dev):
                losses = objective(
                    batch_latents.to(dev),
                    noise.to(dev),
                    timesteps.to(dev),
                    drop.to(dev),
                    text_inputs(reports),
                    null_text,
                    same_text_mask(reports).to(dev),
                    **knowledge,
                )
                accelerator.backward(losses["loss"] / accum)
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) / accum
        # fp16: clipping unscales first; the step is the GradScaler's (skipped on overflow); weights stay fp32.
        accelerator.clip_grad_norm_(objective.parameters(), 1.0)
        run.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # a skipped step moves neither the schedule nor the EMA
            run.lr_scheduler.step()
            run.ema.step(run.ema_params)
        run.optimizer.zero_grad(set_to_none=True)
        step += 1

        values = torch.tensor([totals.get(c, float("nan")) for c in LOSS_COLUMNS[1:4]], device=dev)
        reduced = accelerator.reduce(values, "mean")
        pending.append(
            {
                "step": step,
                **dict(zip(LOSS_COLUMNS[1:4], reduced.tolist(), strict=True)),
                "lr": run.lr_scheduler.get_last_lr()[0],
                "logit_scale": float(model.image_tower.logit_scale.detach().exp())
                if model.image_tower is not None
                else None,
                "elapsed_s": round(time.time() - started, 2),
            }
        )
        last_loss = pending[-1]["loss"]
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")
        out_of_time = _out_of_time(run, step)
        last = step == max_steps or out_of_time
        if main and (step % section.log_every == 0 or last):
            _append_loss_rows(loss_csv, pending)
            pending = []
        if step % section.checkpoint_every == 0 or last:
            if main:
                if pending:
                    _append_loss_rows(loss_csv, pending)
                    pending = []
                save_checkpoint(
                    run.out,
                    step,
                    model,
                    run.optimizer,
                    run.lr_scheduler,
                    run.ema,
                    {**run.state(), "wall_minutes": run.wall_minutes()[1], **scaler_state(accelerator)},
                    scratch_tokenizer,
                    section.checkpoints_total_limit,
                )
                save_loss_plot(loss_csv, run.out / LOSS_PNG)
            accelerator.wait_for_everyone()
        if step % section.sample_every == 0 or last:
            if main:
                path = _save_grid(run, grids, step)
                logger.info("step %d: loss %.4f; samples in %s", step, last_loss, path)
            accelerator.wait_for_everyone()
        if out_of_time:
            break
    bar.close()
    return step


def _out_of_time(run: TrainingRun, step: int) -> bool:
    """Whether the time limit has passed; every process stops at the same step (the main process's clock)."""
    limit = run.section.time_limit_minutes
    if limit is None:
        return False
    flag = torch.tensor([float(time.monotonic() - run.run_started > 60 * limit)], device=run.dev)
    out_of_time = bool(run.accelerator.reduce(flag, "max").item()) and step < run.max_steps
    if out_of_time:
        logger.warning(
            "time limit of %s minutes reached at step %d of %d: saving and stopping", limit, step, run.max_steps
        )
    return out_of_time


def _save_grid(run: TrainingRun, grids: SampleGrids, step: int) -> Path | None:
    """The validation grid of the EMA weights at ``step``."""
    if not grids.reports:
        return None
    section = run.section
    what = f"AVA-TLS {'on' if run.ava_tls else 'off'}" + (", DKIM adapter" if run.stage == 2 else "")
    run.ema.store(run.ema_params)
    run.ema.copy_to(run.ema_params)
    try:
        return grids.save(
            run.pipeline(),
            run.out / SAMPLES_DIR / f"step-{step:06d}.png",
            steps=section.validation_steps,
            guidance=section.validation_guidance,
            seed=run.seed,
            title=f"{run.cfg.name}, {what}, step {step} (EMA, {section.validation_steps} DPM-Solver++ steps, "
            f"guidance {section.validation_guidance})",
            knowledge=run.adapter is not None,
        )
    finally:
        run.ema.restore(run.ema_params)


def _append_loss_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(LOSS_COLUMNS)).to_csv(path, mode="a", header=new, index=False)


def _truncate_loss_log(path: Path, step: int) -> None:
    """On resume, drop log rows after the checkpoint's step (they will be written again)."""
    if path.is_file():
        frame = pd.read_csv(path)
        with atomic_path(path) as tmp:
            frame[frame["step"] <= step].to_csv(tmp, index=False)
