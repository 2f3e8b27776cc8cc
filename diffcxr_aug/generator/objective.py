"""The training objective of Diff-CXR: :class:`DiffusionObjective` (every module that learns, and the loss of one
micro-batch: the min-SNR weighted diffusion loss with classifier-free-guidance dropout, plus the AVA-TLS InfoNCE
alignment), and :func:`compile_networks`, which compiles the networks a training step runs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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
