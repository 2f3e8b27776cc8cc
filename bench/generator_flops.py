"""GFLOPs of one denoising step for every registered generator config, beside the paper's 29.641.

    python bench/generator_flops.py [--tokens 32 77 128]

A denoising step is one UNet forward at batch 1 with K condition tokens (classifier-free guidance runs it
twice). ``torch.utils.flop_counter.FlopCounterMode`` counts matmuls and convolutions with multiply and
add separately (FLOPs = 2 x MACs); tools such as thop and fvcore report MACs under the name "FLOPs", and
the paper does not say which it used, so both columns are printed. Models are built on the meta device:
no weights are allocated and nothing is computed.
"""

from __future__ import annotations

import argparse
import dataclasses

from diffcxr_aug.generator.configs import GENERATOR_CONFIGS, PAPER_GFLOPS, config_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[], help="also count these K (paper sweep: 32 128)")
    args = parser.parse_args()
    print("| config | image px | latents | K | UNet params (M) | GFLOPs / step (2 x MAC) | GMACs / step |")
    print("|---|---|---|---|---|---|---|")
    for name, cfg in GENERATOR_CONFIGS.items():
        for k in [cfg.num_tokens, *[t for t in args.tokens if t != cfg.num_tokens]]:
            figures = config_flops(dataclasses.replace(cfg, num_tokens=k))
            latent = figures["latent_size"]
            print(
                f"| {name} | {cfg.image_size} | 4x{latent}x{latent} | {k} | {figures['unet_params_m']:.1f} | "
                f"{figures['gflops_per_step']:.3f} | {figures['gflops_per_step'] / 2:.3f} |"
            )
    paper = config_flops(GENERATOR_CONFIGS["paper-256"])["gflops_per_step"]
    print(
        f"\npaper-256: {paper / 2:.3f} GMACs ({paper:.3f} GFLOPs) per denoising step; the paper reports "
        f"{PAPER_GFLOPS} GFLOPs: {100 * (paper / 2 / PAPER_GFLOPS - 1):+.1f}% if it counted MACs, "
        f"{100 * (paper / PAPER_GFLOPS - 1):+.1f}% if it counted multiply and add."
    )


if __name__ == "__main__":
    main()
