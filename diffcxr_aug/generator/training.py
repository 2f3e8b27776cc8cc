"""Diff-CXR training under accelerate: stage 1, a report-conditioned latent diffusion model with AVA-TLS; stage 2,
the DKIM adapter on the frozen stage-1 model.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn
from tqdm.auto import tqdm

from diffcxr_aug.data.manifest import Manifest, read_manifest
from diffcxr_aug.data.showcase import showcase_rows
from diffcxr_aug.errors import InputError, MissingInputError, OutputInUseError
from diffcxr_aug.generator.configs import PAPER_GFLOPS, GeneratorConfig, denoising_step_flops, resolve_config
from diffcxr_aug.generator.settings import GeneratorSettings
from diffcxr_aug.generator.token_squeeze import TokenSqueeze
from diffcxr_aug.io import atomic_path, atomic_write_json, atomic_write_text
from diffcxr_aug.runtime import attention_backend, attention_backend_name, resolve_device, resolve_mixed_precision

if TYPE_CHECKING:
    from diffcxr_aug.generator.vae import VAEPlan

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
        adapter: stage 2: the DKIM adapter, reading the knowledge tokens; its residuals enter the UNet (which,
            with the rest of stage 1, is frozen). Checkpoints then hold only the modules that train.
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
        adapter: nn.Module | None = None,
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
        self.adapter = adapter

    def checkpoint_keys(self) -> list[str]:
        """The state-dict keys a checkpoint holds: everything in stage 1; in stage 2 the modules that train (the
        adapter, and the squeeze when it is unfrozen), not the frozen stage-1 weights the run loads anyway."""
        keys = list(self.state_dict())
        if self.adapter is None:
            return keys
        trains = ["adapter."] + (
            ["token_squeeze."] if any(p.requires_grad for p in self.token_squeeze.parameters()) else []
        )
        return [k for k in keys if k.startswith(tuple(trains))]

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
        knowledge: dict[str, torch.Tensor] | None = None,
        drop_knowledge: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        from diffusers.training_utils import compute_snr

        from diffcxr_aug.generator.ava_tls import info_nce

        cond = self.condition(text)
        null = self.condition(null_text)  # the empty report (and empty knowledge), batch of one
        tokens, mask = _dropped(cond, null, drop)

        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"Unsupported prediction_type {self.prediction_type!r}")
        residuals = {}
        if self.adapter is not None:
            if knowledge is None or drop_knowledge is None:
                raise ValueError("the DKIM objective needs `knowledge` and `drop_knowledge`")
            knowledge_tokens, knowledge_mask = _dropped(self.condition(knowledge), null, drop_knowledge)
            down, mid = self.adapter(
                noisy, timesteps, encoder_hidden_states=knowledge_tokens, encoder_attention_mask=knowledge_mask,
                return_dict=False,
            )  # fmt: skip
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        pred = self.unet(
            noisy, timesteps, encoder_hidden_states=tokens, encoder_attention_mask=mask, **residuals
        ).sample
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


def compile_networks(objective: DiffusionObjective) -> list[str]:
    """``torch.compile`` (inductor) the networks a training step runs: the UNet, the token squeeze, the image tower
    and the DKIM adapter, where present. In place (``nn.Module.compile``): each module, its parameters and its
    state-dict keys stay what they were, so checkpoints, the EMA and the saved pipeline are the eager ones'.
    Returns the names compiled. On 2 CPU cores compiling the squeeze and the tower saves nearly as much a step as
    compiling the UNet (``bench/compile_scope.py``)."""
    names = []
    for name in ("unet", "token_squeeze", "image_tower", "adapter"):
        module = getattr(objective, name)
        if module is not None:
            module.compile()
            names.append(name)
    return names


def _dropped(cond: Any, null: Any, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Condition tokens and mask with the rows in ``drop`` replaced by the empty text's (classifier-free guidance)."""
    keep = ~drop
    tokens = torch.where(keep[:, None, None], cond.tokens, null.tokens.expand_as(cond.tokens))
    mask = None
    if cond.attention_mask is not None:
        mask = torch.where(keep[:, None], cond.attention_mask, null.attention_mask.expand_as(cond.attention_mask))
    return tokens, mask


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

    def batch(self, reports: Sequence[str], device: torch.device, pad_to: int = 0) -> dict[str, torch.Tensor]:
        """Padded to the batch's longest report, or to at least ``pad_to`` tokens (one shape for every batch: a
        compiled squeeze then compiles once instead of again for varying lengths; the padding is masked)."""
        states = [self.states[self.index[r]] for r in reports]
        length = max(pad_to, *(s.shape[0] for s in states))
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


