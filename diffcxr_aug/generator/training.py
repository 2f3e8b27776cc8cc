"""Diff-CXR training, stage 1: a report-conditioned latent diffusion model with AVA-TLS, under accelerate.

One explicit loop (:func:`train_generator`) runs on a CPU, one GPU, or many GPUs / CPU processes with
``accelerate launch`` or ``torchrun``. Its steps:

1. the latent space: a pretrained ``AutoencoderKL``, or a small KL-VAE trained on the manifest first
   (``trained_vae/``, with val PSNR/SSIM in ``trained_vae/metrics.json``); the train split is encoded once;
2. the report encoder (frozen: its token states are computed once per distinct report and reused);
3. the token squeeze (AVA-TLS, or the truncation baseline), the UNet, the image tower for the InfoNCE loss;
4. AdamW, a warm-up then constant learning rate, an EMA of the weights that sampling uses;
5. optimizer steps of ``gradient_accumulation_steps`` micro-batches each: the diffusion loss (epsilon or
   v target, min-SNR weighted) with reports dropped to ``""`` at ``cfg_dropout`` for classifier-free
   guidance, plus ``align_weight`` x InfoNCE;
6. every ``checkpoint_every`` steps an atomic checkpoint; every ``sample_every`` steps a grid of the fixed
   validation reports next to their real and generated images; the loss log as CSV and PNG;
7. at the end, the EMA weights saved as a :class:`~diffcxr_aug.generator.pipeline.DiffCXRPipeline` in ``out``.

Resuming is exact: the batch of every micro-step and its noise, timesteps and dropped reports are drawn
from generators seeded by ``(seed, micro-step, rank)``, no global random state is consumed (dropout is
off everywhere), and a checkpoint holds the weights, the optimizer, the LR schedule and the EMA. A run
stopped at a checkpoint and resumed therefore ends with the same weights, bit for bit, as one that never
stopped (same device and process count).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from diffcxr_aug.config import GeneratorSection
from diffcxr_aug.data.manifest import Manifest, read_manifest
from diffcxr_aug.data.showcase import showcase_rows
from diffcxr_aug.errors import InputError, MissingInputError, OutputInUseError
from diffcxr_aug.generator.configs import PAPER_GFLOPS, GeneratorConfig, denoising_step_flops, resolve_config
from diffcxr_aug.io import atomic_path, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_STATE = "state.json"
CHECKPOINT_WEIGHTS = "trainable.safetensors"
CHECKPOINT_TRAINING_STATE = "training_state.pt"
TRAINED_VAE_DIR = "trained_vae"
TRAINING_INFO = "training_info.json"
LOSS_CSV = "logs/loss.csv"
LOSS_PNG = "logs/loss.png"
SAMPLES_DIR = "samples"
LOSS_COLUMNS = ("step", "loss", "loss_diffusion", "loss_align", "lr", "logit_scale", "elapsed_s")
# Frozen-encoder token states are cached in memory up to this size (phantom-64 with MiniLM: about 0.2 GB).
TEXT_CACHE_MAX_BYTES = 4 * 2**30
# Learning-rate multiplier for a pretrained encoder that is fine-tuned (a from-scratch one gets 1.0).
FINETUNE_LR_SCALE = 0.1


# --------------------------------------------------------------------------------------------------- checkpoints
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


def _save_checkpoint(
    out: Path,
    step: int,
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    ema: Any,
    state: dict[str, Any],
    tokenizer: Any | None,
    total_limit: int | None,
) -> Path:
    """Write ``checkpoints/checkpoint-{step}`` atomically (a temporary folder renamed into place)."""
    from safetensors.torch import save_file

    folder = out / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{step}"
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in objective.state_dict().items()}
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


# ------------------------------------------------------------------------------------------------ the objective
class DiffusionObjective(nn.Module):
    """The trainable modules and the stage-1 loss of one micro-batch.

    One module with one ``forward``, so that accelerate/DDP wraps everything that learns at once.

    Args:
        unet: the denoiser.
        token_squeeze: report token states -> condition tokens (+ pooled embedding).
        noise_scheduler: the DDPM training schedule.
        prediction_type: ``epsilon`` or ``v_prediction``.
        image_tower: image embedding for the InfoNCE loss; ``None`` when AVA-TLS is off.
        text_encoder: the report encoder when it is trained (fine-tuned or from scratch); ``None`` when frozen
            (its states are then passed in precomputed).
        snr_gamma: min-SNR weighting cap; ``None`` for the plain MSE.
        align_weight: weight of the InfoNCE loss.
    """

    def __init__(
        self,
        unet: nn.Module,
        token_squeeze: nn.Module,
        noise_scheduler: Any,
        prediction_type: str,
        image_tower: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        snr_gamma: float | None = None,
        align_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"Unsupported prediction_type {prediction_type!r}; choose one of: epsilon, v_prediction")
        self.unet = unet
        self.token_squeeze = token_squeeze
        self.image_tower = image_tower
        self.text_encoder = text_encoder
        self.noise_scheduler = noise_scheduler
        self.prediction_type = prediction_type
        self.snr_gamma = snr_gamma
        self.align_weight = align_weight

    def train(self, mode: bool = True) -> DiffusionObjective:
        # The text encoder stays in eval mode: its dropout would draw from the global random state, and
        # then a resumed run would no longer match an uninterrupted one.
        super().train(mode)
        if self.text_encoder is not None:
            self.text_encoder.eval()
        return self

    def condition(self, text: dict[str, torch.Tensor]) -> Any:
        """Token squeeze output for ``{"states", "attention_mask"}`` or ``{"input_ids", "attention_mask"}``."""
        if "input_ids" in text:
            states = self.text_encoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
            states = states.last_hidden_state
        else:
            states = text["states"]
        return self.token_squeeze(states, text["attention_mask"])

    def forward(
        self,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        drop: torch.Tensor,
        text: dict[str, torch.Tensor],
        null_text: dict[str, torch.Tensor],
        positive_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        from diffusers.training_utils import compute_snr

        from diffcxr_aug.generator.ava_tls import info_nce

        cond = self.condition(text)
        null = self.condition(null_text)  # the empty report, batch of one
        keep = ~drop
        tokens = torch.where(keep[:, None, None], cond.tokens, null.tokens.expand_as(cond.tokens))
        mask = None
        if cond.attention_mask is not None:
            mask = torch.where(keep[:, None], cond.attention_mask, null.attention_mask.expand_as(cond.attention_mask))

        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"Unsupported prediction_type {self.prediction_type!r}")
        pred = self.unet(noisy, timesteps, encoder_hidden_states=tokens, encoder_attention_mask=mask).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.snr_gamma is not None:
            # Min-SNR-gamma (Hang et al. 2023): cap the weight of easy, low-noise timesteps.
            snr = compute_snr(self.noise_scheduler, timesteps)
            capped = torch.clamp(snr, max=self.snr_gamma)
            weight = capped / snr if self.prediction_type == "epsilon" else capped / (snr + 1)
            per_sample = per_sample * weight
        loss_diffusion = per_sample.mean()
        losses = {"loss_diffusion": loss_diffusion}
        loss = loss_diffusion
        if self.image_tower is not None and self.align_weight > 0:
            loss_align = info_nce(cond.pooled, self.image_tower(latents), self.image_tower.logit_scale, positive_mask)
            losses["loss_align"] = loss_align
            loss = loss + self.align_weight * loss_align
        losses["loss"] = loss
        return losses


# ------------------------------------------------------------------------------------------------ data streams
class _BatchStream:
    """Which rows, noise, timesteps and dropped reports each micro-step uses: a pure function of
    ``(seed, micro_step, rank)``, so that a resumed run draws exactly what an uninterrupted one would."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, 1, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, micro_step: int) -> np.ndarray:
        """Rows of micro-step ``micro_step`` for this rank: consecutive slices of epoch permutations."""
        start = (micro_step * self.world + self.rank) * self.batch_size
        positions = np.arange(start, start + self.batch_size)
        return np.array([self._perm(int(p // self.n))[p % self.n] for p in positions])

    def generator(self, micro_step: int) -> torch.Generator:
        seed = int(np.random.SeedSequence([self.seed, 2, micro_step, self.rank]).generate_state(1)[0])
        return torch.Generator().manual_seed(seed)


class _TextStates:
    """Token states of a frozen encoder, computed once per distinct report (and the empty report)."""

    def __init__(self, bundle: Any, reports: Sequence[str], max_length: int, device: torch.device, progress: bool):
        from diffcxr_aug.generator.text_encoder import encode_tokens, tokenize

        unique = list(dict.fromkeys(["", *reports]))
        self.index = {r: i for i, r in enumerate(unique)}
        self.states: list[torch.Tensor] = []
        # Longest first, in fixed chunks: little padding, and the same batches on every run.
        order = sorted(range(len(unique)), key=lambda i: -len(unique[i]))
        results: dict[int, torch.Tensor] = {}
        chunk = 64
        model = bundle.model
        with torch.no_grad():
            for start in tqdm(
                range(0, len(order), chunk), desc="encoding reports", disable=not progress, unit="batch"
            ):
                ids = order[start : start + chunk]
                tokens = tokenize(bundle.tokenizer, [unique[i] for i in ids], max_length, device)
                states, mask = encode_tokens(model, tokens)
                for row, i in enumerate(ids):
                    results[i] = states[row, : int(mask[row].sum())].float().cpu()
        self.states = [results[i] for i in range(len(unique))]

    def batch(self, reports: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        states = [self.states[self.index[r]] for r in reports]
        length = max(s.shape[0] for s in states)
        padded = torch.zeros(len(states), length, states[0].shape[1])
        mask = torch.zeros(len(states), length, dtype=torch.long)
        for i, s in enumerate(states):
            padded[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = 1
        return {"states": padded.to(device), "attention_mask": mask.to(device)}


# --------------------------------------------------------------------------------------------------- helpers
def validation_rows(manifest: Manifest, n: int, seed: int) -> Manifest:
    """Fixed reports for the sample grids: val rows that together show as many findings as possible."""
    pool = manifest.split("val")
    if len(pool) == 0:
        pool = manifest.split("train")
    if len(pool) == 0:
        return pool
    rows = showcase_rows(pool, n=min(n, len(pool)), seed=seed)
    return pool.subset(rows)


def label_caption(row: pd.Series, labels: list[str]) -> str:
    """The positive labels of a manifest row, as one short line for a figure."""
    positive = [name for name in labels if row.get(name) == 1.0]
    return "+ " + ", ".join(positive) if positive else "(no positive label)"


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


def _lock_folder(out: Path) -> Any:
    """Hold an exclusive lock on ``out/.train.lock`` for the run (released when the process ends, however
    it ends), so that a second training started on the same folder fails instead of interleaving its
    checkpoints, logs and VAE with the first. Only the first process of a multi-process run locks."""
    import fcntl

    if int(os.environ.get("RANK", "0")) != 0:
        return None
    handle = open(out / ".train.lock", "a+")  # held open (and locked) for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise OutputInUseError(
            f"{out} is being trained by {owner}; wait for it to finish (or stop it), or choose another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def _accelerator(device: str, mixed_precision: str):
    from accelerate import Accelerator

    from diffcxr_aug.runtime import resolve_device

    resolved = resolve_device(device)  # validates, and fails clearly on 'cuda' without a GPU
    if resolved.type == "cuda" and resolved.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(resolved)
    if mixed_precision == "auto":
        mixed_precision = "bf16" if resolved.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(cpu=resolved.type == "cpu", mixed_precision=mixed_precision), mixed_precision


def _prepare_vae(cfg: GeneratorConfig, manifest: Manifest, out: Path, accelerator: Any, seed: int, progress: bool):
    """Load the pretrained VAE, or train the registered one on the manifest first (main process only)."""
    from diffcxr_aug.generator.vae import VAE_CONFIGS, load_vae, train_vae

    info: dict[str, Any] = {"vae": cfg.vae}
    if cfg.vae in VAE_CONFIGS:
        folder = out / TRAINED_VAE_DIR
        if not (folder / "metrics.json").is_file() and accelerator.is_main_process:
            logger.info("Training a %s KL-VAE on %s for %d steps first", cfg.vae, manifest.source, cfg.vae_steps)
            train_vae(
                manifest,
                folder,
                config=cfg.vae,
                size=cfg.image_size,
                steps=cfg.vae_steps,
                batch_size=cfg.vae_batch_size,
                crop_size=cfg.vae_crop_size,
                device="cpu" if accelerator.device.type == "cpu" else str(accelerator.device),
                seed=seed,
                progress=progress,
            )
        accelerator.wait_for_everyone()
        vae = load_vae(folder)
        info.update(trained=True, metrics=json.loads((folder / "metrics.json").read_text()))
        logger.info("VAE: val PSNR %.2f dB, SSIM %.4f", info["metrics"]["psnr"], info["metrics"]["ssim"])
    else:
        vae = load_vae(cfg.vae)
        info["trained"] = False
        metrics = Path(cfg.vae) / "metrics.json"
        if metrics.is_file():  # a KL-VAE trained by this project (e.g. by the filter): keep its val PSNR/SSIM
            info["metrics"] = json.loads(metrics.read_text())
    return vae.requires_grad_(False).eval(), info


# ----------------------------------------------------------------------------------------------- entry point
def train_generator(
    data: str | os.PathLike,
    out: str | os.PathLike,
    section: GeneratorSection,
    stage: int = 1,
    resume: str | os.PathLike | None = None,
    device: str = "auto",
    seed: int = 0,
) -> Path:
    """Train Diff-CXR stage 1 on the train split of the manifest in ``data``; write a pipeline folder.

    Args:
        data: a manifest folder or file (reports in ``report``; val rows feed the sample grids).
        out: the pipeline folder (``DiffCXRPipeline.from_pretrained(out)``), with ``checkpoints/``,
            ``logs/``, ``samples/``, ``trained_vae/`` (when trained here) and ``training_info.json``.
        section: the recipe's ``generator`` section.
        stage: 1 (the LDM with AVA-TLS); 2 (DKIM adapter) is not built yet.
        resume: ``None`` (fresh; refuses a folder that has checkpoints), ``latest`` (the newest checkpoint,
            or a fresh start when there is none) or a checkpoint folder.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (under ``accelerate launch`` each process takes its own).
        seed: seeds initialisation, data order and noise (a resumed run keeps the checkpoint's seed).

    Returns:
        ``out``.
    """
    run_started = time.monotonic()
    if stage == 2:
        raise NotImplementedError("DKIM stage 2 (the disease-knowledge adapter) is a later issue; train stage 1")
    if stage != 1:
        raise InputError(f"Unsupported stage {stage!r}; choose 1 (or 2, once DKIM exists)")
    out = Path(out)
    manifest = read_manifest(data)
    train = manifest.split("train")
    if len(train) == 0:
        raise InputError(f"{manifest.source}: the train split is empty; nothing to train the generator on")
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock_folder(out)
    try:
        return _start(out, section, manifest, train, resume, device, seed, run_started)
    finally:
        if lock is not None:
            lock.close()


def _start(
    out: Path,
    section: GeneratorSection,
    manifest: Manifest,
    train: Manifest,
    resume: str | os.PathLike | None,
    device: str,
    seed: int,
    run_started: float,
) -> Path:
    """Resolve the checkpoint and the architecture, start accelerate, train, and always end accelerate."""
    checkpoint = resolve_resume(out, resume)
    # Architecture, seed and AVA-TLS switch come from the checkpoint on resume (the section may not change them).
    if checkpoint is not None:
        state = json.loads((checkpoint / CHECKPOINT_STATE).read_text())
        cfg = GeneratorConfig.from_dict(state["config"])
        ava_tls, seed_used = bool(state["ava_tls"]), int(state["seed"])
        fresh = GeneratorConfig.from_dict(json.loads(json.dumps(resolve_config(section).to_dict())))
        if fresh != cfg or ava_tls != section.ava_tls or seed_used != seed:
            logger.warning(
                "Resuming %s: architecture, ava_tls and seed are the checkpoint's, not the recipe's", checkpoint
            )
        start_step = int(state["step"])
    else:
        cfg, ava_tls, seed_used, start_step = resolve_config(section), section.ava_tls, seed, 0

    accelerator, mixed_precision = _accelerator(device, section.mixed_precision)
    try:
        return _train(
            cfg,
            section,
            manifest,
            train,
            out,
            accelerator,
            accelerator.device,
            accelerator.is_main_process,
            accelerator.is_main_process,
            seed_used,
            ava_tls,
            checkpoint,
            start_step,
            mixed_precision,
            run_started,
        )
    finally:
        accelerator.end_training()


def _train(
    cfg: GeneratorConfig,
    section: GeneratorSection,
    manifest: Manifest,
    train: Manifest,
    out: Path,
    accelerator: Any,
    dev: torch.device,
    main: bool,
    progress: bool,
    seed: int,
    ava_tls: bool,
    checkpoint: Path | None,
    start_step: int,
    mixed_precision: str,
    run_started: float,
) -> Path:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from safetensors.torch import load_file

    from diffcxr_aug.data.dataset import CXRDataset
    from diffcxr_aug.generator.ava_tls import ImageTower, same_text_mask
    from diffcxr_aug.generator.configs import build_unet
    from diffcxr_aug.generator.figures import save_loss_plot, save_report_grid
    from diffcxr_aug.generator.pipeline import DiffCXRPipeline, default_scheduler
    from diffcxr_aug.generator.text_encoder import encode_tokens, load_text_encoder, token_lengths, tokenize
    from diffcxr_aug.generator.token_squeeze import TokenSqueeze
    from diffcxr_aug.generator.vae import encode_manifest, latent_shape, to_uint8

    policy = cfg.text_encoder_policy
    squeeze_mode = "squeeze" if ava_tls else "truncate"
    train_reports = train.frame["report"].tolist()

    # 1. The latent space (the train split is encoded once the text encoder has loaded, so a missing
    # encoder fails before minutes of encoding).
    vae, vae_info = _prepare_vae(cfg, manifest, out, accelerator, seed, progress)
    vae = vae.to(dev)
    channels, height, width = latent_shape(vae, cfg.image_size)

    # 2. The report encoder. The scratch tokenizer is learned from the train reports (or read back on resume).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bundle = load_text_encoder(
            cfg.text_encoder, cfg.max_text_tokens, reports=train_reports, scratch_config=cfg.scratch_text, seed=seed
        )
    if checkpoint is not None and (checkpoint / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        bundle.tokenizer = AutoTokenizer.from_pretrained(checkpoint / "tokenizer")
    text_max_length = cfg.num_tokens if squeeze_mode == "truncate" else bundle.max_length
    lengths = token_lengths(bundle.tokenizer, train_reports)
    truncated = sum(n > text_max_length for n in lengths)
    logger.info(
        "Text encoder %s (%s, %s): %d of %d train reports are longer than the %d tokens it sees%s",
        cfg.text_encoder,
        bundle.backend,
        policy,
        truncated,
        len(train_reports),
        text_max_length,
        "" if ava_tls else " (AVA-TLS off: the first K tokens only)",
    )
    latents = encode_manifest(vae, train, cfg.image_size, device=dev, progress=progress)
    text_encoder = bundle.model.to(dev).eval()  # eval: no dropout, so resume stays exact
    trainable_text = policy in ("finetune", "train")
    text_encoder.requires_grad_(trainable_text)
    if trainable_text and getattr(text_encoder, "pooler", None) is not None:
        text_encoder.pooler.requires_grad_(False)  # unused: the squeeze reads the token states
    # A frozen encoder's states are computed once per distinct report, unless they would not fit in memory
    # (a MIMIC-size corpus with a BERT-base encoder); then each batch is encoded as it comes.
    cache_bytes = sum(min(n, text_max_length) for n in lengths) * bundle.hidden_size * 4
    text_cache = None
    if not trainable_text and cache_bytes <= TEXT_CACHE_MAX_BYTES:
        text_cache = _TextStates(bundle, train_reports, text_max_length, dev, progress)

    # 3. Squeeze, UNet, image tower: initialised from the seed without touching the global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        squeeze = TokenSqueeze(
            text_dim=bundle.hidden_size,
            cross_attention_dim=cfg.cross_attention_dim,
            num_tokens=cfg.num_tokens,
            mode=squeeze_mode,
            **cfg.squeeze,
        )
        unet = build_unet(cfg, latent_channels=channels, latent_size=height)
        use_tower = ava_tls and section.align_weight > 0
        tower = ImageTower(in_channels=channels, **cfg.image_tower) if use_tower else None
    if not use_tower and hasattr(squeeze, "pool_proj"):
        # Without the InfoNCE loss the pooled embedding reaches no loss: a trainable parameter without gradient
        # would stop DistributedDataParallel (find_unused_parameters is off) at its second step.
        squeeze.pool_proj.requires_grad_(False)
    if tower is not None and tower.config.embed_dim != squeeze.config.embed_dim:
        raise ValueError(
            f"config {cfg.name}: image_tower embed_dim ({tower.config.embed_dim}) must equal squeeze embed_dim "
            f"({squeeze.config.embed_dim})"
        )
    with torch.device("meta"):
        meta_unet = UNet2DConditionModel.from_config(unet.config)
    flops = denoising_step_flops(meta_unet, cfg.num_tokens)
    unet_params = sum(p.numel() for p in unet.parameters())
    logger.info(
        "UNet %s: %.1f M parameters, %.3f GFLOPs per denoising step (one UNet pass at batch 1, latents %dx%dx%d, "
        "%d tokens; x2 with CFG). The paper reports %.3f GFLOPs for its 256 px model.",
        cfg.name,
        unet_params / 1e6,
        flops / 1e9,
        channels,
        height,
        width,
        cfg.num_tokens,
        PAPER_GFLOPS,
    )
    # The one home of the noise schedule: the sampling scheduler is built from this one's config.
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
    )
    objective = DiffusionObjective(
        unet,
        squeeze,
        noise_scheduler,
        cfg.prediction_type,
        image_tower=tower,
        text_encoder=text_encoder if trainable_text else None,
        snr_gamma=section.snr_gamma,
        align_weight=section.align_weight if ava_tls else 0.0,
    )
    if checkpoint is not None:
        objective.load_state_dict(load_file(checkpoint / CHECKPOINT_WEIGHTS, device="cpu"))
    objective.to(dev)

    # 4. Optimizer, schedule, EMA (of everything sampling uses: UNet, squeeze, a trained encoder).
    text_params = [p for p in text_encoder.parameters() if p.requires_grad] if trainable_text else []
    text_ids = {id(p) for p in text_params}
    main_params = [p for p in objective.parameters() if p.requires_grad and id(p) not in text_ids]
    groups = [{"params": main_params, "lr": section.learning_rate}]
    if text_params:
        scale = FINETUNE_LR_SCALE if policy == "finetune" else 1.0
        groups.append({"params": text_params, "lr": section.learning_rate * scale})
    optimizer = torch.optim.AdamW(groups, lr=section.learning_rate, weight_decay=1e-2)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer=optimizer, num_warmup_steps=section.lr_warmup_steps)
    ema_modules = [unet, squeeze] + ([text_encoder] if trainable_text else [])
    ema_params = [p for m in ema_modules for p in m.parameters()]
    ema = EMAModel(ema_params, decay=section.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)
    if checkpoint is not None:
        training_state = torch.load(checkpoint / CHECKPOINT_TRAINING_STATE, map_location="cpu", weights_only=True)
        try:
            optimizer.load_state_dict(training_state["optimizer"])
        except ValueError as err:
            # e.g. an AVA-TLS-off run saved before its unused pooled projection was frozen: other trainable set.
            raise InputError(
                f"--resume {checkpoint}: its optimizer state does not match the parameters this version trains "
                f"({err}). It was written by another version of diffcxr-aug; finish it with that version, or start "
                "a fresh run in another --out."
            ) from err
        lr_scheduler.load_state_dict(training_state["lr_scheduler"])
        ema.load_state_dict(training_state["ema"])
        logger.info("Resumed from %s at step %d", checkpoint, start_step)
    ema.to(dev)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    model = accelerator.unwrap_model(objective)

    # Fixed validation reports, their real images, and the pipeline used to sample them.
    val_rows = validation_rows(manifest, section.num_validation_reports, seed)
    val_reports = val_rows.frame["report"].tolist()
    val_real = [to_uint8(s["image"][None])[0] for s in CXRDataset(val_rows, cfg.image_size, progress=False)]
    val_captions = [label_caption(row, val_rows.label_names) for _, row in val_rows.frame.iterrows()]

    def sample_grid(step: int) -> Path | None:
        if not val_reports:
            return None
        ema.store(ema_params)
        ema.copy_to(ema_params)
        try:
            pipe = DiffCXRPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=bundle.tokenizer,
                token_squeeze=squeeze,
                unet=unet,
                scheduler=default_scheduler(noise_scheduler),
                max_text_tokens=bundle.max_length,
            )
            pipe.set_progress_bar_config(disable=True)
            images = pipe(
                val_reports,
                num_inference_steps=section.validation_steps,
                guidance_scale=section.validation_guidance,
                generator=torch.Generator().manual_seed(seed),
                output_type="pt",
            ).images
        finally:
            ema.restore(ema_params)
        return save_report_grid(
            val_reports,
            list(to_uint8(images)),
            out / SAMPLES_DIR / f"step-{step:06d}.png",
            real=val_real,
            captions=val_captions,
            title=f"{cfg.name}, AVA-TLS {'on' if ava_tls else 'off'}, step {step} (EMA, "
            f"{section.validation_steps} DPM-Solver++ steps, guidance {section.validation_guidance})",
        )

    state = {
        "config": cfg.to_dict(),
        "ava_tls": ava_tls,
        "seed": seed,
        "section": section.model_dump(mode="json"),
        "num_processes": accelerator.num_processes,
        "data": str(Path(manifest.source).resolve()),
    }
    # Training wall time before this invocation, as of the checkpoint resumed from (None: an older checkpoint that
    # did not record it). Time spent after the last checkpoint of an interrupted run is lost with its work.
    prior_minutes: float | None = 0.0
    if checkpoint is not None:
        checkpoint_state = json.loads((checkpoint / CHECKPOINT_STATE).read_text())
        prior_minutes = checkpoint_state.get("wall_minutes")
        previous = checkpoint_state.get("num_processes")
        if previous not in (None, accelerator.num_processes):
            logger.warning(
                "Resuming with %d processes, checkpoint had %d: data order differs",
                accelerator.num_processes,
                previous,
            )

    def wall_minutes() -> tuple[float, float | None]:
        """Minutes of this invocation (VAE training included) and of the whole run so far."""
        this = (time.monotonic() - run_started) / 60
        return round(this, 2), None if prior_minutes is None else round(prior_minutes + this, 2)

    loss_csv = out / LOSS_CSV
    if main:
        if checkpoint is None:
            loss_csv.unlink(missing_ok=True)
        else:
            _truncate_loss_log(loss_csv, start_step)
    scratch_tokenizer = bundle.tokenizer if cfg.text_encoder == "scratch" else None

    # 5. The loop: optimizer steps of `accum` micro-batches.
    accum = section.gradient_accumulation_steps
    stream = _BatchStream(len(train), section.batch_size, seed, accelerator.process_index, accelerator.num_processes)

    def text_inputs(texts: list[str]) -> dict[str, torch.Tensor]:
        if text_cache is not None:
            return text_cache.batch(texts, dev)
        tokens = tokenize(bundle.tokenizer, texts, text_max_length, dev)
        if trainable_text:
            return tokens  # encoded inside the objective, with gradients
        with torch.no_grad():
            states, mask = encode_tokens(text_encoder, tokens)
        return {"states": states, "attention_mask": mask}

    null_text = text_inputs([""])
    step = start_step
    started = time.time()
    pending: list[dict[str, Any]] = []
    bar = tqdm(total=section.max_steps, initial=step, desc=f"training {cfg.name}", disable=not progress, unit="step")
    objective.train()
    while step < section.max_steps:
        totals: dict[str, float] = {}
        for k in range(accum):
            micro = step * accum + k
            rows = stream.indices(micro)
            generator = stream.generator(micro)
            batch_latents = latents[rows]
            noise = torch.randn(batch_latents.shape, generator=generator)
            timesteps = torch.randint(0, cfg.num_train_timesteps, (len(rows),), generator=generator)
            drop = torch.rand(len(rows), generator=generator) < section.cfg_dropout
            reports = [train_reports[i] for i in rows]
            text = text_inputs(reports)
            sync = contextlib.nullcontext() if k == accum - 1 else accelerator.no_sync(objective)
            with sync:
                losses = objective(
                    batch_latents.to(dev),
                    noise.to(dev),
                    timesteps.to(dev),
                    drop.to(dev),
                    text,
                    null_text,
                    same_text_mask(reports).to(dev),
                )
                accelerator.backward(losses["loss"] / accum)
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach()) / accum
        accelerator.clip_grad_norm_(objective.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(ema_params)
        step += 1

        values = torch.tensor([totals.get(c, float("nan")) for c in LOSS_COLUMNS[1:4]], device=dev)
        reduced = accelerator.reduce(values, "mean")
        pending.append(
            {
                "step": step,
                **dict(zip(LOSS_COLUMNS[1:4], reduced.tolist(), strict=True)),
                "lr": lr_scheduler.get_last_lr()[0],
                "logit_scale": float(model.image_tower.logit_scale.detach().exp())
                if model.image_tower is not None
                else None,
                "elapsed_s": round(time.time() - started, 2),
            }
        )
        last_loss = pending[-1]["loss"]
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")
        out_of_time = False
        if section.time_limit_minutes is not None:
            # Every process must stop at the same step: the main process's clock decides.
            flag = torch.tensor([float(time.monotonic() - run_started > 60 * section.time_limit_minutes)], device=dev)
            out_of_time = bool(accelerator.reduce(flag, "max").item()) and step < section.max_steps
            if out_of_time:
                logger.warning(
                    "time limit of %s minutes reached at step %d of %d: saving and stopping",
                    section.time_limit_minutes,
                    step,
                    section.max_steps,
                )
        last = step == section.max_steps or out_of_time
        if main and (step % section.log_every == 0 or last):
            _append_loss_rows(loss_csv, pending)
            pending = []
        if step % section.checkpoint_every == 0 or last:
            if main:
                if pending:
                    _append_loss_rows(loss_csv, pending)
                    pending = []
                _save_checkpoint(
                    out,
                    step,
                    model,
                    optimizer,
                    lr_scheduler,
                    ema,
                    {**state, "wall_minutes": wall_minutes()[1]},
                    scratch_tokenizer,
                    section.checkpoints_total_limit,
                )
                save_loss_plot(loss_csv, out / LOSS_PNG)
            accelerator.wait_for_everyone()
        if step % section.sample_every == 0 or last:
            if main:
                path = sample_grid(step)
                logger.info("step %d: loss %.4f; samples in %s", step, last_loss, path)
            accelerator.wait_for_everyone()
        if out_of_time:
            break
    bar.close()

    # 7. The pipeline with the EMA weights.
    # Nothing trained (a rerun of a finished job): the pipeline and its training_info.json, with the run's real
    # timing, stay as they are.
    up_to_date = step == start_step and (out / "model_index.json").is_file()
    if main and up_to_date:
        logger.info("%s already trained to step %d; the pipeline folder is up to date", out, step)
    elif main:
        ema.copy_to(ema_params)
        pipeline = DiffCXRPipeline(
            vae=vae.cpu(),
            text_encoder=text_encoder.cpu(),
            tokenizer=bundle.tokenizer,
            token_squeeze=squeeze.cpu(),
            unet=unet.cpu(),
            scheduler=default_scheduler(noise_scheduler),
            max_text_tokens=bundle.max_length,
        )
        save_pipeline_folder(pipeline, out)
        if tower is not None:
            model.image_tower.cpu().save_pretrained(out / "image_tower")
        minutes_this, minutes_total = wall_minutes()
        info = {
            "stage": 1,
            "config": cfg.to_dict(),
            "ava_tls": ava_tls,
            "ava_tls_meaning": "squeeze all report tokens to K with InfoNCE image alignment"
            if ava_tls
            else "baseline: the encoder sees the first K tokens, linear projection, no alignment",
            "text_encoder": {
                "source": cfg.text_encoder,
                "backend": bundle.backend,
                "policy": policy,
                "max_length": text_max_length,
                "train_reports_truncated": truncated,
            },
            "vae": vae_info,
            "unet_params": unet_params,
            "gflops_per_denoising_step": flops / 1e9,
            "paper_gflops": PAPER_GFLOPS,
            "steps": step,
            "stopped_by_time_limit": step < section.max_steps,
            # Wall clock of this invocation (VAE training included), and of every invocation that led to these
            # weights (None when resumed from a checkpoint that did not record it).
            "wall_minutes_this_invocation": minutes_this,
            "wall_minutes_total": minutes_total,
            "resumed_from_step": start_step,
            "seed": seed,
            "num_processes": accelerator.num_processes,
            "mixed_precision": mixed_precision,
            "device": str(dev),
            "data": state["data"],
            "train_images": len(train),
            "section": section.model_dump(mode="json"),
        }
        atomic_write_json(out / TRAINING_INFO, info)
        atomic_write_text(out / "README.txt", _folder_readme(cfg, ava_tls, step))
    accelerator.wait_for_everyone()
    return out


def _folder_readme(cfg: GeneratorConfig, ava_tls: bool, step: int) -> str:
    return (
        f"Diff-CXR stage-1 pipeline ({cfg.name}, AVA-TLS {'on' if ava_tls else 'off'}, {step} steps).\n\n"
        "Load: DiffCXRPipeline.from_pretrained(this folder) (from diffcxr_aug.generator.pipeline).\n"
        "checkpoints/: resumable training state; logs/: loss.csv, loss.png; samples/: validation grids;\n"
        "training_info.json: the resolved configuration, encoder policy, VAE metrics and GFLOPs.\n"
    )
