"""VAE latents of a manifest, encoded once into an on-disk store that every later consumer memory-maps.

LNFS, every rank of a generator run and every resume need the latents of the same images under the same VAE.
Encoding them in each process costs minutes to hours at MIMIC-CXR scale and holds a copy in each process's
memory (about 4 GB for 240,000 films at 4 x 32 x 32). :func:`open_latent_store` encodes them once into
``<manifest folder>/cache/latents_<size>_<fingerprint>.npy`` (float32, ``(rows, C, h, w)``, rows in manifest
order) with a JSON index beside it, and opens the array with ``np.load(mmap_mode="r")``.

The fingerprint hashes everything the latents depend on: the VAE (its config and weights, see
:func:`fingerprint_vae`), the manifest's image list, the image size and the transform applied before encoding.
A store whose fingerprint differs lives under another name, so a changed VAE or manifest is encoded afresh and
a stale store is never read.

The build is resumable and shared. Rows are encoded in chunks written straight into a ``.partial.npy`` file; a
one-byte-a-chunk map records the finished chunks, so a rerun after a kill encodes only the missing ones. Under
``torchrun`` / ``accelerate launch`` the ranks deal the missing chunks out between them, wait for each other
and open the finished array. (The text-state store of :mod:`~diffcxr_aug.generator.batches` is built the same way,
through :func:`processes`, :func:`start_partial` and :func:`finish_partial`.)

Who reads which store: generator training opens the store of its whole manifest file and reads each batch's rows
(:meth:`LatentStore.rows`); LNFS opens the store of the rows it scores (the whole file unless it drops views, so the
same store with ``normalize: none``) and writes the kept rows' latents into the store of its kept manifest
(:func:`derive_latent_store`), which a generator trained on that manifest then finds finished.

Example::

    store = open_latent_store(manifest.full, vae, 256, transform="equalize")
    print(store.encoded)  # 0 when another process (or an earlier run) encoded them already
    train = store.rows(manifest.split("train").frame.index.to_numpy())  # the train rows, read on demand
    latents = train[batch_indices]  # one batch read from the memory map, not the whole split
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from diffcxr_aug.data.cache import CACHE_DIR, image_list_digest, open_cache
from diffcxr_aug.data.dataset import equalize
from diffcxr_aug.data.manifest import Manifest
from diffcxr_aug.errors import InputError, MissingInputError
from diffcxr_aug.generator.vae import encode, latent_shape
from diffcxr_aug.io import atomic_path, atomic_write_json
from diffcxr_aug.runtime import resolve_device
from diffcxr_aug.types import FilterNormalize

logger = logging.getLogger(__name__)

# Bumped when the layout or the meaning of a store changes, so that older stores are not read as current ones.
STORE_FORMAT = 1


@dataclass(frozen=True)
class LatentStore:
    """An opened latent store.

    Attributes:
        path: the ``.npy`` file.
        array: read-only memmap ``(rows, C, h, w)`` float32, row ``i`` the latents of the manifest's row ``i``.
        fingerprint: SHA-256 of ``parts``.
        parts: what the latents depend on (VAE fingerprint, image-list digest, rows, size, transform, shape).
        encoded: images this process encoded during this call (0 when the store was finished already).
        reused: images already encoded when this call began (the whole store, or the finished chunks of an
            interrupted build).
    """

    path: Path
    array: np.ndarray = field(repr=False)
    fingerprint: str
    parts: dict[str, Any]
    encoded: int
    reused: int

    def __len__(self) -> int:
        return len(self.array)

    def batch(self, rows: Sequence[int] | np.ndarray) -> torch.Tensor:
        """The latents of ``rows`` (positions in the store) as a new float tensor."""
        return torch.from_numpy(np.array(self.array[np.asarray(rows)], dtype=np.float32))

    def rows(self, rows: Sequence[int] | np.ndarray) -> LatentRows:
        """A subset of the store (its ``rows``, in that order) read on demand, e.g. a split's rows."""
        return LatentRows(self, np.asarray(rows, dtype=np.int64))


