"""Synthetic sets side by side: the first N images of each, made from the same prompts and seeds, one row of
images per set and a column per prompt, with the prompt's labels on top.

    python bench/synthetic_montage.py --set "v2 (unfiltered)=runs/p128v2/syn-main-g5" \
        --set "recipe (LNFS)=runs/p128v3/synthetic" --n 24 --out docs/figures/phantom128_lnfs_montage.png

Sets whose prompts differ are refused (the columns would not compare like with like).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np

from diffcxr_aug.data.images import load_image
from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.io import atomic_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="sets", action="append", required=True, help="NAME=FOLDER (a synthesize output)")
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--columns", type=int, default=12)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    sets = {}
    for item in args.sets:
        name, sep, folder = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected NAME=FOLDER")
        sets[name] = read_manifest(Path(folder))
    first = next(iter(sets.values()))
    n = min([args.n] + [len(m) for m in sets.values()])
    prompts = first.frame["report"].tolist()[:n]
    for name, manifest in sets.items():
        if (
            manifest.frame["report"].tolist()[:n] != prompts
            or manifest.frame["seed"].tolist()[:n] != first.frame["seed"].tolist()[:n]
        ):
            raise SystemExit(f"set {name!r} ({manifest.source}) was not made from the same prompts and seeds")

    from matplotlib.figure import Figure

    columns = min(args.columns, n)
    blocks = -(-n // columns)
    rows = blocks * len(sets)
    fig = Figure(figsize=(1.3 * columns, 1.45 * rows + 0.3), dpi=110)
    labels = first.label_names
    for b in range(blocks):
        for s, (name, manifest) in enumerate(sets.items()):
            paths = manifest.image_paths()
            for c in range(columns):
                i = b * columns + c
                if i >= n:
                    continue
                ax = fig.add_subplot(rows, columns, (b * len(sets) + s) * columns + c + 1)
                ax.imshow(np.asarray(load_image(paths[i])), cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(name, fontsize=6)
                if s == 0:
                    row = first.frame.iloc[i]
                    present = [label for label in labels if row[label] == 1] or ["(none)"]
                    ax.set_title("\n".join(textwrap.wrap(", ".join(present), 26)), fontsize=4.5)
    fig.suptitle("same prompts and seeds; labels of each prompt above its column", fontsize=8)
    fig.tight_layout()
    with atomic_path(args.out, suffix=".png") as tmp:
        fig.savefig(tmp)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