def _prepare_vae(run: _Run):
    """Load the VAE the config names (a folder or hub id), or train the registered one on the manifest first (main
    process only), with ``run.vae_plan``'s settings when it plans that one, else the config's."""
    from diffcxr_aug.generator.settings import VAESettings
    from diffcxr_aug.generator.vae import VAE_CONFIGS, load_vae, plan_vae

    cfg, accelerator = run.cfg, run.accelerator
    info: dict[str, Any] = {"vae": cfg.vae}
    if cfg.vae in VAE_CONFIGS:
        folder = run.out / TRAINED_VAE_DIR
        plan = run.vae_plan
        if plan is None or plan.config != cfg.vae:
            plan = plan_vae(VAESettings(config=cfg.vae), cfg)
        if not (folder / "metrics.json").is_file() and accelerator.is_main_process:
            logger.info("Training a %s KL-VAE on %s for %d steps first", cfg.vae, run.manifest.source, plan.steps)
            device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)
            plan.train(run.manifest, folder, device=device, seed=run.seed, progress=run.main)
        accelerator.wait_for_everyone()
        vae = load_vae(folder)
        info.update(trained=True, metrics=json.loads((folder / "metrics.json").read_text()))
        logger.info("VAE: val PSNR %.2f dB, SSIM %.4f", info["metrics"]["psnr"], info["metrics"]["ssim"])
    else:
        vae = load_vae(cfg.vae)
        info["trained"] = False
        metrics = Path(cfg.vae) / "metrics.json"
        if metrics.is_file():  # a KL-VAE trained by this project (the train-vae step): keep its val PSNR/SSIM
            info["metrics"] = json.loads(metrics.read_text())
    return vae.requires_grad_(False).eval(), info


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
            lock.close()


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


