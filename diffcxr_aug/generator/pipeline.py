"""``DiffCXRPipeline``: radiology reports in, chest radiographs out (a diffusers ``DiffusionPipeline``).

The pipeline owns the VAE, the report encoder and its tokenizer, the AVA-TLS token squeeze, the UNet,
the scheduler (DPM-Solver++ by default) and, optionally, the DKIM adapter
(:class:`~diffcxr_aug.generator.disease_adapter.DiseaseKnowledgeAdapter`). It saves and loads with
``save_pretrained`` / ``from_pretrained`` like any diffusers pipeline: diffusers records each component's
library by module name in ``model_index.json``, so the custom ``TokenSqueeze`` is written as
``["diffcxr_aug.generator.token_squeeze", "TokenSqueeze"]`` and imported back from there. The adapter is
an optional component: folders without one (stage 1) load with ``adapter=None``, and
``from_pretrained(folder, adapter=None)`` leaves a saved adapter out.

With an adapter, each image is conditioned on its report and on its *knowledge*: its labels written as
template sentences (:mod:`~diffcxr_aug.generator.knowledge`), taken from the labels given, from knowledge
text given, or from the offline labeler run on the reports. ``dkim_scale`` weighs the adapter's residuals;
0 (or no adapter) gives stage 1's images exactly.

Images are single-channel, in [0, 1]. The same seed (``generator``) gives the same images on the same
device.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from diffcxr_aug.errors import InputError
from diffcxr_aug.generator.disease_adapter import DiseaseKnowledgeAdapter
from diffcxr_aug.generator.knowledge import knowledge_texts
from diffcxr_aug.generator.text_encoder import encode_tokens, tokenize
from diffcxr_aug.generator.token_squeeze import TokenSqueeze
from diffcxr_aug.generator.vae import decode, vae_downsample_factor
from diffcxr_aug.io import atomic_write_text

OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class DiffCXRPipelineOutput(BaseOutput):
    """Generated radiographs.

    Attributes:
        images: a list of grayscale ``PIL.Image`` (``output_type="pil"``), a ``(B, H, W, 1)`` float array in
            [0, 1] (``"np"``) or a ``(B, 1, H, W)`` tensor in [0, 1] (``"pt"``).
        knowledge: the knowledge text each image was conditioned on; ``None`` when the adapter was not used
            (no adapter, or ``dkim_scale=0``).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    knowledge: list[str] | None = None


@functools.cache
def _labeler() -> Any:
    """The offline rule-based CheXpert labeler, built once (it compiles its phrase lists)."""
    from diffcxr_aug.data.labeler import RuleLabeler

    return RuleLabeler()


SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "dpm-solver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    # Stable Diffusion's DDIM settings: no clipping of the predicted x0 (latents are not in [-1, 1]).
    "ddim": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
}


def sampler_scheduler(name: str, config: Mapping[str, Any]) -> SchedulerMixin:
    """The sampler ``name`` (a key of :data:`SAMPLERS`) over the noise schedule of a scheduler ``config``.

    The schedule (timesteps, betas, prediction type) is the model's; only the solver changes, so samplers compare
    on the same model.
    """
    if name not in SAMPLERS:
        raise InputError(f"Unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    cls, options = SAMPLERS[name]
    return cls.from_config(config, **options)


def default_scheduler(training_scheduler: SchedulerMixin) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2nd order, multistep) over the noise schedule the model was trained with.

    The training scheduler owns the schedule (timesteps, betas, prediction type); the sampler is built from its
    config, so the two cannot drift apart.
    """
    return sampler_scheduler("dpm-solver++", training_scheduler.config)


# diffusers' custom-pipeline loader imports this file from a pipeline folder and takes the DiffusionPipeline subclass
# it finds there; the class stays the package's own (no copy), so isinstance checks hold.
CUSTOM_PIPELINE_FILE = "pipeline.py"
CUSTOM_PIPELINE_SOURCE = (
    '"""Lets diffusers load this folder: DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, '
    'trust_remote_code=True)."""\n\n'
    "from diffcxr_aug.generator.pipeline import DiffCXRPipeline\n\n"
    '__all__ = ["DiffCXRPipeline"]\n'
)


