"""The training objective of Diff-CXR: :class:`DiffusionObjective` (every module that learns, and the loss of one
micro-batch: the min-SNR weighted diffusion loss with classifier-free-guidance dropout, plus the AVA-TLS InfoNCE
alignment), and :func:`compile_networks`, which compiles the networks a training step runs."""

from __future__ import annotations

from collections.abc import Sequence
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
            # transformers checkpoints a layer only in training mode: the checkpointed layers (and nothing inside
            # them, so their dropout stays off) follow the objective's mode.
            for module in self.text_encoder.modules():
                if getattr(module, "gradient_checkpointing", False) is True:
                    module.training = mode
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


def enable_gradient_checkpointing(objective: DiffusionObjective) -> list[str]:
    """Recompute activations in the backward pass instead of keeping them: the UNet's resnet and transformer blocks
    (diffusers' ``enable_gradient_checkpointing``, in stage 2 too, where the frozen UNet still carries the
    adapter's gradients) and a trained text encoder's layers (transformers' own checkpointing, non-reentrant).
    Returns the names of the networks checkpointed.

    The DKIM adapter is not checkpointed: ``DiseaseKnowledgeAdapter`` does not declare diffusers'
    ``_supports_gradient_checkpointing``.
    """
    objective.unet.enable_gradient_checkpointing()
    names = ["unet"]
    text = objective.text_encoder
    if text is not None:
        # transformers >= 5 names it activation checkpointing (the old name warns); 4.x has only the old name.
        enable = getattr(text, "activation_checkpointing_enable", None) or text.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        names.append("text_encoder")
    objective.train(objective.training)
    return names


# Activation bytes autograd saves an image under bf16 / fp16 autocast over those it saves in fp32: 0.61 for the
# paper-256 UNet and 0.59 for phantom-128 (real tensors on a CPU, batch 2 minus batch 1, shared storage counted once;
# the normalisations and softmaxes autocast keeps in fp32 are why it is not 0.5).
HALF_PRECISION_ACTIVATIONS = 0.6