@dataclass
class _Run:
    """One invocation of :func:`train_generator`: its settings, then what the build steps add to it."""

    stage: int
    cfg: GeneratorConfig
    section: GeneratorSettings
    manifest: Manifest
    train: Manifest
    out: Path
    accelerator: Any
    seed: int
    ava_tls: bool
    checkpoint: Path | None
    start_step: int
    mixed_precision: str
    run_started: float
    stage1: Path | None = None
    stage1_info: dict[str, Any] = field(default_factory=dict)  # stage 2: the stage-1 folder's training_info.json
    checkpoint_state: dict[str, Any] = field(default_factory=dict)  # the state.json of the checkpoint resumed
    vae_plan: VAEPlan | None = None  # the recipe's VAE settings, for a registry VAE trained here
    # Added by the build steps.
    vae: Any = None
    vae_info: dict[str, Any] = field(default_factory=dict)
    bundle: Any = None
    trainable_text: bool = False
    text_max_length: int = 0
    truncated: int = 0
    text_cache: _TextStates | None = None
    latents: torch.Tensor | None = None
    knowledge: list[str] | None = None
    squeeze: Any = None
    unet: Any = None
    tower: Any = None
    adapter: Any = None
    noise_scheduler: Any = None
    objective: Any = None
    optimizer: Any = None
    lr_scheduler: Any = None
    ema: Any = None
    ema_params: list[torch.nn.Parameter] = field(default_factory=list)
    flops: float = 0.0
    unet_params: int = 0
    prior_minutes: float | None = 0.0
    compiled: list[str] = field(default_factory=list)

    @property
    def dev(self) -> torch.device:
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def max_steps(self) -> int:
        return self.section.max_steps if self.stage == 1 else self.section.stage2_steps

    @property
    def learning_rate(self) -> float:
        if self.stage == 2 and self.section.stage2_learning_rate is not None:
            return self.section.stage2_learning_rate
        return self.section.learning_rate

    @property
    def model(self) -> DiffusionObjective:
        return self.accelerator.unwrap_model(self.objective)

    def state(self) -> dict[str, Any]:
        """What every checkpoint records besides its step."""
        return {
            "stage": self.stage,
            "config": self.cfg.to_dict(),
            "ava_tls": self.ava_tls,
            "seed": self.seed,
            "section": self.section.model_dump(mode="json"),
            "num_processes": self.accelerator.num_processes,
            "data": str(Path(self.manifest.source).resolve()),
            "stage1": None if self.stage1 is None else str(self.stage1.resolve()),
            "mixed_precision": self.mixed_precision,
        }


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
        state = json.loads((checkpoint / CHECKPOINT_STATE).read_text())
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

    accelerator, mixed_precision = _accelerator(device, section.mixed_precision)
    if checkpoint is not None and state.get("mixed_precision", mixed_precision) != mixed_precision:
        logger.warning(
            "Resuming %s, trained in %s, in %s (mixed_precision %s here)",
            checkpoint, state["mixed_precision"], mixed_precision, section.mixed_precision,
        )  # fmt: skip
    run = _Run(
        stage, cfg, section, manifest, train, out, accelerator, seed, ava_tls, checkpoint, start_step,
        mixed_precision, run_started, stage1=stage1, stage1_info=stage1_info, checkpoint_state=state,
        vae_plan=vae_plan,
    )  # fmt: skip
    try:
        if stage == 1:
            _build_stage1(run)
        else:
            _build_stage2(run)
        _build_optimisation(run)
        if section.compile:
            run.compiled = compile_networks(run.model)
            logger.info("Compiling %s (torch.compile, inductor); the first steps wait for it", ", ".join(run.compiled))
        step = _loop(run)
        if run.main:
            _save_pipeline(run, step)
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


# ------------------------------------------------------------------------------------------------ the build steps
def _build_stage1(run: _Run) -> None:
    """1. the latent space; 2. the report encoder; 3. the squeeze, UNet and image tower, from the seed."""
    from diffcxr_aug.generator.ava_tls import ImageTower
    from diffcxr_aug.generator.configs import build_unet
    from diffcxr_aug.generator.text_encoder import load_text_encoder

    cfg, section, seed = run.cfg, run.section, run.seed
    train_reports = run.train.frame["report"].tolist()
    # The train split is encoded once the text encoder has loaded, so a missing encoder fails before minutes of
    # encoding.
    run.vae, run.vae_info = _prepare_vae(run)
    run.vae = run.vae.to(run.dev)
    # The scratch tokenizer is learned from the train reports (or read back on resume).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        run.bundle = load_text_encoder(
            cfg.text_encoder, cfg.max_text_tokens, reports=train_reports, scratch_config=cfg.scratch_text, seed=seed
        )
    if run.checkpoint is not None and (run.checkpoint / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        run.bundle.tokenizer = AutoTokenizer.from_pretrained(run.checkpoint / "tokenizer")
    squeeze_mode = "squeeze" if run.ava_tls else "truncate"
    run.trainable_text = cfg.text_encoder_policy in ("finetune", "train")
    _prepare_text(run, cfg.num_tokens if squeeze_mode == "truncate" else run.bundle.max_length)

    # Initialised from the seed without touching the global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        run.squeeze = TokenSqueeze(
            text_dim=run.bundle.hidden_size,
            cross_attention_dim=cfg.cross_attention_dim,
            num_tokens=cfg.num_tokens,
            mode=squeeze_mode,
            **cfg.squeeze,
        )
        run.unet = build_unet(cfg, latent_channels=run.latents.shape[1], latent_size=run.latents.shape[2])
        use_tower = run.ava_tls and section.align_weight > 0
        run.tower = ImageTower(in_channels=run.latents.shape[1], **cfg.image_tower) if use_tower else None
    if not use_tower and hasattr(run.squeeze, "pool_proj"):
        # Without the InfoNCE loss the pooled embedding reaches no loss: a trainable parameter without gradient
        # would stop DistributedDataParallel (find_unused_parameters is off) at its second step.
        run.squeeze.pool_proj.requires_grad_(False)
    if run.tower is not None and run.tower.config.embed_dim != run.squeeze.config.embed_dim:
        raise ValueError(
            f"config {cfg.name}: image_tower embed_dim ({run.tower.config.embed_dim}) must equal squeeze embed_dim "
            f"({run.squeeze.config.embed_dim})"
        )
    # The one home of the noise schedule: the sampling scheduler is built from this one's config.
    run.noise_scheduler = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
    )
    _log_unet(run)
    run.objective = DiffusionObjective(
        run.unet,
        run.squeeze,
        run.noise_scheduler,
        cfg.prediction_type,
        image_tower=run.tower,
        text_encoder=run.bundle.model if run.trainable_text else None,
        snr_gamma=section.snr_gamma,
        align_weight=section.align_weight if run.ava_tls else 0.0,
    )


