"""One invocation of :func:`~diffcxr_aug.generator.training.train_generator` (:class:`TrainingRun`: its settings
and everything the run builds) and the build steps that fill it in before the loop starts:

1. the latent space: a pretrained ``AutoencoderKL``, or a small KL-VAE trained on the manifest first
   (``trained_vae/``, with val PSNR/SSIM in ``trained_vae/metrics.json``); the manifest's latents are read from its
   latent store (:mod:`~diffcxr_aug.generator.latent_store`), encoded there once for every run, rank and resume on
   that VAE (and found there when LNFS scored the same images with it);
2. the report encoder (frozen: its token states are computed once per distinct report and reused, from memory, or
   from a memory-mapped store beside the manifest's caches when they do not fit there);
3. the token squeeze (AVA-TLS, or the truncation baseline), the UNet, the image tower for the InfoNCE loss
   (:func:`build_stage1`); or the frozen stage-1 model and the DKIM adapter built from its UNet (:func:`build_stage2`);
4. AdamW, a warm-up then constant learning rate, an EMA of the weights that sampling uses, restored from the
   checkpoint on resume (:func:`build_optimisation`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from diffcxr_aug.data.cache import CACHE_DIR, open_cache
from diffcxr_aug.data.manifest import Manifest
from diffcxr_aug.generator.batches import (
    TEXT_CACHE_MAX_BYTES,
    TextStates,
    TextStateStore,
    distinct_texts,
    open_text_states,
)
from diffcxr_aug.generator.checkpoints import load_trainable, load_training_state
from diffcxr_aug.generator.configs import PAPER_GFLOPS, GeneratorConfig, denoising_step_flops
from diffcxr_aug.generator.latent_store import LatentRows, open_latent_store
from diffcxr_aug.generator.objective import DiffusionObjective
from diffcxr_aug.generator.settings import GeneratorSettings
from diffcxr_aug.generator.token_squeeze import TokenSqueeze

if TYPE_CHECKING:
    from diffcxr_aug.generator.vae import VAEPlan

logger = logging.getLogger(__name__)

TRAINED_VAE_DIR = "trained_vae"
# Learning-rate multiplier for a pretrained encoder that is fine-tuned (a from-scratch one gets 1.0).
FINETUNE_LR_SCALE = 0.1


@dataclass
class TrainingRun:
    """One invocation of :func:`~diffcxr_aug.generator.training.train_generator`: its settings, then what the build
    steps add to it."""

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
    text_cache: TextStates | TextStateStore | None = None
    latents: LatentRows | None = None  # the train split's rows of the latent store, read a batch at a time
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

    def wall_minutes(self) -> tuple[float, float | None]:
        """Minutes of this invocation (VAE training included) and of the whole run so far."""
        this = (time.monotonic() - self.run_started) / 60
        prior = self.prior_minutes
        return round(this, 2), None if prior is None else round(prior + this, 2)

    def pipeline(self, device: torch.device | str | None = None) -> Any:
        """The pipeline of the current weights (the caller swaps the EMA weights in)."""
        from diffcxr_aug.generator.pipeline import DiffCXRPipeline, default_scheduler

        modules = {
            "vae": self.vae,
            "text_encoder": self.bundle.model,
            "token_squeeze": self.squeeze,
            "unet": self.unet,
            "adapter": self.adapter,
        }
        if device is not None:
            modules = {k: None if m is None else m.to(device) for k, m in modules.items()}
        return DiffCXRPipeline(
            **modules,
            tokenizer=self.bundle.tokenizer,
            scheduler=default_scheduler(self.noise_scheduler),
            max_text_tokens=self.bundle.max_length,
        )


def build_stage1(run: TrainingRun) -> None:
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


def build_stage2(run: TrainingRun) -> None:
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


def build_optimisation(run: TrainingRun) -> None:
    """4. AdamW, warm-up then constant LR, an EMA of everything sampling uses that trains; restored on resume."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    objective, section, lr = run.objective, run.section, run.learning_rate
    if run.checkpoint is not None:
        load_trainable(objective, run.checkpoint)
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
        load_training_state(run.checkpoint, optimizer, run.lr_scheduler, run.ema)
        logger.info("Resumed from %s at step %d", run.checkpoint, run.start_step)
    run.ema.to(run.dev)
    run.objective, run.optimizer = run.accelerator.prepare(objective, optimizer)


def _prepare_vae(run: TrainingRun) -> tuple[Any, dict[str, Any]]:
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


def _prepare_text(run: TrainingRun, max_length: int, extra_texts: Sequence[str] = ()) -> None:
    """Open the train split's latents, and cache a frozen encoder's token states of every distinct report (and
    knowledge text): in memory, or in a memory-mapped store on disk when they would not fit in memory (a MIMIC-size
    corpus with a BERT-base encoder), encoded once there for every later run, rank and resume."""
    reports = run.train.frame["report"].tolist()
    run.text_max_length = max_length
    run.truncated = int((_token_counts(run.bundle.tokenizer, reports) > max_length).sum())
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
    run.latents = _open_latents(run)
    text_encoder = run.bundle.model.to(run.dev).eval()  # eval: no dropout, so resume stays exact
    text_encoder.requires_grad_(run.trainable_text)
    if run.trainable_text and getattr(text_encoder, "pooler", None) is not None:
        text_encoder.pooler.requires_grad_(False)  # unused: the squeeze reads the token states
    if run.trainable_text:
        return  # encoded at every step, with gradients
    texts = [*reports, *extra_texts]
    # What the cache holds: the states of each distinct text (a study's two films share one report).
    tokens = np.minimum(_token_counts(run.bundle.tokenizer, distinct_texts(texts)), max_length).sum()
    cache_bytes = int(tokens) * run.bundle.hidden_size * 4
    if cache_bytes <= TEXT_CACHE_MAX_BYTES:
        run.text_cache = TextStates(run.bundle, texts, max_length, run.dev, run.main)
    else:
        folder = run.manifest.root / CACHE_DIR
        run.text_cache = open_text_states(run.bundle, texts, max_length, folder, run.dev, run.main)


def _token_counts(tokenizer: Any, texts: Sequence[str], batch: int = 4096) -> np.ndarray:
    """Untruncated token counts of ``texts``, tokenized a batch at a time (a MIMIC-size corpus's token ids as
    Python lists all at once would take gigabytes)."""
    from diffcxr_aug.generator.text_encoder import token_lengths

    counts = [token_lengths(tokenizer, texts[start : start + batch]) for start in range(0, len(texts), batch)]
    return np.concatenate([np.zeros(0, dtype=np.int64), *map(np.asarray, counts)])


def _open_latents(run: TrainingRun) -> LatentRows:
    """The train split's rows of the manifest's latent store for ``run.vae`` at the config's image size.

    Every process opens the store (it deals the encoding of a missing store out between the processes, and a
    finished one is read as it is) and reads a batch's rows from it at each step, never the whole split. The store
    covers the whole manifest file, as LNFS's does when it drops no view: after a filter run on this manifest with
    this VAE it is finished already, and after one whose kept manifest this is, the filter has copied it.
    """
    size = run.cfg.image_size
    # The main process builds a missing image cache while the others wait, then they open it: every process would
    # otherwise decode every image into the same file at once. The sample grids read the cache even when the
    # store is finished.
    with run.accelerator.main_process_first():
        open_cache(run.manifest.full, size, progress=run.main)
    store = open_latent_store(run.manifest.full, run.vae, size, device=run.dev, progress=run.main)
    return store.rows(run.train.frame.index.to_numpy())


def _log_unet(run: TrainingRun) -> None:
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
