"""A resized grayscale image cache so that training never decodes an image twice.

The cache of a manifest at ``size`` px is one uint8 ``.npy`` array of shape ``(rows, size, size)`` in
the manifest's folder (``cache/images_{size}.npy``), opened memory-mapped, plus a JSON index of the
image paths it holds in row order. The index is checked against the manifest on open, so a cache built
for another manifest (or an edited one) is rebuilt rather than silently misaligned.

Decoding a full-size film (a MIMIC-CXR JPEG of about 2,500 x 3,000 px) costs tens of milliseconds, so a
large manifest is decoded by several worker processes, each writing its rows straight into the one
``.partial.npy`` file; the array is the same, byte for byte, whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diffcxr_aug.data.images import load_image, to_uint8_square
from diffcxr_aug.data.manifest import Manifest, csv_row
from diffcxr_aug.errors import ImageReadError
from diffcxr_aug.io import atomic_write_json

logger = logging.getLogger(__name__)

CACHE_DIR = "cache"
# With the default worker count, fewer images than this are decoded in this process: starting spawned
# workers costs about a second, more than decoding a few hundred small images.
PARALLEL_MIN_IMAGES = 256


def _paths_digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def image_list_digest(manifest: Manifest) -> str:
    """SHA-256 of the manifest's ``image_path`` column in row order: what a cache built from it depends on."""
    return _paths_digest(manifest.frame["image_path"].tolist())


def cache_files(manifest: Manifest, size: int) -> tuple[Path, Path]:
    # Named by the image list's digest, so manifests sharing a folder never overwrite each other's cache.
    digest = image_list_digest(manifest)[:16]
    folder = manifest.root / CACHE_DIR
    return folder / f"images_{size}_{digest}.npy", folder / f"images_{size}_{digest}.json"


def open_cache(
    manifest: Manifest, size: int, build: bool = True, progress: bool = True, workers: int | None = None
) -> np.ndarray:
    """Return a read-only ``(rows, size, size)`` uint8 memmap of the manifest's images, building it if needed.

    Pass the whole manifest (``manifest.full``): row ``i`` of the array is row ``i`` of the file.
    ``workers``: decoding processes of a build (see :func:`build_cache`).
    """
    array_path, index_path = cache_files(manifest, size)
    digest = image_list_digest(manifest)
    if array_path.is_file() and index_path.is_file():
        meta = json.loads(index_path.read_text())
        if meta.get("digest") == digest and meta.get("size") == size:
            return np.load(array_path, mmap_mode="r")
        logger.info("Image cache %s does not match %s; rebuilding", array_path, manifest.source)
    if not build:
        raise FileNotFoundError(f"No image cache for {manifest.source} at {size}px ({array_path})")
    build_cache(manifest, size, progress=progress, workers=workers)
    return np.load(array_path, mmap_mode="r")