class DiffCXRPipeline(DiffusionPipeline):
    """Report-to-CXR latent diffusion (Diff-CXR: text-conditioned LDM with AVA-TLS, and the DKIM adapter).

    Args:
        vae: the latent space (``AutoencoderKL``; 1- or 3-channel).
        text_encoder: a transformers model returning per-token ``last_hidden_state``.
        tokenizer: its tokenizer.
        token_squeeze: L token states -> K condition tokens (``squeeze``) or the first K (``truncate``).
        unet: the denoiser, cross-attending to the condition tokens.
        scheduler: any diffusers scheduler; DPM-Solver++ by default.
        adapter: the DKIM disease-knowledge adapter (stage 2); ``None`` for stage 1.
        max_text_tokens: the encoder context used in training; in ``truncate`` mode the report is cut to K.
    """

    model_cpu_offload_seq = "text_encoder->token_squeeze->adapter->unet->vae"
    _optional_components = ["adapter"]
    _callback_tensor_inputs = ["latents"]

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """diffusers' ``save_pretrained``, plus a ``pipeline.py`` that names this class, so that diffusers' own
        loader finds it: ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder,
        trust_remote_code=True)`` (the package must be installed; the file only imports it)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        atomic_write_text(Path(save_directory) / CUSTOM_PIPELINE_FILE, CUSTOM_PIPELINE_SOURCE)

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        token_squeeze: TokenSqueeze,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        adapter: DiseaseKnowledgeAdapter | None = None,
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
        labels: Sequence[Mapping[str, Any]] | Any | None = None,
        knowledge: list[str] | None = None,
        dkim_scale: float = 1.0,
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
        self.check_knowledge_inputs(reports, labels, knowledge, dkim_scale)

    def check_knowledge_inputs(
        self,
        reports: list[str],
        labels: Sequence[Mapping[str, Any]] | Any | None,
        knowledge: list[str] | None,
        dkim_scale: float,
    ) -> None:
        if dkim_scale < 0:
            raise ValueError(f"`dkim_scale` must be >= 0, got {dkim_scale}")
        if labels is not None and knowledge is not None:
            raise ValueError("Pass `labels` or `knowledge`, not both: the knowledge text is written from the labels")
        if self.adapter is None and (labels is not None or knowledge is not None):
            raise ValueError(
                "`labels` / `knowledge` condition the DKIM adapter, and this pipeline has none (a stage-1 folder); "
                "leave them out, or load a pipeline trained with stage 2"
            )
        for name, value in (("labels", labels), ("knowledge", knowledge)):
            if value is not None and len(value) != len(reports):
                raise ValueError(f"Got {len(value)} {name} for {len(reports)} reports; pass one per report")
        if knowledge is not None and not all(isinstance(k, str) for k in knowledge):
            raise ValueError("`knowledge` must be a string or a list of strings, one knowledge text per report")

    def encode_text(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Condition tokens (and their mask, ``None`` when all are real) of texts: the stage-1 text encoder, then
        the token squeeze. Reports and knowledge text are both encoded this way."""
        tokens = tokenize(self.tokenizer, texts, self.text_max_length, device)
        states, mask = encode_tokens(self.text_encoder, tokens)
        out = self.token_squeeze(states.to(self.token_squeeze.dtype), mask)
        return out.tokens.to(self.unet.dtype), out.attention_mask

    def encode_report(
        self, reports: list[str], device: torch.device, do_classifier_free_guidance: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Condition tokens (and their mask, ``None`` when all are real) for ``reports``; with CFG the
        unconditional tokens (the empty report, as dropped in training) come first."""
        texts = ([""] * len(reports) + reports) if do_classifier_free_guidance else reports
        return self.encode_text(texts, device)

    def _resolve_reports(
        self,
        prompt: str | list[str] | None,
        reports: str | list[str] | None,
        prompt_embeds: torch.Tensor | None,
        prompt_attention_mask: torch.Tensor | None,
    ) -> list[str]:
        """The reports to condition on (with ``prompt_embeds``: one empty placeholder per row, for the checks)."""
        given = [name for name, value in (("prompt", prompt), ("reports", reports), ("prompt_embeds", prompt_embeds))
                 if value is not None]  # fmt: skip
        if len(given) != 1:
            raise ValueError(f"Pass exactly one of prompt, reports and prompt_embeds; got {given or 'none'}")
        if prompt_embeds is not None:
            if prompt_embeds.ndim != 3:
                raise ValueError(f"`prompt_embeds` must be (batch, tokens, dim), got {tuple(prompt_embeds.shape)}")
            mask = prompt_attention_mask
            if mask is not None and tuple(mask.shape) != tuple(prompt_embeds.shape[:2]):
                raise ValueError(
                    f"`prompt_attention_mask` has shape {tuple(mask.shape)}, expected {tuple(prompt_embeds.shape[:2])}"
                )
            return [""] * prompt_embeds.shape[0]
        text = prompt if prompt is not None else reports
        return [text] if isinstance(text, str) else text

    def _given_embeds(
        self, embeds: torch.Tensor, mask: torch.Tensor | None, device: torch.device, do_classifier_free_guidance: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Precomputed condition tokens, with the empty report's in front for guidance (as :meth:`encode_report`)."""
        embeds = embeds.to(device=device, dtype=self.unet.dtype)
        mask = None if mask is None else mask.to(device)
        if not do_classifier_free_guidance:
            return embeds, mask
        uncond, uncond_mask = self.encode_text([""] * embeds.shape[0], device)
        if mask is None and uncond_mask is None:
            return torch.cat([uncond, embeds]), None
        ones = torch.ones(embeds.shape[:2], dtype=torch.bool, device=device)
        masks = [ones if m is None else m.to(device=device, dtype=torch.bool) for m in (uncond_mask, mask)]
        return torch.cat([uncond, embeds]), torch.cat(masks)

    def knowledge_text(self, reports: list[str], labels: Sequence[Mapping[str, Any]] | Any | None = None) -> list[str]:
        """The knowledge text of each image, written with the adapter's templates and states from ``labels``
        (mappings or a DataFrame with CheXpert label columns) or, without labels, from the offline labeler's
        reading of ``reports``."""
        if labels is None:
            labels = [_labeler()(report) for report in reports]
        return knowledge_texts(labels, self.adapter.knowledge_templates, self.adapter.config.knowledge_states)

    def encode_knowledge(
        self, knowledge: list[str], device: torch.device, do_classifier_free_guidance: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Knowledge tokens for the adapter; with CFG the unconditional ones (empty knowledge, as dropped in
        training) come first, so the unconditional branch has neither report nor knowledge."""
        texts = ([""] * len(knowledge) + knowledge) if do_classifier_free_guidance else knowledge
        return self.encode_text(texts, device)

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
        return [PIL.Image.fromarray((a[..., 0] * 255.0 + 0.5).astype(np.uint8)) for a in array]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: Literal["pil", "np", "pt"] = "pil",
        return_dict: bool = True,
        *,
        reports: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        labels: Mapping[str, Any] | Sequence[Mapping[str, Any]] | Any | None = None,
        knowledge: str | list[str] | None = None,
        dkim_scale: float = 1.0,
        callback_on_step_end: Callable[[Any, int, Any, dict[str, torch.Tensor]], dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> DiffCXRPipelineOutput | tuple:
        """Generate one radiograph per report.

        Args:
            prompt: report text(s), as diffusers pipelines call their text (``reports=`` is the same argument).
            reports: the report text(s), by the name this pipeline first gave them.
            prompt_embeds, prompt_attention_mask: condition tokens computed before (``pipe.encode_text(reports,
                device)``, ``(B, K, D)`` and ``(B, K)`` or ``None``), instead of ``prompt``: the tokens are reused
                across calls; with a DKIM adapter, pass ``labels`` or ``knowledge`` too (there is no text to label).
            num_inference_steps: sampler steps.
            guidance_scale: classifier-free guidance weight w (``uncond + w * (cond - uncond)``); <= 1 turns
                guidance off (one UNet pass per step instead of two). With the adapter, the unconditional
                branch has the empty report and the empty knowledge.
            generator: one ``torch.Generator`` for the batch, or one per report (each image then depends
                only on its own seed).
            latents: optional initial noise ``(B, C, h, w)``.
            output_type: ``pil``, ``np`` or ``pt``.
            return_dict: return a :class:`DiffCXRPipelineOutput` rather than a tuple (``(images,)``, plus the
                knowledge when the adapter was used).
            labels: DKIM only: the CheXpert labels of each image (one mapping per report, or a DataFrame with
                label columns: 1, 0, -1, NaN), written as knowledge text with the adapter's templates.
            knowledge: DKIM only: the knowledge text itself, one per report. Without ``labels`` and
                ``knowledge`` the adapter gets the knowledge of the reports' labels from the offline labeler.
            dkim_scale: weight of the adapter's residuals; 0 (or no adapter) gives stage 1's images exactly.
            callback_on_step_end: called after every denoising step as ``callback(pipe, step, timestep, tensors)``
                with the tensors named in ``callback_on_step_end_tensor_inputs`` (``latents``); a ``latents`` in
                the dict it returns replaces the latents (diffusers' convention).
        """
        # 1. Check inputs
        reports = self._resolve_reports(prompt, reports, prompt_embeds, prompt_attention_mask)
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown}: choose from {self._callback_tensor_inputs}"
            )
        if prompt_embeds is not None and self.adapter is not None and dkim_scale != 0 and labels is knowledge is None:
            raise ValueError(
                "With prompt_embeds there is no report text for the DKIM adapter's knowledge: pass labels or knowledge"
            )
        labels = [labels] if isinstance(labels, Mapping) else labels
        knowledge = [knowledge] if isinstance(knowledge, str) else knowledge
        self.check_inputs(
            reports,
            num_inference_steps,
            guidance_scale,
            generator,
            latents,
            output_type,
            labels,
            knowledge,
            dkim_scale,
        )
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        use_adapter = self.adapter is not None and dkim_scale != 0

        # 2. Encode report
        if prompt_embeds is None:
            context, context_mask = self.encode_report(reports, device, do_cfg)
        else:
            context, context_mask = self._given_embeds(prompt_embeds, prompt_attention_mask, device, do_cfg)

        # 3. Encode knowledge (DKIM)
        if use_adapter:
            knowledge = knowledge if knowledge is not None else self.knowledge_text(reports, labels)
            knowledge_tokens, knowledge_mask = self.encode_knowledge(knowledge, device, do_cfg)

        # 4. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 5. Prepare latents
        latents = self.prepare_latents(len(reports), context.dtype, device, generator, latents)

        # 6. Denoising loop
        for step, t in enumerate(self.progress_bar(timesteps)):
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            residuals = {}
            if use_adapter:
                down, mid = self.adapter(
                    model_input,
                    t,
                    encoder_hidden_states=knowledge_tokens,
                    encoder_attention_mask=knowledge_mask,
                    conditioning_scale=dkim_scale,
                    return_dict=False,
                )
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            # Under bf16 / fp16 autocast the UNet answers in half precision; guidance and the solver's multistep
            # sums run in fp32, where the latents are.
            noise_pred = self.unet(
                model_input, t, encoder_hidden_states=context, encoder_attention_mask=context_mask, **residuals
            ).sample.float()
            if do_cfg:
                noise_uncond, noise_cond = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = self.scheduler.step(noise_pred, t, latents).prev_sample
            if callback_on_step_end is not None:
                tensors = {name: latents for name in callback_on_step_end_tensor_inputs}
                latents = (callback_on_step_end(self, step, t, tensors) or {}).get("latents", latents)

        # 7. Decode
        images = self.to_output(self.decode_latents(latents), output_type)
        self.maybe_free_model_hooks()
        output = DiffCXRPipelineOutput(images=images, knowledge=knowledge if use_adapter else None)
        return output if return_dict else output.to_tuple()