@dataclass(frozen=True)
class LatentRows:
    """Rows of a :class:`LatentStore`, indexed like an ``(N, C, h, w)`` tensor but read from the memory map only when
    indexed: ``latents[batch_rows]`` and ``latents[a:b]`` return new float tensors of those rows alone.

    Attributes:
        store: the store read from.
        positions: the store row of each row here (``positions[i]`` is row ``i``).
    """

    store: LatentStore
    positions: np.ndarray = field(repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.positions), *self.store.array.shape[1:])

    @property
    def ndim(self) -> int:
        return self.store.array.ndim

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> torch.Tensor:
        return self.store.batch(self.positions[index])


def fingerprint_vae(vae: AutoencoderKL) -> str:
    """SHA-256 of a VAE's config (its public keys: architecture, ``scaling_factor``, ``shift_factor``) and of every
    tensor of its state dict (name, dtype, shape, bytes).

    Hashing the loaded weights rather than a file also covers a VAE trained or edited in memory; an SD VAE
    (84M parameters) hashes in about a second.
    """
    return fingerprint_module(vae, {key: value for key, value in vae.config.items() if not key.startswith("_")})


def fingerprint_module(module: torch.nn.Module, config: dict[str, Any]) -> str:
    """SHA-256 of ``config`` (as sorted JSON) and of every tensor of the module's state dict (name, dtype, shape,
    bytes): the identity of a model whose outputs a store holds."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"\0{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def store_files(manifest: Manifest, size: int, fingerprint: str) -> tuple[Path, Path]:
    """The array and its JSON index for a fingerprint: ``<manifest folder>/cache/latents_<size>_<fp[:16]>``."""
    stem = manifest.root / CACHE_DIR / f"latents_{size}_{fingerprint[:16]}"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def _transform_function(transform: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if transform == "none":
        return None
    if transform == "equalize":
        return equalize
    raise ValueError(f"Unsupported transform {transform!r}; choose none or equalize")


@contextlib.contextmanager
def processes(device: torch.device) -> Iterator[tuple[int, int, Callable[[], Any], torch.device]]:
    """``(rank, world_size, wait_for_everyone, device)`` of this process (for every store built by all processes).

    A single process (``WORLD_SIZE`` unset or 1) starts no accelerate state and no process group. Under
    ``torchrun`` / ``accelerate launch`` it is accelerate's ``PartialState`` (gloo on CPU, NCCL on CUDA with one GPU
    a process), joining the state and process group the caller started (a training's ``Accelerator``) or starting
    both and ending them on the way out, as ``synthesize`` does, so that a later step of the process chooses its
    device afresh.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield 0, 1, lambda: None, device
        return
    import torch.distributed as dist
    from accelerate import PartialState

    started_group, started_state = not dist.is_initialized(), PartialState._shared_state == {}
    state = PartialState(cpu=device.type == "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", state.local_process_index)
    try:
        yield state.process_index, state.num_processes, state.wait_for_everyone, device
    finally:
        if started_group and dist.is_initialized():
            dist.destroy_process_group()
        if started_state:
            PartialState._reset_state()


def open_latent_store(
    manifest: Manifest,
    vae: AutoencoderKL,
    size: int,
    *,
    vae_fingerprint: str | None = None,
    transform: FilterNormalize = "none",
    batch_size: int = 64,
    chunk_size: int | None = None,
    device: str | torch.device = "auto",
    build: bool = True,
    progress: bool = True,
) -> LatentStore:
    """The posterior-mean latents of every row of ``manifest`` (scaled, as :func:`~diffcxr_aug.generator.vae.encode`
    returns them), from the store, encoding what is missing first.

    Every process of a ``torchrun`` / ``accelerate launch`` job must call it (it waits at barriers): each encodes
    its share of the missing chunks. Images come from the manifest's image cache at ``size`` (built first, by
    process 0, when missing). Two separate jobs must not build the same store at the same time.

    Args:
        manifest: the rows to encode, in order. Pass ``manifest.full`` to share one store between every consumer of
            a manifest file, then index it with a subset's ``frame.index``; a split makes a store of its own.
        vae: the VAE to encode with (moved to ``device``, put in eval mode).
        size: the image side the images are encoded at.
        vae_fingerprint: the VAE's identity, when the caller has one that changes with its weights (e.g. the hash
            of its weights file); ``None``: :func:`fingerprint_vae`.
        transform: applied to each image before encoding: ``none`` or ``equalize``
            (:func:`~diffcxr_aug.data.dataset.equalize`, LNFS's ``normalize: equalize``).
        batch_size: images a VAE call.
        chunk_size: images a recorded chunk (the unit of resumption and of the ranks' shares), a multiple of
            ``batch_size`` so that the batches, and the latents, do not depend on who encodes a chunk;
            ``None``: ``16 * batch_size``.
        device: ``auto``, ``cpu``, ``cuda[:N]`` or a ``torch.device`` (under torchrun a GPU is each process's
            own).
        build: encode a missing store; ``False``: raise instead.
        progress: show a progress bar (process 0).

    Returns:
        The opened :class:`LatentStore`; ``encoded`` says how many images this process encoded.

    Raises:
        MissingInputError: ``build=False`` and no finished store matches.
    """
    # 1. Check inputs and fingerprint
    if len(manifest) == 0:
        raise InputError(f"{manifest.source}: no rows to encode into a latent store")
    transform_fn = _transform_function(transform)
    chunk_size = chunk_size if chunk_size is not None else 16 * batch_size
    if batch_size < 1 or chunk_size < 1 or chunk_size % batch_size:
        raise ValueError(
            f"chunk_size ({chunk_size}) must be a positive multiple of batch_size ({batch_size}), so that every "
            "chunk is encoded in the same batches whichever process encodes it"
        )
    dev = resolve_device(device) if isinstance(device, str) else device
    shape = (len(manifest), *latent_shape(vae, size))
    parts = _store_parts(manifest, vae_fingerprint or fingerprint_vae(vae), size, transform, shape)
    fingerprint = _fingerprint(parts)
    array_path, index_path = store_files(manifest, size, fingerprint)

    # 2. A finished store
    finished = _open_finished(array_path, index_path, fingerprint, shape)
    if finished is not None:
        logger.info("latent store %s: encoded 0 of %d images (%d reused)", array_path, len(manifest), len(manifest))
        return LatentStore(array_path, finished, fingerprint, parts, encoded=0, reused=len(manifest))
    if not build:
        raise MissingInputError(
            f"{manifest.source}: no latent store for this VAE, image list, {size}px and transform {transform!r} "
            f"({array_path}); open it with build=True to encode the images"
        )

    # 3. Start or resume the build (process 0), then encode this process's share of the missing chunks
    partial_path = array_path.with_suffix(".partial.npy")
    done_path = array_path.with_suffix(".partial.done")
    record_path = array_path.with_suffix(".partial.json")
    with processes(dev) as (rank, world, wait_for_everyone, dev):
        if rank == 0:
            _log_other_stores(array_path, size)
            open_cache(manifest.full, size, progress=progress)
            record = {"fingerprint": fingerprint, "chunk_size": chunk_size}
            start_partial(partial_path, done_path, record_path, record, shape, math.ceil(len(manifest) / chunk_size))
        wait_for_everyone()
        images = open_cache(manifest.full, size, build=False)
        missing = np.flatnonzero(np.fromfile(done_path, dtype=np.uint8) == 0).tolist()
        reused = len(manifest) - sum(min(len(manifest), (c + 1) * chunk_size) - c * chunk_size for c in missing)
        # Every process deals from the same reading of the map: one that read it after another had marked a chunk
        # would deal the chunks differently, and some would be left to nobody.
        wait_for_everyone()
        encoded = _encode_chunks(
            vae.to(dev).eval(),
            images,
            manifest.frame.index.to_numpy(),
            missing[rank::world],
            chunk_size,
            batch_size,
            transform_fn,
            dev,
            partial_path,
            done_path,
            progress and rank == 0,
        )
        wait_for_everyone()
        if rank == 0:
            index = {**parts, "fingerprint": fingerprint}
            finish_partial(partial_path, done_path, record_path, array_path, index_path, index)
        wait_for_everyone()
    note = f" on rank {rank} of {world}" if world > 1 else ""
    logger.info(
        "latent store %s: encoded %d of %d images (%d reused)%s", array_path, encoded, len(manifest), reused, note
    )
    array = np.load(array_path, mmap_mode="r")
    return LatentStore(array_path, array, fingerprint, parts, encoded=encoded, reused=reused)


def derive_latent_store(
    source: LatentStore, rows: Sequence[int] | np.ndarray, manifest: Manifest, chunk_rows: int = 4096
) -> LatentStore:
    """The store of ``manifest`` whose row ``i`` is row ``rows[i]`` of ``source``, copied rather than encoded.

    For a manifest made of another's rows (LNFS's kept manifest, from the store it scored): the store is the one
    :func:`open_latent_store` finds for ``manifest`` with the source's VAE, size and transform, so a generator
    trained on the kept rows encodes nothing. The caller vouches that ``rows`` are the same images: the latents
    depend on the image file only, and the image lists differ in how they spell the paths.

    Args:
        source: an opened store.
        rows: the source row of each of ``manifest``'s rows, in order.
        manifest: the manifest the store is for (read back from its file, so that its paths are spelled as a
            later reader sees them).
        chunk_rows: rows copied at a time (what the copy holds in memory).

    Returns:
        The opened store: ``encoded`` is 0; ``reused`` is its rows when it was there already, 0 when copied now.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) != len(manifest):
        raise ValueError(f"rows ({len(rows)}) must name one source row for each of the manifest's {len(manifest)}")
    size, transform = source.parts["size"], source.parts["transform"]
    shape = (len(manifest), *source.array.shape[1:])
    parts = _store_parts(manifest, source.parts["vae"], size, transform, shape)
    fingerprint = _fingerprint(parts)
    array_path, index_path = store_files(manifest, size, fingerprint)
    finished = _open_finished(array_path, index_path, fingerprint, shape)
    if finished is not None:
        logger.info("latent store %s: encoded 0 of %d images (%d reused)", array_path, len(manifest), len(manifest))
        return LatentStore(array_path, finished, fingerprint, parts, encoded=0, reused=len(manifest))
    partial_path = array_path.with_suffix(".partial.npy")
    partial_path.parent.mkdir(parents=True, exist_ok=True)
    layout = np.lib.format.open_memmap(partial_path, mode="w+", dtype=np.float32, shape=shape)
    offset, row_bytes = layout.offset, layout.itemsize * math.prod(shape[1:])
    del layout
    # pwrite, as the encoding does: rows written through a mapping would stay in this process's resident set.
    with open(partial_path, "r+b") as data:
        for start in range(0, len(rows), chunk_rows):
            block = np.ascontiguousarray(source.array[rows[start : start + chunk_rows]], dtype=np.float32)
            os.pwrite(data.fileno(), block.tobytes(), offset + start * row_bytes)
        os.fdatasync(data.fileno())
    # The index first, as finish_partial does: an index without its array is copied again, never misread.
    atomic_write_json(index_path, {**parts, "fingerprint": fingerprint, "copied_from": str(source.path)})
    os.replace(partial_path, array_path)
    logger.info(
        "latent store %s: encoded 0 of %d images (%d copied from %s)", array_path, len(rows), len(rows), source.path
    )
    array = np.load(array_path, mmap_mode="r")
    return LatentStore(array_path, array, fingerprint, parts, encoded=0, reused=0)


def _store_parts(
    manifest: Manifest, vae_fingerprint: str, size: int, transform: str, shape: tuple[int, ...]
) -> dict[str, Any]:
    """What a store's latents depend on; its fingerprint is their hash."""
    return {
        "format": STORE_FORMAT,
        "vae": vae_fingerprint,
        "images": image_list_digest(manifest),
        "rows": len(manifest),
        "size": size,
        "transform": transform,
        "shape": list(shape),
        "dtype": "float32",
    }


def _fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _open_finished(array_path: Path, index_path: Path, fingerprint: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The finished store's memmap when its index names this fingerprint and its array has this shape."""
    if not (array_path.is_file() and index_path.is_file()):
        return None
    index = json.loads(index_path.read_text(encoding="utf-8"))
    array = np.load(array_path, mmap_mode="r")
    if index.get("fingerprint") == fingerprint and array.shape == shape and array.dtype == np.float32:
        return array
    logger.info("latent store %s does not match its fingerprint %s; encoding it again", array_path, fingerprint)
    return None


def _log_other_stores(array_path: Path, size: int) -> None:
    mine = (array_path, array_path.with_suffix(".partial.npy"))
    others = sorted(p.name for p in array_path.parent.glob(f"latents_{size}_*.npy") if p not in mine)
    if others:
        logger.info(
            "%s holds %d latent store(s) of another VAE, image list or transform, or their interrupted builds (%s); "
            "not used here (LNFS with normalize: equalize keeps one of its own): delete those no longer needed to "
            "free the disk",
            array_path.parent,
            len(others),
            ", ".join(others),
        )


def start_partial(
    partial_path: Path,
    done_path: Path,
    record_path: Path,
    record: dict[str, Any],
    shape: tuple[int, ...],
    chunks: int,
    what: str = "latent store",
) -> None:
    """Keep an interrupted build of the same store with the same chunks, or lay out a fresh one (a float32 array of
    ``shape`` and a map of ``chunks`` zero bytes); ``what`` names the store in the log.

    The record is written last and removed first: without it the partial array and the chunk map are never
    trusted, so a kill while laying out a build cannot leave a map that calls unwritten chunks done.
    """
    if partial_path.is_file() and done_path.is_file() and record_path.is_file():
        if json.loads(record_path.read_text(encoding="utf-8")) == record and done_path.stat().st_size == chunks:
            logger.info("%s: resuming the interrupted build in %s", what, partial_path)
            return
        logger.info("%s: %s is from another build; starting over", what, partial_path)
    record_path.unlink(missing_ok=True)
    partial_path.parent.mkdir(parents=True, exist_ok=True)
    np.lib.format.open_memmap(partial_path, mode="w+", dtype=np.float32, shape=shape).flush()
    with atomic_path(done_path) as tmp:
        tmp.write_bytes(bytes(chunks))
    atomic_write_json(record_path, record)


def _encode_chunks(
    vae: AutoencoderKL,
    images: np.ndarray,
    file_rows: np.ndarray,
    chunks: list[int],
    chunk_size: int,
    batch_size: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    device: torch.device,
    partial_path: Path,
    done_path: Path,
    progress: bool,
) -> int:
    """Encode the rows of ``chunks`` into the partial array and mark each chunk done; returns the images encoded.

    Each chunk's rows are on disk (``fdatasync``) before its byte in the map is set, so a chunk marked done after a
    crash is complete.
    """
    n = len(file_rows)
    total = sum(min(n, (c + 1) * chunk_size) - c * chunk_size for c in chunks)
    layout = np.load(partial_path, mmap_mode="r")
    offset, row_bytes = layout.offset, layout.itemsize * math.prod(layout.shape[1:])
    del layout
    encoded = 0
    bar = tqdm(total=total, desc="encoding latents", disable=not progress, unit="img")
    # pwrite rather than a writable memmap: rows written through a mapping stay in this process's resident set, so
    # a large store would show (and be accounted) as memory in use.
    with open(partial_path, "r+b") as data, open(done_path, "r+b") as done, torch.no_grad():
        for chunk in chunks:
            start, stop = chunk * chunk_size, min(n, (chunk + 1) * chunk_size)
            for a in range(start, stop, batch_size):
                b = min(a + batch_size, stop)
                pixels = torch.from_numpy(images[file_rows[a:b]].astype(np.float32) / 255.0).unsqueeze(1)
                if transform is not None:
                    pixels = torch.stack([transform(image) for image in pixels])
                latents = encode(vae, pixels.to(device)).float().cpu().numpy()
                os.pwrite(data.fileno(), np.ascontiguousarray(latents).tobytes(), offset + a * row_bytes)
                bar.update(b - a)
            os.fdatasync(data.fileno())
            os.pwrite(done.fileno(), b"\x01", chunk)
            encoded += stop - start
    bar.close()
    return encoded


def finish_partial(
    partial_path: Path,
    done_path: Path,
    record_path: Path,
    array_path: Path,
    index_path: Path,
    index: dict[str, Any],
) -> None:
    """Rename the complete partial array into place (the index first: an index without its array is a build
    that resumes with every chunk done, while an array without its index would be encoded again)."""
    done = np.fromfile(done_path, dtype=np.uint8)
    if not done.all():
        raise RuntimeError(f"{partial_path}: chunks {np.flatnonzero(done == 0).tolist()} were not encoded")
    atomic_write_json(index_path, index)
    os.replace(partial_path, array_path)
    done_path.unlink()
    record_path.unlink()
