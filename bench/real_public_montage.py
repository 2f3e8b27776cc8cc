"""The real-public run's montage: generated films beside the real films whose notes they were drawn from.

    python bench/real_public_montage.py runs/real-public docs/results/real_public/montage.png [--rows 6]

Reads the held-out set (``synthetic-held-out/``: images from the test split's notes, which the generator never saw;
``--set synthetic`` for the classifiers' set, from train-split notes) and shows, row by row, the note, the real film
it describes and the generated film. Only films whose licence
(the collection's ``license`` column, ``meta_license`` in the manifest) lets anyone reuse them are shown: CC BY
(any version, not -NC or -ND) or Apache 2.0; each row's caption names the film's licence and source, so the montage
can be published with its attributions. Also writes ``montage.csv`` beside the PNG (image, licence, DOI or URL).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from diffcxr_aug.data.images import load_image
from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.generator.figures import save_report_grid

SOURCES = {"synthetic-held-out": "held-out real test films", "synthetic": "real training films"}


def reusable(licence: object) -> bool:
    """Whether a licence string lets the film be shown with attribution: CC BY (no NC, no ND) or Apache 2.0."""
    text = str(licence or "").upper().replace("-", " ")
    if text.startswith("APACHE"):
        return True
    return text.startswith("CC BY") and " NC" not in text and " ND" not in text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the recipe's output_dir (runs/real-public)")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--rows", type=int, default=6)
    parser.add_argument("--set", default="synthetic-held-out", help="the synthetic folder under RUN")
    args = parser.parse_args(argv)

    data = read_manifest(args.run / "data")
    synthetic = read_manifest(args.run / args.set)
    real = data.frame.set_index("image_path")
    frame = synthetic.frame.copy()
    frame["licence"] = frame["meta_prompt_image"].map(real["meta_license"]) if "meta_license" in real else ""
    shown = frame[frame["licence"].map(reusable)].drop_duplicates("meta_prompt_image").head(args.rows)
    if shown.empty:
        print(f"no film of {args.run / args.set} has a reusable licence", file=sys.stderr)
        return 1
    labels = synthetic.label_names
    captions = []
    for _, row in shown.iterrows():
        positive = [name for name in labels if row[name] == 1]
        source = real.loc[row["meta_prompt_image"]]
        cite = source.get("meta_doi") or source.get("meta_url") or ""
        captions.append(f"{row['licence']}, {cite}"[:80] + ("   + " + ", ".join(positive) if positive else ""))
    real_images = [load_image(data.root / path) for path in shown["meta_prompt_image"]]
    generated = [load_image(synthetic.root / path) for path in shown["image_path"]]
    save_report_grid(
        shown["prompt"].tolist(),
        generated,
        args.out,
        real=real_images,
        captions=captions,
        title=f"generated (right) from the notes of {SOURCES.get(args.set, 'real films')} (middle)",
    )
    columns = {"meta_prompt_image": "real_image", "licence": "licence", "image_path": "generated_image"}
    table = shown[list(columns)].rename(columns=columns)
    table["real_image"] = [Path(p).name for p in table["real_image"]]  # the collection's file name, not this disk's
    table["source"] = [real.loc[p].get("meta_doi") or real.loc[p].get("meta_url") for p in shown["meta_prompt_image"]]
    pd.DataFrame(table).to_csv(args.out.with_suffix(".csv"), index=False)
    print(f"wrote {args.out} ({len(shown)} rows) and {args.out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
