"""Training and sampling speed of a generator config against this machine's measured matmul limit.

    python bench/perf.py [--config phantom-128] [--batch-size 32] [--precision no bf16] [--json OUT]

Prints ratios and counts, never pass/fail:

- the machine's limit: a dense 2048 x 2048 matmul's FLOP/s in fp32 and in bf16 (best of several runs);
- a training step of the stage-1 objective (UNet, token squeeze, image tower, InfoNCE, AdamW, EMA) on cached
  latents and text states, as ``train-generator`` runs it: steps/s, images/s, FLOPs counted by
  ``torch.utils.flop_counter`` (forward and backward), achieved FLOP/s over the limit of the precision used,
  and the share of the step spent in the forward/backward, the optimiser and the EMA;
- a sampling step (one guided denoising step: the UNet at twice the batch) and the VAE decode of one image:
  images/s at 25 steps, FLOP/s over the limit;
- data loading: the cached-latent batch gather (what a step reads) in images/s against the step's demand;
- peak resident memory.

Weights are random: speed does not depend on them. Several precisions can be timed in one call
(``--precision no bf16``); ``--channels-last`` also times the UNet in channels-last memory format, and
``--compile`` under ``torch.compile`` (with its compile time and the steps it takes to pay for it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def autocast(precision: str, device: torch.device, attention: str = "default") -> contextlib.ExitStack:
    """The precision's autocast, and with ``attention="math"`` scaled-dot-product attention's math backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    if precision != "no":
        stack.enter_context(
            torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        )
    if attention == "math":
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


