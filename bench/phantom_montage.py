"""Draw the README's phantom montages: findings with their reports, and one image of each noise kind.

    python bench/phantom_montage.py [--out docs/figures] [--size 256] [--n 600] [--seed 0]

Generates a small phantom world in a temporary folder (a few seconds per hundred images at 256 px),
then writes ``phantom_montage.png`` (16 studies, a showcase covering every label) and ``phantom_noise_montage.png``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.data.phantom import NOISE_KINDS, prepare_phantom
from diffcxr_aug.data.phantom.montage import draw_montage, showcase_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepare_phantom(Path(tmp), n=args.n, size=args.size, seed=args.seed, noise_rate=0.1)
        manifest = read_manifest(tmp)
        rows = showcase_rows(manifest, n=16, seed=args.seed)
        draw_montage(
            manifest,
            args.out / "phantom_montage.png",
            rows=rows,
            cols=4,
            title=f"Phantom CXR world (seed {args.seed}, {args.size} px): images, reports, labels",
        )
        frame = manifest.frame
        noisy = [int(frame.index[frame["noise"] == kind][0]) for kind in NOISE_KINDS if (frame["noise"] == kind).any()]
        draw_montage(
            manifest,
            args.out / "phantom_noise_montage.png",
            rows=noisy,
            cols=5,
            max_lines=4,
            title="Phantom noise kinds (the manifest's noise column)",
        )
    print(f"wrote {args.out / 'phantom_montage.png'} and {args.out / 'phantom_noise_montage.png'}")


if __name__ == "__main__":
    main()