def _build_stage2(run: _Run) -> None:
    """The stage-1 pipeline, frozen; the knowledge text of every train row; the adapter from its UNet."""
    from diffcxr_aug.generator.disease_adapter import DiseaseKnowledgeAdapter
    from diffcxr_aug.generator.knowledge import knowledge_texts
    from diffcxr_aug.generator.pipeline import DiffCXRPipeline
    from diffcxr_aug.generator.text_encoder import TextEncoderBundle

    section = run.section
    pipe = DiffCXRPipeline.from_pretrained(run.stage1, adapter=None)
    info = run.stage1_info
    run.vae, run.vae_info = pipe.vae.requires_grad_(False).eval().to(run.dev), info.get("vae", {})
    text = info.get("text_encoder", {})
    run.bundle = TextEncoderBundle(
        pipe.text_encoder.eval(), pipe.tokenizer, pipe.config.max_text_tokens, text.get("source", ""),
        text.get("backend", ""),
    )  # fmt: skip
    run.bundle.model.requires_grad_(False)
    run.squeeze = pipe.token_squeeze.requires_grad_(section.stage2_unfreeze_squeeze)
    if section.stage2_unfreeze_squeeze and hasattr(run.squeeze, "pool_proj"):
        run.squeeze.pool_proj.requires_grad_(False)  # stage 2 has no InfoNCE loss: the pooled embedding is unused
    run.unet = pipe.unet.requires_grad_(False)
    # The stage-1 training schedule, recovered from the config its sampling scheduler was built from.
    run.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    run.knowledge = knowledge_texts(
        run.train.frame[run.train.label_names], section.dkim_templates, section.dkim_states
    )
    _prepare_text(run, pipe.text_max_length, extra_texts=run.knowledge)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        run.adapter = DiseaseKnowledgeAdapter.from_unet(
            run.unet, knowledge_templates=section.dkim_templates, knowledge_states=section.dkim_states
        )
    _log_unet(run)
    logger.info(
        "DKIM stage 2 on %s: adapter %.1f M parameters (the stage-1 model frozen%s); knowledge e.g. %r",
        run.stage1,
        sum(p.numel() for p in run.adapter.parameters()) / 1e6,
        ", squeeze trained" if section.stage2_unfreeze_squeeze else "",
        run.knowledge[0],
    )
    run.objective = DiffusionObjective(
        run.unet,
        run.squeeze,
        run.noise_scheduler,
        run.cfg.prediction_type,
        snr_gamma=section.snr_gamma,
        adapter=run.adapter,
    )


