"""``DiffCXRPipeline``: radiology reports in, chest radiographs out (a diffusers ``DiffusionPipeline``).

The pipeline owns the VAE, the report encoder and its tokenizer, the AVA-TLS token squeeze, the UNet,
the scheduler (DPM-Solver++ by default) and, once stage 2 exists, the DKIM adapter. It saves and loads
with ``save_pretrained`` / ``from_pretrained`` like any diffusers pipeline: diffusers records each
component's library by module name in ``model_index.json``, so the custom ``TokenSqueeze`` is written as
``["diffcxr_aug.generator.token_squeeze", "TokenSqueeze"]`` and imported back from there.

Images are single-channel, in [0, 1]. The same seed (``generator``) gives the same images on the same
device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from diffcxr_aug.generator.text_encoder import encode_tokens, tokenize
from diffcxr_aug.generator.token_squeeze import TokenSqueeze
from diffcxr_aug.generator.vae import decode, vae_downsample_factor

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class DiffCXRPipelineOutput(BaseOutput):
    """Generated radiographs.

    Attributes:
        images: a list of grayscale ``PIL.Image`` (``output_type="pil"``), a ``(B, H, W, 1)`` float array in
            [0, 1] (``"np"``) or a ``(B, 1, H, W)`` tensor in [0, 1] (``"pt"``).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


def default_scheduler(training_scheduler: SchedulerMixin) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2nd order, multistep) over the noise schedule the model was trained with.

    The training scheduler owns the schedule (timesteps, betas, prediction type); the sampler is built from its
    config, so the two cannot drift apart.
    """
    return DPMSolverMultistepScheduler.from_config(
        training_scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )


class DiffCXRPipeline(DiffusionPipeline):
    """Report-to-CXR latent diffusion (Diff-CXR stage 1: text-conditioned LDM with AVA-TLS).

    Args:
        vae: the latent space (``AutoencoderKL``; 1- or 3-channel).
        text_encoder: a transformers model returning per-token ``last_hidden_state``.
        tokenizer: its tokenizer.
        token_squeeze: L token states -> K condition tokens (``squeeze``) or the first K (``truncate``).
        unet: the denoiser, cross-attending to the condition tokens.
        scheduler: any diffusers scheduler; DPM-Solver++ by default.
        adapter: the DKIM disease-knowledge adapter (stage 2, later); ``None`` for stage 1.
        max_text_tokens: the encoder context used in training; in ``truncate`` mode the report is cut to K.
    """

    model_cpu_offload_seq = "text_encoder->token_squeeze->unet->vae"
    _optional_components = ["adapter"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        token_squeeze: TokenSqueeze,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        adapter: Any = None,
        max_text_tokens: int = 256,
    ) -> None:
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            token_squeeze=token_squeeze,
            unet=unet,
            scheduler=scheduler,
            adapter=adapter,
        )
        self.register_to_config(max_text_tokens=max_text_tokens)

    @property
    def text_max_length(self) -> int:
        """Tokens the encoder sees: all (up to its context) with AVA-TLS, the first K without it."""
        if self.token_squeeze.config.mode == "truncate":
            return int(self.token_squeeze.config.num_tokens)
        return int(self.config.max_text_tokens)

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * vae_downsample_factor(self.vae)

    def check_inputs(
        self,
        reports: list[str],
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        output_type: str,
    ) -> None:
        if not isinstance(reports, list) or not all(isinstance(r, str) for r in reports):
            raise ValueError(f"`reports` must be a string or a list of strings, got {type(reports).__name__}")
        if not reports:
            raise ValueError("`reports` is empty; pass at least one report")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}")
        if guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0, got {guidance_scale}")
        if isinstance(generator, list) and len(generator) != len(reports):
            raise ValueError(
                f"Got {len(generator)} generators for {len(reports)} reports; pass one generator per report or one "
                "for all"
            )
        if latents is not None and latents.shape[0] != len(reports):
            raise ValueError(f"`latents` has batch {latents.shape[0]} but there are {len(reports)} reports")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"Unsupported output_type {output_type!r}; choose one of: {', '.join(OUTPUT_TYPES)}")

    def encode_report(
        self, reports: list[str], device: torch.device, do_classifier_free_guidance: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Condition tokens (and their mask, ``None`` when all are real) for ``reports``; with CFG the
        unconditional tokens (the empty report, as dropped in training) come first."""
        texts = ([""] * len(reports) + reports) if do_classifier_free_guidance else reports
        tokens = tokenize(self.tokenizer, texts, self.text_max_length, device)
        states, mask = encode_tokens(self.text_encoder, tokens)
        out = self.token_squeeze(states.to(self.token_squeeze.dtype), mask)
        return out.tokens.to(self.unet.dtype), out.attention_mask

    def prepare_latents(
        self,
        batch_size: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {shape}")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> ``(B, 1, H, W)`` images in [0, 1]."""
        return decode(self.vae, latents)

    @staticmethod
    def to_output(images: torch.Tensor, output_type: str) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "np":
            return array
        return [PIL.Image.fromarray((a[..., 0] * 255.0 + 0.5).astype(np.uint8), mode="L") for a in array]

    @torch.no_grad()
    def __call__(
        self,
        reports: str | list[str],
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: Literal["pil", "np", "pt"] = "pil",
        return_dict: bool = True,
    ) -> DiffCXRPipelineOutput | tuple:
        """Generate one radiograph per report.

        Args:
            reports: report text(s).
            num_inference_steps: sampler steps.
            guidance_scale: classifier-free guidance weight w (``uncond + w * (cond - uncond)``); <= 1 turns
                guidance off (one UNet pass per step instead of two).
            generator: one ``torch.Generator`` for the batch, or one per report (each image then depends
                only on its own seed).
            latents: optional initial noise ``(B, C, h, w)``.
            output_type: ``pil``, ``np`` or ``pt``.
            return_dict: return a :class:`DiffCXRPipelineOutput` rather than a tuple.
        """
        # 1. Check inputs
        reports = [reports] if isinstance(reports, str) else reports
        self.check_inputs(reports, num_inference_steps, guidance_scale, generator, latents, output_type)
        device = self._execution_device
        do_cfg = guidance_scale > 1.0

        # 2. Encode report
        context, context_mask = self.encode_report(reports, device, do_cfg)

        # 3. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 4. Prepare latents
        latents = self.prepare_latents(len(reports), context.dtype, device, generator, latents)

        # 5. Denoising loop
        for t in self.progress_bar(timesteps):
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(
                model_input, t, encoder_hidden_states=context, encoder_attention_mask=context_mask
            ).sample
            if do_cfg:
                noise_uncond, noise_cond = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = self.scheduler.step(noise_pred, t, latents).prev_sample

        # 6. Decode
        images = self.to_output(self.decode_latents(latents), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return DiffCXRPipelineOutput(images=images)
