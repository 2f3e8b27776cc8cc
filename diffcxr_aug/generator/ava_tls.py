"""AVA-TLS (Adaptive Vision-Aware Textual Learning Strategy): align the squeezed report with its image.

Training adds a symmetric InfoNCE loss between the pooled squeezed report tokens
(:class:`~diffcxr_aug.generator.token_squeeze.TokenSqueeze`) and an image embedding from
:class:`ImageTower`, a small CNN over the clean VAE latents of the same batch. The loss pushes the K
condition tokens to hold what is *visible* in the image, not just what is written; the diffusion loss
trains the same tokens at the same time.

What "off" means (``generator.ava_tls: false``, the ablation): the paper's baseline, a text encoder that
sees only the first K tokens of the report (K = 77 for CLIP), no squeeze and no contrastive alignment.
Here: the tokenizer truncates the report to K tokens, the token states are linearly projected to the
UNet width (``TokenSqueeze(mode="truncate")``), padding is masked in the UNet's cross-attention, and no
image tower or InfoNCE loss exists. Everything else (encoder, UNet, schedule, steps) is unchanged, so
the difference between the two runs is AVA-TLS alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

# CLIP's initial temperature (0.07) and its cap on the logit scale (100), Radford et al. 2021.
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100.0)


class ImageTower(ModelMixin, ConfigMixin):
    """Image embedding from VAE latents: strided conv blocks, global average pooling, a linear head.

    Working on latents keeps it cheap (the latents are already computed for the diffusion loss) and puts
    the alignment in the space the UNet generates in. It also holds the learnable InfoNCE temperature.

    Args:
        in_channels: latent channels.
        block_out_channels: channels of each block; every block after the first halves the resolution.
        embed_dim: embedding size (must equal the squeeze's ``embed_dim``).
        norm_num_groups: GroupNorm groups.
        init_logit_scale: initial log inverse temperature.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        block_out_channels: tuple[int, ...] = (64, 128, 256),
        embed_dim: int = 128,
        norm_num_groups: int = 16,
        init_logit_scale: float = INIT_LOGIT_SCALE,
    ) -> None:
        super().__init__()
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {list(block_out_channels)} must be divisible by norm_num_groups "
                f"({norm_num_groups}); {bad} are not"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for i, out in enumerate(block_out_channels):
            layers += [
                nn.Conv2d(channels, out, kernel_size=3, stride=1 if i == 0 else 2, padding=1),
                nn.GroupNorm(norm_num_groups, out),
                nn.SiLU(),
                nn.Conv2d(out, out, kernel_size=3, padding=1),
                nn.GroupNorm(norm_num_groups, out),
                nn.SiLU(),
            ]
            channels = out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(channels, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` latents -> ``(B, embed_dim)`` embeddings (not normalised)."""
        features = self.blocks(latents).mean(dim=(2, 3))
        return self.head(features)


def info_nce(
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    positive_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP loss) between matching rows of ``text_embeds`` and ``image_embeds``.

    Args:
        text_embeds: ``(B, E)``.
        image_embeds: ``(B, E)``; row i is the image of report i.
        logit_scale: log inverse temperature (learnable), clamped at log(100) as in CLIP.
        positive_mask: optional ``(B, B)`` bool, True where report i and image j also match (the same
            report text twice in a batch, common for normal studies). Those pairs share the target mass
            instead of being pushed apart as negatives. The diagonal is always positive.

    Returns:
        The mean of the text-to-image and image-to-text cross-entropies.
    """
    if text_embeds.shape != image_embeds.shape:
        raise ValueError(f"text_embeds {tuple(text_embeds.shape)} and image_embeds {tuple(image_embeds.shape)} differ")
    text = F.normalize(text_embeds.float(), dim=-1)
    image = F.normalize(image_embeds.float(), dim=-1)
    logits = logit_scale.float().clamp(max=MAX_LOGIT_SCALE).exp() * text @ image.T
    eye = torch.eye(len(text), dtype=torch.bool, device=text.device)
    positives = eye if positive_mask is None else (positive_mask.to(text.device) | eye)
    targets = positives.float() / positives.sum(dim=1, keepdim=True)
    # "Same text" is an equivalence, so positives is symmetric with equal row and column sums, and the
    # same targets serve both directions.
    loss_t2i = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
    loss_i2t = torch.sum(-targets * F.log_softmax(logits.T, dim=1), dim=1).mean()
    return 0.5 * (loss_t2i + loss_i2t)


def same_text_mask(reports: list[str]) -> torch.Tensor:
    """``(B, B)`` bool: True where two reports of a batch are the same text (after whitespace folding)."""
    keys = [" ".join(r.split()).lower() for r in reports]
    return torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.bool)