def _prepare_text(run: _Run, max_length: int, extra_texts: Sequence[str] = ()) -> None:
    """Encode the train split's latents, and cache a frozen encoder's token states of every distinct report (and
    knowledge text) unless they would not fit in memory (a MIMIC-size corpus with a BERT-base encoder)."""
    from diffcxr_aug.generator.text_encoder import token_lengths
    from diffcxr_aug.generator.vae import encode_manifest

    reports = run.train.frame["report"].tolist()
    run.text_max_length = max_length
    lengths = token_lengths(run.bundle.tokenizer, reports)
    run.truncated = sum(n > max_length for n in lengths)
    logger.info(
        "Text encoder %s (%s, %s): %d of %d train reports are longer than the %d tokens it sees%s",
        run.cfg.text_encoder,
        run.bundle.backend,
        run.cfg.text_encoder_policy if run.stage == 1 else "frozen",
        run.truncated,
        len(reports),
        max_length,
        "" if run.ava_tls else " (AVA-TLS off: the first K tokens only)",
    )
    run.latents = encode_manifest(run.vae, run.train, run.cfg.image_size, device=run.dev, progress=run.main)
    text_encoder = run.bundle.model.to(run.dev).eval()  # eval: no dropout, so resume stays exact
    text_encoder.requires_grad_(run.trainable_text)
    if run.trainable_text and getattr(text_encoder, "pooler", None) is not None:
        text_encoder.pooler.requires_grad_(False)  # unused: the squeeze reads the token states
    texts = [*reports, *extra_texts]
    cache_bytes = (
        sum(min(n, max_length) for n in token_lengths(run.bundle.tokenizer, texts)) * run.bundle.hidden_size * 4
    )
    if not run.trainable_text and cache_bytes <= TEXT_CACHE_MAX_BYTES:
        run.text_cache = _TextStates(run.bundle, texts, max_length, run.dev, run.main)


def _log_unet(run: _Run) -> None:
    with torch.device("meta"):
        meta_unet = UNet2DConditionModel.from_config(run.unet.config)
        meta_adapter = None if run.adapter is None else type(run.adapter).from_config(run.adapter.config)
    run.flops = denoising_step_flops(meta_unet, run.cfg.num_tokens, meta_adapter)
    run.unet_params = sum(p.numel() for p in run.unet.parameters())
    channels, height, width = run.latents.shape[1:]
    logger.info(
        "UNet %s: %.1f M parameters, %.3f GFLOPs per denoising step (one UNet pass%s at batch 1, latents "
        "%dx%dx%d, %d tokens; x2 with CFG). The paper reports %.3f GFLOPs for its 256 px model.",
        run.cfg.name,
        run.unet_params / 1e6,
        run.flops / 1e9,
        "" if run.adapter is None else " and one adapter pass",
        channels,
        height,
        width,
        run.cfg.num_tokens,
        PAPER_GFLOPS,
    )