def build_cache(
    manifest: Manifest, size: int, progress: bool = True, flush_every: int = 512, workers: int | None = None
) -> Path:
    """Decode, center-crop and resize every image of the manifest once, into the cache array.

    Resumable: the array is filled in a ``.partial.npy`` file whose progress (the rows done, a prefix) is
    recorded every ``flush_every`` images, so an interrupted build continues where it stopped, with any
    number of workers; the finished array is renamed into place only when complete.

    Args:
        manifest: the whole manifest (``manifest.full``).
        size: the side of the cached images.
        progress: show a progress bar.
        flush_every: images between two progress records (with several workers: at most this many images a
            task; tasks complete in row order, so the record stays a prefix).
        workers: decoding processes; ``None``: ``os.cpu_count()``, or one for fewer than
            :data:`PARALLEL_MIN_IMAGES` images left to decode; ``1``: decode in this process.

    Raises:
        ImageReadError: an image cannot be decoded; the message names the manifest, the row and the file.
    """
    array_path, index_path = cache_files(manifest, size)
    array_path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = array_path.with_suffix(".partial.npy")
    progress_path = array_path.with_suffix(".partial.json")
    paths = manifest.image_paths()
    digest = image_list_digest(manifest)
    start = 0
    if partial_path.is_file() and progress_path.is_file():
        state = json.loads(progress_path.read_text())
        if state.get("digest") == digest and state.get("size") == size:
            start = int(state["done"])
    if start == 0:
        np.lib.format.open_memmap(partial_path, mode="w+", dtype=np.uint8, shape=(len(paths), size, size)).flush()
    else:
        logger.info("Resuming the %dpx image cache at image %d of %d", size, start, len(paths))
    workers = _resolve_workers(workers, len(paths) - start)

    def record(done: int) -> None:
        atomic_write_json(progress_path, {"digest": digest, "size": size, "done": done})

    bar = tqdm(total=len(paths), initial=start, desc=f"caching {size}px images", disable=not progress, unit="img")
    if workers == 1:
        out = np.load(partial_path, mmap_mode="r+")
        for i in range(start, len(paths)):
            try:
                out[i] = to_uint8_square(load_image(paths[i]), size)
            except ImageReadError as err:
                raise ImageReadError(f"{manifest.source}, row {csv_row(i)}: {err}") from err
            bar.update(1)
            if (i + 1) % flush_every == 0:
                out.flush()
                record(i + 1)
        out.flush()
        del out
    else:
        tasks = _decode_tasks(start, len(paths), workers, flush_every)
        _decode_in_workers(partial_path, [str(p) for p in paths], tasks, size, manifest.source, workers, bar, record)
    bar.close()
    os.replace(partial_path, array_path)
    progress_path.unlink(missing_ok=True)
    atomic_write_json(index_path, {"size": size, "rows": len(paths), "digest": digest})
    return array_path


def _resolve_workers(workers: int | None, todo: int) -> int:
    if workers is None:
        return (os.cpu_count() or 1) if todo >= PARALLEL_MIN_IMAGES else 1
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return max(1, min(workers, todo))


def _decode_tasks(start: int, stop: int, workers: int, flush_every: int) -> list[tuple[int, int]]:
    """Row ranges ``[a, b)`` covering ``start..stop``: at most ``flush_every`` rows each, and at least about four
    a worker, so that the last tasks do not leave workers idle."""
    rows = max(1, min(flush_every, -(-(stop - start) // (4 * workers))))
    return [(a, min(a + rows, stop)) for a in range(start, stop, rows)]


def _decode_rows(partial_path: str, paths: list[str], start: int, size: int, source: str) -> int:
    """Worker: decode ``paths`` (rows ``start``, ``start + 1``, ...) into the cache file; returns the rows done."""
    offset = np.load(partial_path, mmap_mode="r").offset
    # pwrite rather than a writable memmap: rows written through a mapping stay in this process's resident set
    # until the kernel writes them back, so a large cache would look like (and be counted as) memory in use.
    with open(partial_path, "r+b") as f:
        for i, path in enumerate(paths, start):
            try:
                square = to_uint8_square(load_image(path), size)
            except ImageReadError as err:
                raise ImageReadError(f"{source}, row {csv_row(i)}: {err}") from err
            os.pwrite(f.fileno(), square.tobytes(), offset + i * size * size)
    return len(paths)


def _decode_in_workers(
    partial_path: Path,
    paths: list[str],
    tasks: list[tuple[int, int]],
    size: int,
    source: str,
    workers: int,
    bar: tqdm,
    record: Callable[[int], None],
) -> None:
    """Run the decoding tasks in ``workers`` spawned processes, recording progress as tasks finish in row order.

    At most two tasks a worker are queued at a time: a failure (an unreadable image) stops the build within a few
    tasks, and waiting on the oldest task keeps the progress record a prefix of the rows.
    """
    # spawn, not fork: the caller may hold threads (torch, a process group) that a forked child would inherit
    # in whatever state they were in.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    pending: deque[tuple[int, Future]] = deque()

    def finish_oldest() -> None:
        stop, future = pending.popleft()
        bar.update(future.result())
        record(stop)

    try:
        for a, b in tasks:
            pending.append((b, pool.submit(_decode_rows, str(partial_path), paths[a:b], a, size, source)))
            if len(pending) >= 2 * workers:
                finish_oldest()
        while pending:
            finish_oldest()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
