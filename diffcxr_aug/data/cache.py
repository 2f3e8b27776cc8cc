"""A resized grayscale image cache so that training never decodes an image twice.

The cache of a manifest at ``size`` px is one uint8 ``.npy`` array of shape ``(rows, size, size)`` in
the manifest's folder (``cache/images_{size}.npy``), opened memory-mapped, plus a JSON index of the
image paths it holds in row order. The index is checked against the manifest on open, so a cache built
for another manifest (or an edited one) is rebuilt rather than silently misaligned.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diffcxr_aug.data.images import ImageReadError, load_image, to_uint8_square
from diffcxr_aug.data.manifest import Manifest, csv_row
from diffcxr_aug.io import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

CACHE_DIR = "cache"


def _paths_digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def cache_files(manifest: Manifest, size: int) -> tuple[Path, Path]:
    # Named by the image list's digest, so manifests sharing a folder never overwrite each other's cache.
    digest = _paths_digest(manifest.frame["image_path"].tolist())[:16]
    folder = manifest.root / CACHE_DIR
    return folder / f"images_{size}_{digest}.npy", folder / f"images_{size}_{digest}.json"


def open_cache(manifest: Manifest, size: int, build: bool = True, progress: bool = True) -> np.ndarray:
    """Return a read-only ``(rows, size, size)`` uint8 memmap of the manifest's images, building it if needed.

    Pass the whole manifest (``manifest.full``): row ``i`` of the array is row ``i`` of the file.
    """
    array_path, index_path = cache_files(manifest, size)
    paths = manifest.frame["image_path"].tolist()
    digest = _paths_digest(paths)
    if array_path.is_file() and index_path.is_file():
        meta = json.loads(index_path.read_text())
        if meta.get("digest") == digest and meta.get("size") == size:
            return np.load(array_path, mmap_mode="r")
        logger.info("Image cache %s does not match %s; rebuilding", array_path, manifest.source)
    if not build:
        raise FileNotFoundError(f"No image cache for {manifest.source} at {size}px ({array_path})")
    build_cache(manifest, size, progress=progress)
    return np.load(array_path, mmap_mode="r")


def build_cache(manifest: Manifest, size: int, progress: bool = True) -> Path:
    """Decode, center-crop and resize every image of the manifest once, into the cache array."""
    array_path, index_path = cache_files(manifest, size)
    array_path.parent.mkdir(parents=True, exist_ok=True)
    paths = manifest.image_paths()
    with atomic_path(array_path, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size))
        for i, path in enumerate(tqdm(paths, desc=f"caching {size}px images", disable=not progress, unit="img")):
            try:
                out[i] = to_uint8_square(load_image(path), size)
            except ImageReadError as err:
                raise ImageReadError(f"{manifest.source}, row {csv_row(i)}: {err}") from err
        out.flush()
        del out
    atomic_write_json(
        index_path, {"size": size, "rows": len(paths), "digest": _paths_digest(manifest.frame["image_path"].tolist())}
    )
    return array_path