def _build_optimisation(run: _Run) -> None:
    """4. AdamW, warm-up then constant LR, an EMA of everything sampling uses that trains; restored on resume."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    objective, section, lr = run.objective, run.section, run.learning_rate
    if run.checkpoint is not None:
        _load_trainable(objective, run.checkpoint / CHECKPOINT_WEIGHTS)
    objective.to(run.dev)
    text_encoder = run.bundle.model
    text_params = [p for p in text_encoder.parameters() if p.requires_grad] if run.trainable_text else []
    text_ids = {id(p) for p in text_params}
    main_params = [p for p in objective.parameters() if p.requires_grad and id(p) not in text_ids]
    groups = [{"params": main_params, "lr": lr}]
    if text_params:
        scale = FINETUNE_LR_SCALE if run.cfg.text_encoder_policy == "finetune" else 1.0
        groups.append({"params": text_params, "lr": lr * scale})
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=1e-2)
    run.lr_scheduler = get_scheduler(
        "constant_with_warmup", optimizer=optimizer, num_warmup_steps=section.lr_warmup_steps
    )
    if run.stage == 1:
        ema_modules = [run.unet, run.squeeze] + ([text_encoder] if run.trainable_text else [])
    else:
        ema_modules = [run.adapter] + ([run.squeeze] if section.stage2_unfreeze_squeeze else [])
    run.ema_params = [p for m in ema_modules for p in m.parameters()]
    run.ema = EMAModel(run.ema_params, decay=section.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3)
    if run.checkpoint is not None:
        state = torch.load(run.checkpoint / CHECKPOINT_TRAINING_STATE, map_location="cpu", weights_only=True)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as err:
            # e.g. an AVA-TLS-off run saved before its unused pooled projection was frozen: other trainable set.
            raise InputError(
                f"--resume {run.checkpoint}: its optimizer state does not match the parameters this version trains "
                f"({err}). It was written by another version of diffcxr-aug; finish it with that version, or start "
                "a fresh run in another --out."
            ) from err
        run.lr_scheduler.load_state_dict(state["lr_scheduler"])
        run.ema.load_state_dict(state["ema"])
        logger.info("Resumed from %s at step %d", run.checkpoint, run.start_step)
    run.ema.to(run.dev)
    run.objective, run.optimizer = run.accelerator.prepare(objective, optimizer)


def _load_trainable(objective: DiffusionObjective, path: Path) -> None:
    """Load a checkpoint's weights: all of the objective (stage 1) or the modules that train (stage 2)."""
    from safetensors.torch import load_file

    saved = load_file(path, device="cpu")
    missing, unexpected = objective.load_state_dict(saved, strict=False)
    expected = set(objective.checkpoint_keys())
    if unexpected or expected - set(saved):
        raise InputError(
            f"{path}: its weights do not match what this run trains (missing {sorted(expected - set(saved))[:3]}, "
            f"unexpected {unexpected[:3]}); it was written by another version or stage; start a fresh run in "
            "another --out"
        )


