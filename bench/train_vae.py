"""Train one KL-VAE on a manifest and save it, to share between several generator runs (``--vae FOLDER``).

    python bench/train_vae.py --data runs/phantom-128/data --out runs/phantom-128/vae \
        [--config kl-f4] [--size 128] [--steps 1000] [--batch-size 16] [--seed 0]

The defaults are the ``phantom-128`` config's own VAE settings, so this is the VAE ``train-generator`` would
train first; training it once saves that time in each of several runs (AVA-TLS on/off, filtered/unfiltered).
Prints the validation PSNR/SSIM and the wall time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.generator.vae import train_vae
from diffcxr_aug.io import atomic_write_json
from diffcxr_aug.runtime import setup_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="manifest folder or CSV (its train split is used)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="kl-f4")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop-size", type=int, default=None, help="train on random crops of this size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    setup_logging()
    started = time.monotonic()
    _, metrics = train_vae(
        read_manifest(args.data),
        args.out,
        config=args.config,
        size=args.size,
        steps=args.steps,
        batch_size=args.batch_size,
        crop_size=args.crop_size,
        device=args.device,
        seed=args.seed,
    )
    minutes = round((time.monotonic() - started) / 60, 2)
    # Beside the VAE, for whoever adds up the cost of a generator trained on it (bench/phantom128_study.sh).
    atomic_write_json(args.out / "timing.json", {"wall_minutes": minutes, "steps": args.steps})
    print(metrics, "minutes", minutes)


if __name__ == "__main__":
    main()
