"""``DiseaseKnowledgeAdapter``: Diff-CXR's disease-knowledge injection (DKIM), in diffusers' ControlNet pattern.

Stage 2 of Diff-CXR keeps the stage-1 report-to-CXR model frozen and trains a copy of its encoder half that
reads the *knowledge tokens* (the image's labels written as text by :mod:`~diffcxr_aug.generator.knowledge`,
encoded by the stage-1 text encoder and token squeeze). The copy's features at every resolution go through
zero-initialised 1x1 convolutions and are added to the frozen UNet's skip connections and mid-block output
(``down_block_additional_residuals`` / ``mid_block_additional_residual`` of
``UNet2DConditionModel.forward``). At initialisation those convolutions output exact zeros, so the pipeline
with an untrained adapter reproduces stage 1 bit for bit, and training starts from the stage-1 model.

What is copied from the stage-1 UNet (:meth:`DiseaseKnowledgeAdapter.from_unet`), with its weights: ``conv_in``,
the time embedding, the down blocks and the mid block, built with diffusers' own ``get_down_block`` /
``get_mid_block`` from the UNet's config so that the state dicts load strictly. Not copied: the up blocks
and ``conv_out`` (the frozen UNet keeps its own).

Why not ``diffusers.ControlNetModel`` itself: its forward needs a conditioning *image* (``controlnet_cond``)
that passes through a learned ``ControlNetConditioningEmbedding`` and is added after ``conv_in``. DKIM has
no such image: its input is the noisy latent itself plus the knowledge tokens. Feeding ControlNetModel a
blank image would keep a dead conditioning network whose last (zero-initialised) convolution learns only a
constant bias, and its forward passes no ``encoder_attention_mask`` to the cross-attention, which the
``truncate`` squeeze (AVA-TLS off) needs for its padded tokens. So the adapter reuses ControlNet's pieces
(``zero_module``, the residual layout, ``from_unet``'s copy of the UNet config) but not the class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.controlnets.controlnet import zero_module
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import get_down_block, get_mid_block
from diffusers.utils import BaseOutput
from torch import nn

from diffcxr_aug.generator.knowledge import KNOWLEDGE_STATES, KnowledgeStates, KnowledgeTemplates, load_templates

# UNet2DConditionModel options the adapter does not copy: a UNet that sets any of them away from this
# value is refused by name rather than copied half-way (the strict state-dict load would catch most).
UNSUPPORTED_UNET_OPTIONS: dict[str, Any] = {
    "center_input_sample": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "dual_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "attention_type": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "cross_attention_norm": None,
    "dropout": 0.0,
}
# The UNet config keys the adapter's own config repeats (ControlNetModel.from_unet copies the same ones).
COPIED_UNET_OPTIONS: tuple[str, ...] = (
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "upcast_attention",
    "resnet_time_scale_shift",
)
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")


@dataclass
class DiseaseKnowledgeAdapterOutput(BaseOutput):
    """The adapter's residuals for ``UNet2DConditionModel.forward``.

    Attributes:
        down_block_res_samples: one tensor per skip connection of the UNet's down path, already scaled
            (``down_block_additional_residuals``).
        mid_block_res_sample: the residual added to the mid block's output (``mid_block_additional_residual``).
    """

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor


def _per_block(value: Any, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


class DiseaseKnowledgeAdapter(ModelMixin, ConfigMixin):
    """A trainable copy of a UNet's encoder half that cross-attends to knowledge tokens and returns
    zero-initialised residuals for the frozen UNet.

    Build it with :meth:`from_unet`; the arguments mirror ``UNet2DConditionModel``'s (the same names, the
    same meaning), plus the knowledge format it was trained with, kept in its config so that the pipeline
    writes knowledge text the same way at sampling.

    Args:
        knowledge_templates: the :class:`~diffcxr_aug.generator.knowledge.KnowledgeTemplates` as a mapping
            (``None``: the defaults, stored resolved).
        knowledge_states: ``positive-only`` or ``all``.
        (the others): as in ``UNet2DConditionModel``.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type: str = "UNetMidBlock2DCrossAttn",
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1.0,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 128,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        knowledge_templates: dict[str, Any] | None = None,
        knowledge_states: KnowledgeStates = "positive-only",
    ) -> None:
        super().__init__()
        n = len(down_block_types)
        if len(block_out_channels) != n:
            raise ValueError(
                f"block_out_channels {tuple(block_out_channels)} and down_block_types {tuple(down_block_types)} "
                "must have the same length"
            )
        if mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(
                f"Unsupported mid_block_type {mid_block_type!r}; choose one of: {', '.join(MID_BLOCK_TYPES)}"
            )
        if knowledge_states not in KNOWLEDGE_STATES:
            raise ValueError(
                f"Unsupported knowledge_states {knowledge_states!r}; choose one of: {', '.join(KNOWLEDGE_STATES)}"
            )
        # Stored resolved, so the adapter writes knowledge the way it was trained even if the defaults change.
        self.register_to_config(knowledge_templates=load_templates(knowledge_templates).model_dump())

        # diffusers' historical naming, as in UNet2DConditionModel: heads default to ``attention_head_dim``.
        num_attention_heads = _per_block(num_attention_heads or attention_head_dim, n)
        attention_head_dim = _per_block(attention_head_dim, n)
        only_cross_attention = _per_block(only_cross_attention, n)
        transformer_layers_per_block = _per_block(transformer_layers_per_block, n)

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        time_embed_dim = block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn)

        # One zero 1x1 conv per UNet skip connection: conv_in's output, each resnet, each downsampler.
        self.down_blocks = nn.ModuleList()
        self.zero_convs = nn.ModuleList([self._zero_conv(block_out_channels[0])])
        output_channel = block_out_channels[0]
        for i, down_block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            is_final_block = i == n - 1
            self.down_blocks.append(
                get_down_block(
                    down_block_type,
                    num_layers=layers_per_block,
                    transformer_layers_per_block=transformer_layers_per_block[i],
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=time_embed_dim,
                    add_downsample=not is_final_block,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_attention_dim,
                    num_attention_heads=num_attention_heads[i],
                    downsample_padding=downsample_padding,
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=only_cross_attention[i],
                    upcast_attention=upcast_attention,
                    resnet_time_scale_shift=resnet_time_scale_shift,
                    attention_head_dim=attention_head_dim[i] if attention_head_dim[i] is not None else output_channel,
                )
            )
            n_skips = layers_per_block + (0 if is_final_block else 1)
            self.zero_convs.extend(self._zero_conv(output_channel) for _ in range(n_skips))

        self.mid_block = get_mid_block(
            mid_block_type,
            temb_channels=time_embed_dim,
            in_channels=block_out_channels[-1],
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            output_scale_factor=mid_block_scale_factor,
            transformer_layers_per_block=transformer_layers_per_block[-1],
            num_attention_heads=num_attention_heads[-1],
            cross_attention_dim=cross_attention_dim,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
            resnet_time_scale_shift=resnet_time_scale_shift,
            attention_head_dim=attention_head_dim[-1],
        )
        self.zero_conv_mid = self._zero_conv(block_out_channels[-1])

    @staticmethod
    def _zero_conv(channels: int) -> nn.Conv2d:
        return zero_module(nn.Conv2d(channels, channels, kernel_size=1))

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        knowledge_templates: KnowledgeTemplates | dict[str, Any] | None = None,
        knowledge_states: KnowledgeStates = "positive-only",
        load_weights_from_unet: bool = True,
    ) -> DiseaseKnowledgeAdapter:
        """An adapter shaped like ``unet``'s encoder half, initialised from its weights (zero residuals).

        Args:
            unet: the stage-1 UNet.
            knowledge_templates: the template set of the knowledge text (``None``: the defaults).
            knowledge_states: ``positive-only`` or ``all``.
            load_weights_from_unet: copy ``conv_in``, the time embedding, the down and mid blocks' weights.
        """
        config = unet.config
        for key, default in UNSUPPORTED_UNET_OPTIONS.items():
            if config.get(key, default) != default:
                raise ValueError(
                    f"DiseaseKnowledgeAdapter.from_unet: the UNet sets {key}={config[key]!r}, which the adapter does "
                    f"not copy; it takes UNets with {key}={default!r}"
                )
        for key in ("layers_per_block", "cross_attention_dim"):
            if not isinstance(config[key], int):
                raise ValueError(
                    f"DiseaseKnowledgeAdapter.from_unet: the UNet's per-block {key} {config[key]!r} is not supported; "
                    "it takes one int for all blocks"
                )
        if isinstance(knowledge_templates, KnowledgeTemplates):
            knowledge_templates = knowledge_templates.model_dump()
        adapter = cls(
            **{key: config[key] for key in COPIED_UNET_OPTIONS},
            knowledge_templates=knowledge_templates,
            knowledge_states=knowledge_states,
        )
        if load_weights_from_unet:
            for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
                getattr(adapter, name).load_state_dict(getattr(unet, name).state_dict())
        adapter.to(unet.device)
        # A dtype only when it differs (ModelMixin.to warns about any dtype argument).
        return adapter if adapter.dtype == unet.dtype else adapter.to(dtype=unet.dtype)

    @property
    def knowledge_templates(self) -> KnowledgeTemplates:
        """The template set the adapter writes (and was trained on) knowledge text with."""
        return load_templates(self.config.knowledge_templates)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        return_dict: bool = True,
    ) -> DiseaseKnowledgeAdapterOutput | tuple:
        """Residuals for the frozen UNet at the same noisy latent and timestep.

        Args:
            sample: the noisy latents ``(B, C, h, w)`` the UNet denoises.
            timestep: the diffusion timestep (a number, or one per sample).
            encoder_hidden_states: the knowledge tokens ``(B, K, cross_attention_dim)``.
            encoder_attention_mask: ``(B, K)``, 1 for real tokens (``None``: all real).
            conditioning_scale: multiplies every residual (0: no effect on the UNet).
            return_dict: return a :class:`DiseaseKnowledgeAdapterOutput` rather than a tuple.
        """
        # 1. Time embedding (as in UNet2DConditionModel.get_time_embed).
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            dtype = torch.float64 if isinstance(timestep, float) else torch.int64
            timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        t_emb = self.time_proj(timesteps.expand(sample.shape[0])).to(dtype=sample.dtype)
        emb = self.time_embedding(t_emb)
        if encoder_attention_mask is not None:
            # The bias form the attention processors expect, as UNet2DConditionModel makes it.
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)

        # 2. The encoder half, cross-attending to the knowledge tokens.
        sample = self.conv_in(sample)
        skips = (sample,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(
                    hidden_states=sample,
                    temb=emb,
                    encoder_hidden_states=encoder_hidden_states,
                    encoder_attention_mask=encoder_attention_mask,
                )
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips += res
        if getattr(self.mid_block, "has_cross_attention", False):
            sample = self.mid_block(
                sample, emb, encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask
            )
        else:
            sample = self.mid_block(sample, emb)

        # 3. Zero convolutions, scaled.
        down = tuple(conv(skip) * conditioning_scale for conv, skip in zip(self.zero_convs, skips, strict=True))
        mid = self.zero_conv_mid(sample) * conditioning_scale
        if not return_dict:
            return down, mid
        return DiseaseKnowledgeAdapterOutput(down_block_res_samples=down, mid_block_res_sample=mid)
