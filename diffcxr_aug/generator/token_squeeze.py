"""TokenSqueeze: the report's L token states -> K condition tokens for the UNet's cross-attention (AVA-TLS).

A CLIP-style text encoder hands a diffusion UNet at most 77 tokens, so a long radiology report is cut
and its findings (often past the header) are lost. AVA-TLS instead encodes the whole report and
squeezes it: K learned queries cross-attend to all L token states (padding masked out), so the K output
tokens can hold whatever in the report matters for the image. The pooled squeezed tokens give a text
embedding that :mod:`~diffcxr_aug.generator.ava_tls` aligns with an image embedding (symmetric InfoNCE),
which is what makes the squeeze *vision-aware*.

``mode="truncate"`` is the ablation baseline (AVA-TLS off): the first K token states, linearly projected
to the UNet width, with their padding mask. A linear map before the UNet's own key/value projections
adds no capacity, so this is the paper's baseline (the encoder's first 77 tokens, no squeeze) up to the
width change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

SQUEEZE_MODES = ("squeeze", "truncate")


@dataclass
class TokenSqueezeOutput(BaseOutput):
    """Condition tokens for the UNet.

    Attributes:
        tokens: ``(B, K, cross_attention_dim)``.
        attention_mask: ``(B, K)`` with 1 for real tokens; ``None`` when every token is real (``squeeze``).
        pooled: ``(B, embed_dim)`` text embedding for the contrastive loss; ``None`` in ``truncate`` mode.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


class TokenSqueeze(ModelMixin, ConfigMixin):
    """Map ``(B, L, text_dim)`` token states (with their mask) to ``(B, K, cross_attention_dim)`` tokens.

    Args:
        text_dim: hidden size of the text encoder.
        cross_attention_dim: width of the output tokens (the UNet's ``cross_attention_dim``).
        num_tokens: K (77 in the paper; 32 and 128 for its sweep).
        mode: ``squeeze`` (K learned queries cross-attending to all L states) or ``truncate`` (the first K
            states, projected; the AVA-TLS-off baseline).
        width: inner width of the squeeze.
        num_layers: transformer blocks (self-attention among queries, cross-attention to the report, MLP).
        num_heads: attention heads per block.
        embed_dim: size of the pooled text embedding used by the InfoNCE loss.
    """

    @register_to_config
    def __init__(
        self,
        text_dim: int,
        cross_attention_dim: int,
        num_tokens: int = 77,
        mode: Literal["squeeze", "truncate"] = "squeeze",
        width: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        embed_dim: int = 128,
    ) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
        if mode == "squeeze":
            if width % num_heads:
                raise ValueError(f"width ({width}) must be divisible by num_heads ({num_heads})")
            if num_layers < 1:
                raise ValueError(f"num_layers must be at least 1 in squeeze mode, got {num_layers}")
            self.proj_in = nn.Linear(text_dim, width)
            self.norm_in = nn.LayerNorm(width)
            self.queries = nn.Parameter(torch.randn(num_tokens, width) * width**-0.5)
            self.blocks = nn.ModuleList(
                [
                    BasicTransformerBlock(
                        width, num_heads, width // num_heads, cross_attention_dim=width, activation_fn="gelu"
                    )
                    for _ in range(num_layers)
                ]
            )
            self.norm_out = nn.LayerNorm(width)
            self.proj_out = nn.Linear(width, cross_attention_dim)
            self.pool_proj = nn.Linear(cross_attention_dim, embed_dim)
        elif mode == "truncate":
            self.proj_out = nn.Linear(text_dim, cross_attention_dim)
        else:
            raise ValueError(f"Unsupported squeeze mode {mode!r}; choose one of: {', '.join(SQUEEZE_MODES)}")

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TokenSqueezeOutput:
        """Squeeze token states.

        Args:
            hidden_states: ``(B, L, text_dim)`` per-token states of the text encoder.
            attention_mask: ``(B, L)``, 1 for real tokens and 0 for padding; ``None`` means no padding.
        """
        batch, length, _ = hidden_states.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=hidden_states.device)
        if self.config.mode == "truncate":
            return self._truncate(hidden_states, attention_mask)

        context = self.norm_in(self.proj_in(hidden_states))
        # BasicTransformerBlock takes an additive bias (B, 1, L): 0 to keep a token, a large negative to drop it.
        bias = (1.0 - attention_mask.to(context.dtype)) * torch.finfo(context.dtype).min
        bias = bias.unsqueeze(1)
        queries = self.queries.to(context.dtype).unsqueeze(0).expand(batch, -1, -1)
        for block in self.blocks:
            queries = block(queries, encoder_hidden_states=context, encoder_attention_mask=bias)
        tokens = self.proj_out(self.norm_out(queries))
        pooled = self.pool_proj(tokens.mean(dim=1))
        return TokenSqueezeOutput(tokens=tokens, attention_mask=None, pooled=pooled)

    def _truncate(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> TokenSqueezeOutput:
        k = self.config.num_tokens
        states, mask = hidden_states[:, :k], attention_mask[:, :k]
        if states.shape[1] < k:  # pad to exactly K so that batches and the unconditional branch line up
            pad = k - states.shape[1]
            states = nn.functional.pad(states, (0, 0, 0, pad))
            mask = nn.functional.pad(mask, (0, pad))
        return TokenSqueezeOutput(tokens=self.proj_out(states), attention_mask=mask, pooled=None)