def matmul_limit(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an ``n x n`` matmul over ``repeats`` timed runs (the machine's dense limit for ``dtype``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        _sync(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def build(config_name: str, device: torch.device, channels_last: bool) -> dict[str, Any]:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from diffcxr_aug.generator.ava_tls import ImageTower
    from diffcxr_aug.generator.configs import build_unet, get_config, vae_downsample_factor_of
    from diffcxr_aug.generator.objective import DiffusionObjective
    from diffcxr_aug.generator.token_squeeze import TokenSqueeze
    from diffcxr_aug.generator.vae import VAE_CONFIGS, build_vae

    cfg = get_config(config_name)
    torch.manual_seed(0)
    factor = vae_downsample_factor_of(cfg) or 8
    latent = cfg.image_size // factor
    unet = build_unet(cfg, latent_size=latent)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    squeeze = TokenSqueeze(text_dim=384, cross_attention_dim=cfg.cross_attention_dim, num_tokens=cfg.num_tokens,
                           **cfg.squeeze)  # fmt: skip
    tower = ImageTower(in_channels=4, **cfg.image_tower)
    scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule)
    objective = DiffusionObjective(unet, squeeze, scheduler, cfg.prediction_type, image_tower=tower,
                                   align_weight=0.1).to(device)  # fmt: skip
    vae = build_vae(cfg.vae).to(device) if cfg.vae in VAE_CONFIGS else None
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ema = EMAModel(params, decay=0.999)
    return {"cfg": cfg, "latent": latent, "objective": objective, "optimizer": optimizer, "ema": ema,
            "params": params, "vae": vae}  # fmt: skip


def train_step_figures(parts: dict[str, Any], batch: int, precision: str, attention: str, device: torch.device,
                       repeats: int) -> dict[str, float]:  # fmt: skip
    objective, optimizer, ema, params = parts["objective"], parts["optimizer"], parts["ema"], parts["params"]
    cfg, latent = parts["cfg"], parts["latent"]
    text_len = cfg.max_text_tokens
    latents = torch.randn(batch, 4, latent, latent, device=device)
    inputs = {
        "latents": latents,
        "noise": torch.randn_like(latents),
        "timesteps": torch.randint(0, 1000, (batch,), device=device),
        "drop": torch.rand(batch, device=device) < 0.1,
        "text": {
            "states": torch.randn(batch, text_len, 384, device=device),
            "attention_mask": torch.ones(batch, text_len, dtype=torch.long, device=device),
        },  # fmt: skip
        "null_text": {
            "states": torch.randn(1, text_len, 384, device=device),
            "attention_mask": torch.ones(1, text_len, dtype=torch.long, device=device),
        },  # fmt: skip
        "positive_mask": torch.eye(batch, dtype=torch.bool, device=device),
    }
    objective.train()
    phases = {"forward_backward": 0.0, "optimizer": 0.0, "ema": 0.0}

    def fwd_bwd() -> None:
        with autocast(precision, device, attention):
            losses = objective(**inputs)
            losses["loss"].backward()

    def step() -> None:
        start = time.perf_counter()
        fwd_bwd()
        _sync(device)
        middle = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        after = time.perf_counter()
        ema.step(params)
        _sync(device)
        phases["forward_backward"] += middle - start
        phases["optimizer"] += after - middle
        phases["ema"] += time.perf_counter() - after

    counter = FlopCounterMode(display=False)
    with counter:
        fwd_bwd()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    for _ in range(2):  # warm-up (and, compiled, the compile): not in the shares
        step()
    phases.update(dict.fromkeys(phases, 0.0))
    times = _timed(step, device, warmup=0, repeats=repeats)
    total = sum(phases.values())
    seconds = sorted(times)[len(times) // 2]
    return {
        "seconds_per_step": seconds,
        "steps_per_s": 1 / seconds,
        "images_per_s": batch / seconds,
        "gflops_per_step": flops / 1e9,
        "achieved_gflops_s": flops / seconds / 1e9,
        **{f"share_{k}": v / total for k, v in phases.items()},
    }


@torch.inference_mode()
def sampling_figures(parts: dict[str, Any], batch: int, precision: str, attention: str, device: torch.device,
                     repeats: int, steps: int = 25) -> dict[str, float]:  # fmt: skip
    objective, cfg, latent, vae = parts["objective"], parts["cfg"], parts["latent"], parts["vae"]
    unet = objective.unet.eval()
    sample = torch.randn(2 * batch, 4, latent, latent, device=device)
    tokens = torch.randn(2 * batch, cfg.num_tokens, cfg.cross_attention_dim, device=device)
    timestep = torch.full((2 * batch,), 500, device=device)

    def denoise() -> None:
        with autocast(precision, device, attention):
            unet(sample, timestep, encoder_hidden_states=tokens).sample.float()

    counter = FlopCounterMode(display=False)
    with counter:
        denoise()
    flops = counter.get_total_flops()
    seconds = sorted(_timed(denoise, device, warmup=1, repeats=repeats))[repeats // 2]
    figures = {
        "seconds_per_guided_step": seconds,
        "gflops_per_guided_step": flops / 1e9,
        "achieved_gflops_s": flops / seconds / 1e9,
    }
    decode_seconds = 0.0
    if vae is not None:
        vae.eval()
        z = torch.randn(batch, vae.config.latent_channels, latent, latent, device=device)

        def decode() -> None:
            with autocast(precision, device):
                vae.decode(z).sample.float()

        counter = FlopCounterMode(display=False)
        with counter:
            decode()
        figures["vae_decode_gflops_per_image"] = counter.get_total_flops() / batch / 1e9
        decode_seconds = sorted(_timed(decode, device, warmup=1, repeats=3))[1]
        figures["vae_decode_seconds_per_image"] = decode_seconds / batch
    per_image = (steps * seconds + decode_seconds) / batch
    figures[f"images_per_s_at_{steps}_steps"] = 1 / per_image
    figures["share_vae_in_sampling"] = decode_seconds / (steps * seconds + decode_seconds)
    return figures


def compile_rows(args: argparse.Namespace, device: torch.device, eager: list[dict]) -> list:
    """The eager rows' settings again with the step's networks (UNet, token squeeze, image tower) under
    ``torch.compile``, in place as ``train-generator --compile`` compiles them; each row also records the compile time
    (the training call's time beyond its timed steps, so the FLOP-count pass counts as compile time: an upper
    bound) and after how many steps the compiled step has paid for it. Sampling recompiles for inference; that
    compile is not counted."""
    from diffcxr_aug.generator.objective import compile_networks

    rows = []
    for row in [r for r in eager if not r["channels_last"]]:
        parts = build(args.config, device, channels_last=False)
        compile_networks(parts["objective"])  # as train-generator's `compile: true` does
        started = time.perf_counter()
        train = train_step_figures(parts, args.batch_size, row["precision"], row["attention"], device, args.repeats)
        total = time.perf_counter() - started  # the compile, the FLOP count and the timed steps
        saved = row["train"]["seconds_per_step"] - train["seconds_per_step"]
        compile_s = total - (args.repeats + 3) * train["seconds_per_step"]
        # The FLOPs are the eager model's (the counter does not see inside compiled graphs).
        train["gflops_per_step"] = row["train"]["gflops_per_step"]
        train["achieved_gflops_s"] = train["gflops_per_step"] / train["seconds_per_step"]
        train["compile_seconds"] = compile_s
        train["steps_to_pay"] = compile_s / saved if saved > 0 else None  # None: it never pays
        sample = sampling_figures(parts, args.sample_batch_size, row["precision"], row["attention"], device,
                                  args.repeats)  # fmt: skip
        sample["gflops_per_guided_step"] = row["sample"]["gflops_per_guided_step"]
        sample["achieved_gflops_s"] = sample["gflops_per_guided_step"] / sample["seconds_per_guided_step"]
        rows.append({**row, "compiled": True, "train": train, "sample": sample})
        torch._dynamo.reset()
    return rows


def loading_figures(batch: int, latent: int, n: int = 3000, repeats: int = 50) -> float:
    """Images/s of the cached-latent gather one training step does (``latents[rows]`` of a random batch)."""
    cache = torch.randn(n, 4, latent, latent)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(repeats):
        rows = torch.randint(0, n, (batch,), generator=gen)
        cache[rows].contiguous()
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="phantom-128")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sample-batch-size", type=int, default=32)
    parser.add_argument("--precision", nargs="+", default=["no", "bf16"], choices=["no", "bf16", "fp16"])
    parser.add_argument(
        "--attention",
        nargs="+",
        default=["default", "math"],
        choices=["default", "math"],
        help="scaled-dot-product attention backend: torch's choice, or the math (matmul) one",
    )
    parser.add_argument("--channels-last", action="store_true", help="also time channels-last memory format")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the step's networks (UNet, token squeeze, image tower) under torch.compile (inductor), "
        "as train-generator --compile runs them: compile seconds, and the steps it takes to pay",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    from diffcxr_aug.runtime import cpu_has_bf16, resolve_device

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {args.config} on {name}; torch {torch.__version__}; native bf16 on this CPU: {cpu_has_bf16()}")
    limits = {"no": matmul_limit(device, torch.float32), "bf16": matmul_limit(device, torch.bfloat16)}
    if device.type == "cuda":
        limits["fp16"] = matmul_limit(device, torch.float16)
    print("matmul limit (2048^2): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in limits.items()))
    rows = []
    layouts = [False, True] if args.channels_last else [False]
    for channels_last in layouts:
        parts = build(args.config, device, channels_last)
        for precision in args.precision:
            for attention in args.attention:
                train = train_step_figures(parts, args.batch_size, precision, attention, device, args.repeats)
                sample = sampling_figures(parts, args.sample_batch_size, precision, attention, device, args.repeats)
                rows.append({"precision": precision, "attention": attention, "channels_last": channels_last,
                             "limit_gflops_s": limits[precision] / 1e9, "train": train, "sample": sample})  # fmt: skip
    if args.compile:
        rows += compile_rows(args, device, rows)
    load = loading_figures(args.batch_size, parts["latent"])
    print(
        "\n| precision | attention | layout | train s/step | steps/s | img/s | GFLOPs/step | train FLOP/s / limit | "
        "fwd+bwd / opt / EMA | guided step s | sample FLOP/s / limit | img/s at 25 steps | VAE share |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    fp32_limit = limits["no"] / 1e9
    for row in rows:
        t, s, limit = row["train"], row["sample"], row["limit_gflops_s"]
        layout = "channels-last" if row["channels_last"] else "contiguous"
        if row.get("compiled"):
            pays = "never pays" if t["steps_to_pay"] is None else f"pays after {t['steps_to_pay']:.0f} steps"
            layout = f"compiled ({t['compile_seconds']:.0f} s; {pays})"
        print(
            f"| {row['precision']} | {row['attention']} | {layout} | "
            f"{t['seconds_per_step']:.3f} | {t['steps_per_s']:.2f} | {t['images_per_s']:.1f} | "
            f"{t['gflops_per_step']:.0f} | {t['achieved_gflops_s'] / limit:.2f} "
            f"({t['achieved_gflops_s'] / fp32_limit:.2f} of fp32) | "
            f"{t['share_forward_backward']:.0%} / {t['share_optimizer']:.0%} / {t['share_ema']:.0%} | "
            f"{s['seconds_per_guided_step']:.3f} | {s['achieved_gflops_s'] / limit:.2f} | "
            f"{s['images_per_s_at_25_steps']:.2f} | {s['share_vae_in_sampling']:.0%} |"
        )
    demand = max(r["train"]["images_per_s"] for r in rows)
    print(f"\ndata loading (cached latents): {load:.0f} img/s, {load / demand:.0f}x the fastest step's demand "
          f"({demand:.1f} img/s); text states are cached too (frozen encoder): the step reads no images")  # fmt: skip
    sample0 = rows[0]["sample"]
    print(f"sampling: {sample0['gflops_per_guided_step'] / (2 * args.sample_batch_size):.2f} GFLOPs per image per "
          f"denoising step (one UNet pass; guidance runs two); VAE decode "
          f"{sample0.get('vae_decode_gflops_per_image', float('nan')):.2f} GFLOPs per image")  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MiB" + (f"; peak GPU {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
                                         if device.type == "cuda" else ""))  # fmt: skip
    if args.json:
        from pathlib import Path

        from diffcxr_aug.io import atomic_write_text

        payload = {"config": args.config, "device": name, "torch": torch.__version__, "limits_gflops_s":
                   {k: v / 1e9 for k, v in limits.items()}, "rows": rows, "loading_images_per_s": load,
                   "peak_rss_mib": peak}  # fmt: skip
        atomic_write_text(Path(args.json), json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
