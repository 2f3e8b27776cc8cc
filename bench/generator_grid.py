"""The README's generator grid: validation reports chosen to show every finding, their real images, and
the images a trained pipeline generates from them.

    python bench/generator_grid.py --generator runs/phantom-128/generator --data runs/phantom-128/data \
        --out docs/figures/generator_phantom128.png [--n 8] [--steps 25] [--guidance 3.0] [--seed 0]

The reports come from the val split (never seen in training), picked greedily so that together they show
as many labels as possible (the same picks as the training sample grids).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from diffcxr_aug.data.dataset import CXRDataset
from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.generator.figures import save_report_grid
from diffcxr_aug.generator.pipeline import DiffCXRPipeline
from diffcxr_aug.generator.sample_grids import label_caption, validation_rows
from diffcxr_aug.generator.vae import to_uint8
from diffcxr_aug.runtime import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    pipe = DiffCXRPipeline.from_pretrained(args.generator).to(device)
    rows = validation_rows(read_manifest(args.data), args.n, args.seed)
    reports = rows.frame["report"].tolist()
    size = pipe.image_size
    real = [to_uint8(sample["image"][None])[0] for sample in CXRDataset(rows, size, progress=False)]
    images = pipe(
        reports,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=[torch.Generator().manual_seed(args.seed + i) for i in range(len(reports))],
        output_type="pt",
    ).images
    captions = [label_caption(row, rows.label_names) for _, row in rows.frame.iterrows()]
    path = save_report_grid(
        reports,
        list(to_uint8(images)),
        args.out,
        real=real,
        captions=captions,
        title=f"{args.generator.name}: val reports, their real images, generated ({args.steps} steps, "
        f"guidance {args.guidance})",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