# ---------------------------------------------------------------------------------------------------- the loop
def _loop(run: _Run) -> int:
    """5-6. Optimizer steps of ``gradient_accumulation_steps`` micro-batches, checkpoints, logs and grids; returns
    the last step.

    Longer than the package's other functions on purpose: it is the training loop in the form diffusers' training
    examples use (one ``while`` over steps: batch, forward/backward under the attention backend, clip, optimiser,
    EMA, then log / checkpoint / sample on their cadences), read top to bottom; the pieces with their own logic
    (the batch stream, checkpoint writing, the loss log, the sample grids, the time limit) are already functions.
    """
    from diffcxr_aug.generator.ava_tls import same_text_mask
    from diffcxr_aug.generator.figures import save_loss_plot
    from diffcxr_aug.generator.text_encoder import encode_tokens, tokenize

    section, accelerator, dev, main = run.section, run.accelerator, run.dev, run.main
    objective, model, max_steps = run.objective, run.model, run.max_steps
    train_reports = run.train.frame["report"].tolist()
    grids = _SampleGrids(run)
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
        with torch.no_grad():
            states, mask = encode_tokens(run.bundle.model, tokens)
        return {"states": states, "attention_mask": mask}

    accum = section.gradient_accumulation_steps
    stream = _BatchStream(
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
        accelerator.clip_grad_norm_(objective.parameters(), 1.0)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.ema.step(run.ema_params)
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
                _save_checkpoint(
                    run.out,
                    step,
                    model,
                    run.optimizer,
                    run.lr_scheduler,
                    run.ema,
                    {**run.state(), "wall_minutes": _wall_minutes(run)[1]},
                    scratch_tokenizer,
                    section.checkpoints_total_limit,
                )
                save_loss_plot(loss_csv, run.out / LOSS_PNG)
            accelerator.wait_for_everyone()
        if step % section.sample_every == 0 or last:
            if main:
                path = grids.save(step)
                logger.info("step %d: loss %.4f; samples in %s", step, last_loss, path)
            accelerator.wait_for_everyone()
        if out_of_time:
            break
    bar.close()
    return step


def _out_of_time(run: _Run, step: int) -> bool:
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


def _wall_minutes(run: _Run) -> tuple[float, float | None]:
    """Minutes of this invocation (VAE training included) and of the whole run so far."""
    this = (time.monotonic() - run.run_started) / 60
    prior = run.prior_minutes
    return round(this, 2), None if prior is None else round(prior + this, 2)


def _pipeline(run: _Run, device: torch.device | str | None = None) -> Any:
    """The pipeline of the current weights (the caller swaps the EMA weights in)."""
    from diffcxr_aug.generator.pipeline import DiffCXRPipeline, default_scheduler

    modules = {
        "vae": run.vae,
        "text_encoder": run.bundle.model,
        "token_squeeze": run.squeeze,
        "unet": run.unet,
        "adapter": run.adapter,
    }
    if device is not None:
        modules = {k: None if m is None else m.to(device) for k, m in modules.items()}
    return DiffCXRPipeline(
        **modules,
        tokenizer=run.bundle.tokenizer,
        scheduler=default_scheduler(run.noise_scheduler),
        max_text_tokens=run.bundle.max_length,
    )


class _SampleGrids:
    """Fixed validation reports (with their labels, for the adapter's knowledge), their real images, and a grid of
    the EMA model's images for them."""

    def __init__(self, run: _Run) -> None:
        from diffcxr_aug.data.dataset import CXRDataset
        from diffcxr_aug.generator.vae import to_uint8

        self.run = run
        self.rows = validation_rows(run.manifest, run.section.num_validation_reports, run.seed)
        self.reports = self.rows.frame["report"].tolist()
        self.real = [to_uint8(s["image"][None])[0] for s in CXRDataset(self.rows, run.cfg.image_size, progress=False)]
        self.captions = [label_caption(row, self.rows.label_names) for _, row in self.rows.frame.iterrows()]

    def save(self, step: int) -> Path | None:
        from diffcxr_aug.generator.figures import save_report_grid
        from diffcxr_aug.generator.vae import to_uint8

        run, section = self.run, self.run.section
        if not self.reports:
            return None
        knowledge = {} if run.adapter is None else {"labels": self.rows.frame[self.rows.label_names]}
        run.ema.store(run.ema_params)
        run.ema.copy_to(run.ema_params)
        try:
            # Eager under a compiled UNet: a few grids do not pay for compiling the inference graphs.
            with torch.compiler.set_stance("force_eager"):
                pipe = _pipeline(run)
                pipe.set_progress_bar_config(disable=True)
                images = pipe(
                    self.reports,
                    num_inference_steps=section.validation_steps,
                    guidance_scale=section.validation_guidance,
                    generator=torch.Generator().manual_seed(run.seed),
                    output_type="pt",
                    **knowledge,
                ).images
        finally:
            run.ema.restore(run.ema_params)
        what = f"AVA-TLS {'on' if run.ava_tls else 'off'}" + (", DKIM adapter" if run.stage == 2 else "")
        return save_report_grid(
            self.reports,
            list(to_uint8(images)),
            run.out / SAMPLES_DIR / f"step-{step:06d}.png",
            real=self.real,
            captions=self.captions,
            title=f"{run.cfg.name}, {what}, step {step} (EMA, {section.validation_steps} DPM-Solver++ steps, "
            f"guidance {section.validation_guidance})",
        )


# -------------------------------------------------------------------------------------------------- the output
def _save_pipeline(run: _Run, step: int) -> None:
    """7. The pipeline with the EMA weights, and ``training_info.json``. Nothing trained (a rerun of a finished
    job): the pipeline and its training_info.json, with the run's real timing, stay as they are."""
    out = run.out
    if step == run.start_step and (out / "model_index.json").is_file():
        logger.info("%s already trained to step %d; the pipeline folder is up to date", out, step)
        return
    run.ema.copy_to(run.ema_params)
    save_pipeline_folder(_pipeline(run, device="cpu"), out)
    if run.tower is not None:
        run.model.image_tower.cpu().save_pretrained(out / "image_tower")
    minutes_this, minutes_total = _wall_minutes(run)
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
