"""KL-VAE training in fp32 against bf16 autocast, whole images against random crops: speed and val PSNR/SSIM.

    python bench/vae_precision.py --data DIR [--steps 400] [--arm fp32:64 --arm bf16:64 --arm bf16:32 ...]

Each arm is ``PRECISION:CROP[:STEPS]`` and trains the same registered VAE (``--config``) from the same seed on the
train split of the manifest in ``--data``; it prints seconds per step, the speed-up over the first arm, and the
validation PSNR/SSIM on whole images. The cost of a step is what decides the filter's share of a CPU budget.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.generator.vae import train_vae
from diffcxr_aug.runtime import cpu_has_bf16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="a manifest folder (e.g. a prepared phantom world)")
    parser.add_argument("--config", default="kl-f4")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=400, help="steps of an arm that names none")
    parser.add_argument("--arm", action="append", help="PRECISION:CROP[:STEPS], e.g. bf16:32:1200 (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    arms = args.arm or ["no:64", "bf16:64", "bf16:32"]
    manifest = read_manifest(args.data)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU native bf16: {cpu_has_bf16()}")
    rows, base = [], None
    for arm in arms:
        parts = arm.split(":")
        precision, crop = parts[0], int(parts[1])
        steps = int(parts[2]) if len(parts) > 2 else args.steps
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            _, metrics = train_vae(
                manifest,
                Path(tmp) / "vae",
                config=args.config,
                size=args.size,
                steps=steps,
                batch_size=args.batch_size,
                crop_size=crop if crop < args.size else None,
                device="cpu",
                seed=args.seed,
                progress=False,
                mixed_precision=precision,
            )
            seconds = time.perf_counter() - started
        per_step = seconds / steps  # includes the scaling-factor pass and the validation at the end
        base = base or per_step
        row = {"arm": arm, "steps": steps, "seconds": round(seconds, 1), "s_per_step": round(per_step, 4)}
        row.update(speedup=round(base / per_step, 2), psnr=round(metrics["psnr"], 2), ssim=round(metrics["ssim"], 4))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