def activation_bytes(
    unet: nn.Module, num_tokens: int, adapter: nn.Module | None = None, precision: str = "no"
) -> dict[str, int]:
    """Activation memory of one training image: the bytes autograd keeps for the backward pass of one UNet forward
    (and, with a DKIM ``adapter``, its forward) at batch 1, without and with gradient checkpointing.

    Counted on the meta device (a meta copy of each network built from its config: no memory, no compute) with
    ``torch.autograd.graph.saved_tensors_hooks``, each saved tensor's base once and the weights not at all (they do
    not grow with the batch), in fp32. The count equals a real fp32 forward's under the math attention backend,
    which a CPU trains with; on a GPU torch's flash and memory-efficient kernels keep less than the attention
    probabilities counted here. ``bf16`` / ``fp16`` scale it by :data:`HALF_PRECISION_ACTIVATIONS` (meta tensors do
    not run autocast). Checkpointing is counted the way diffusers runs it: its checkpointing function is replaced by
    one that records, for each checkpointed block, its input tensors (which checkpointing keeps) and the bytes saved
    inside it (recomputed in the backward pass, one block at a time), so that ``checkpointed = saved outside the
    blocks + every block's inputs + the largest block``. The allocator's temporaries, a trained text encoder and the
    squeeze and image tower are not counted.

    Returns:
        ``{"plain": bytes, "checkpointed": bytes}`` per image.
    """
    saved: dict[int, tuple[int, int]] = {}  # id of a saved tensor's base -> (bytes, block index; -1 outside blocks)
    weights: set[int] = set()
    inputs: dict[int, int] = {}  # id -> bytes of every checkpointed block's input tensors
    keep: list[torch.Tensor] = []  # holds what the ids name, so that no id is reused during the count
    block, calls = [-1], [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in saved and id(base) not in weights:
            keep.append(base)
            saved[id(base)] = (base.numel() * base.element_size(), block[0])
        return tensor

    def counted_block(module: Any, *args: Any) -> Any:
        for arg in args:
            if isinstance(arg, torch.Tensor):
                keep.append(arg)
                inputs[id(arg)] = arg.numel() * arg.element_size()
        outer, block[0] = block[0], calls[0]
        calls[0] += 1
        try:
            return module(*args)
        finally:
            block[0] = outer

    with torch.device("meta"):
        meta_unet = type(unet).from_config(unet.config).train()
        meta_adapter = None if adapter is None else type(adapter).from_config(adapter.config).train()
    weights.update(id(w) for net in (meta_unet, meta_adapter) if net is not None for w in net.parameters())
    meta_unet.enable_gradient_checkpointing(counted_block)
    size = meta_unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    sample = torch.zeros(1, meta_unet.config.in_channels, *size, device="meta")
    context = torch.zeros(1, num_tokens, meta_unet.config.cross_attention_dim, device="meta")
    timestep = torch.tensor([500], device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        residuals = {}
        if meta_adapter is not None:
            down, mid = meta_adapter(sample, timestep, encoder_hidden_states=context, return_dict=False)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        meta_unet(sample, timestep, encoder_hidden_states=context, **residuals)
    per_block: dict[int, int] = {}
    for nbytes, index in saved.values():
        per_block[index] = per_block.get(index, 0) + nbytes
    outside = per_block.pop(-1, 0)
    plain = outside + sum(per_block.values())
    checkpointed = outside + sum(inputs.values()) + max(per_block.values(), default=0)
    scale = HALF_PRECISION_ACTIVATIONS if precision in ("bf16", "fp16") else 1.0
    return {"plain": int(plain * scale), "checkpointed": int(checkpointed * scale)}


def training_memory(
    objective: DiffusionObjective,
    frozen: Sequence[nn.Module | None],
    ema_params: Sequence[torch.Tensor],
    precision: str,
    num_tokens: int,
    num_processes: int = 1,
) -> dict[str, Any]:
    """What a training process holds on its device, in bytes: ``{"fixed": {...}, "per_image": {...}}`` (and the
    ``precision`` counted).

    Fixed: every parameter of ``objective`` and of the ``frozen`` networks (the VAE, a frozen text encoder) in its
    dtype; a gradient and AdamW's two moments (fp32) per trainable parameter, and one more gradient-sized buffer
    under DistributedDataParallel (``num_processes`` > 1); the EMA's fp32 copy of ``ema_params``; under bf16 / fp16
    autocast the half-precision copy of the objective's weights that autocast makes. Per image: the UNet's (and the
    DKIM adapter's) activations without and with gradient checkpointing (:func:`activation_bytes`). Neither the
    allocator's temporaries nor a trained text encoder's activations are counted: the figures are a floor.
    """
    params = {id(p): p for m in (objective, *frozen) if m is not None for p in m.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    fixed = {
        "weights": sum(p.numel() * p.element_size() for p in params),
        "gradients": 4 * trainable * (2 if num_processes > 1 else 1),
        "AdamW": 8 * trainable,
        "EMA": 4 * sum(p.numel() for p in ema_params),
    }
    if precision in ("bf16", "fp16"):
        fixed["autocast copies"] = 2 * sum(p.numel() for p in objective.parameters())
    per_image = activation_bytes(objective.unet, num_tokens, objective.adapter, precision)
    return {"fixed": fixed, "per_image": per_image, "precision": "fp32" if precision == "no" else precision}


def memory_at(memory: dict[str, Any], batch_size: int, checkpointed: bool) -> int:
    """Bytes of :func:`training_memory` at ``batch_size`` images a step, with or without gradient checkpointing."""
    return (
        sum(memory["fixed"].values()) + batch_size * memory["per_image"]["checkpointed" if checkpointed else "plain"]
    )


def describe_training_memory(
    objective: DiffusionObjective,
    frozen: Sequence[nn.Module | None],
    ema_params: Sequence[torch.Tensor],
    precision: str,
    num_tokens: int,
    num_processes: int,
    batch_size: int,
    checkpointing: bool,
    device: torch.device,
) -> str:
    """One log line of :func:`training_memory` (the arguments up to ``num_processes`` are its): the fixed part, the
    activations an image, the total at a few batch sizes around ``batch_size`` with and without checkpointing, and
    on CUDA the memory the device has free."""
    memory = training_memory(objective, frozen, ema_params, precision, num_tokens, num_processes)
    gib = 2**30
    sizes = sorted({max(1, batch_size // 4), max(1, batch_size // 2), batch_size, 2 * batch_size, 4 * batch_size})
    table = ", ".join(
        f"{b}: {memory_at(memory, b, False) / gib:.1f} ({memory_at(memory, b, True) / gib:.1f})" for b in sizes
    )
    free = ""
    if device.type == "cuda":
        available, total = torch.cuda.mem_get_info(device)
        free = f"; CUDA {available / gib:.1f} of {total / gib:.1f} GiB free now"
    fixed = ", ".join(f"{name} {value / gib:.2f}" for name, value in memory["fixed"].items())
    per_image = memory["per_image"]
    return (
        f"Memory estimate per process, GiB: {fixed}; activations an image {per_image['plain'] / gib:.3f} "
        f"({per_image['checkpointed'] / gib:.3f} with gradient checkpointing): the UNet's saved tensors, counted on "
        f"the meta device, in {memory['precision']}. Total by batch size (with gradient checkpointing): {table}. "
        f"This run: batch {batch_size}, gradient checkpointing {'on' if checkpointing else 'off'}{free}"
    )


def _dropped(cond: Any, null: Any, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Condition tokens and mask with the rows in ``drop`` replaced by the empty text's (classifier-free guidance)."""
    keep = ~drop
    tokens = torch.where(keep[:, None, None], cond.tokens, null.tokens.expand_as(cond.tokens))
    mask = None
    if cond.attention_mask is not None:
        mask = torch.where(keep[:, None], cond.attention_mask, null.attention_mask.expand_as(cond.attention_mask))
    return tokens, mask
