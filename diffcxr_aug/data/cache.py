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
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diffcxr_aug.data.images import load_image, to_uint8_square
from diffcxr_aug.data.manifest import Manifest, csv_row
from diffcxr_aug.errors import ImageReadError
from diffcxr_aug.io import atomic_write_json

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


def build_cache(manifest: Manifest, size: int, progress: bool = True, flush_every: int = 512) -> Path:
    """Decode, center-crop and resize every image of the manifest once, into the cache array.

    Resumable: the array is filled in a ``.partial.npy`` file whose progress is recorded every
    ``flush_every`` images, so an interrupted build continues where it stopped; the finished array is
    renamed into place only when complete.
    """
    array_path, index_path = cache_files(manifest, size)
    array_path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = array_path.with_suffix(".partial.npy")
    progress_path = array_path.with_suffix(".partial.json")
    paths = manifest.image_paths()
    digest = _paths_digest(manifest.frame["image_path"].tolist())
    start = 0
    if partial_path.is_file() and progress_path.is_file():
        state = json.loads(progress_path.read_text())
        if state.get("digest") == digest and state.get("size") == size:
            start = int(state["done"])
    if start == 0:
        np.lib.format.open_memmap(partial_path, mode="w+", dtype=np.uint8, shape=(len(paths), size, size)).flush()
    else:
        logger.info("Resuming the %dpx image cache at image %d of %d", size, start, len(paths))
    out = np.load(partial_path, mmap_mode="r+")
    bar = tqdm(total=len(paths), initial=start, desc=f"caching {size}px images", disable=not progress, unit="img")
    for i in range(start, len(paths)):
        try:
            out[i] = to_uint8_square(load_image(paths[i]), size)
        except ImageReadError as err:
            raise ImageReadError(f"{manifest.source}, row {csv_row(i)}: {err}") from err
        bar.update(1)
        if (i + 1) % flush_every == 0:
            out.flush()
            atomic_write_json(progress_path, {"digest": digest, "size": size, "done": i + 1})
    bar.close()
    out.flush()
    del out
    os.replace(partial_path, array_path)
    progress_path.unlink(missing_ok=True)
    atomic_write_json(index_path, {"size": size, "rows": len(paths), "digest": digest})
    return array_path
