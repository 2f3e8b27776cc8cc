"""The ceiling: a perfect generator, drawn from the phantom world's own truth.

The phantom world can render as many new radiographs as asked, of new patients, with reports and labels
written exactly as for the real phantom data, and without the corrupted images (``noise_rate=0``). Used
as the synthetic set of a sweep, these images stand in for a generator that matches the clean data
distribution perfectly, so the gain they bring over real-only training is the most that synthetic data of
this kind could add: the headroom a real generator is aiming at.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from diffcxr_aug.data.manifest import MANIFEST_NAME
from diffcxr_aug.errors import InputError
from diffcxr_aug.io import atomic_write_json

logger = logging.getLogger(__name__)

# Added to the real world's seed so the ceiling's patients are new draws from the same world,
# never copies of real training (or test) images.
CEILING_SEED_OFFSET = 1_000_003


def build_ceiling(out: str | os.PathLike, n: int, size: int, seed: int = 0) -> Path:
    """Render ``n`` perfect-generator images into ``out`` (all in the ``train`` split, no label noise).

    Reuses ``out/manifest.csv`` when ``out/ceiling.json`` records the same ``n``, ``size`` and ``seed``, so a
    rerun sweep does not redraw the images.

    Args:
        out: output folder.
        n: number of images.
        size: image side in pixels (that of the real phantom data).
        seed: the real world's seed; the ceiling uses ``seed + CEILING_SEED_OFFSET``.

    Returns:
        The ceiling manifest's path.
    """
    from diffcxr_aug.data.phantom import prepare_phantom

    if n < 1:
        raise InputError(f"the ceiling needs at least one image, got n={n}")
    out = Path(out)
    settings = {"n": n, "size": size, "seed": seed + CEILING_SEED_OFFSET, "noise_rate": 0.0}
    record = out / "ceiling.json"
    if (out / MANIFEST_NAME).is_file() and record.is_file() and json.loads(record.read_text()) == settings:
        logger.info("Ceiling set already at %s (%d images); reusing it", out, n)
        return out / MANIFEST_NAME
    logger.info("Rendering %d perfect-generator phantom images into %s", n, out)
    path = prepare_phantom(
        out,
        n=n,
        size=size,
        seed=settings["seed"],
        noise_rate=0.0,
        split_fractions=(1.0, 0.0, 0.0),
    )
    atomic_write_json(record, settings)
    return Path(path)
