"""What each micro-batch of training is made of: :class:`BatchStream` (its rows, noise, timesteps and dropped
reports, a pure function of ``(seed, micro-step, rank)``), and a frozen report encoder's token states computed once
per distinct text: in memory (:class:`TextStates`), or, when they do not fit there, in a memory-mapped store beside
the manifest's caches (:func:`open_text_states`). The latents come from the latent store
(:class:`~diffcxr_aug.generator.latent_store.LatentRows`)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffcxr_aug.generator.latent_store import fingerprint_module, finish_partial, processes, start_partial

logger = logging.getLogger(__name__)

# Frozen-encoder token states are cached in memory up to this size (phantom-64 with MiniLM: about 0.2 GB); larger
# ones go to a memory-mapped store on disk (open_text_states).
TEXT_CACHE_MAX_BYTES = 4 * 2**30
# Bumped when the layout or the meaning of a text-state store changes.
TEXT_STORE_FORMAT = 1
# Texts an encoder call (the in-memory and the on-disk states are encoded in the same batches, so they are equal).
TEXT_BATCH = 64


class BatchStream:
    """Which rows, noise, timesteps and dropped reports each micro-step uses: a pure function of
    ``(seed, micro_step, rank)``, so that a resumed run draws exactly what an uninterrupted one would."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, 1, epoch]).permutation(self.n)
        return self._perms[epoch]

    def indices(self, micro_step: int) -> np.ndarray:
        """Rows of micro-step ``micro_step`` for this rank: consecutive slices of epoch permutations."""
        start = (micro_step * self.world + self.rank) * self.batch_size
        positions = np.arange(start, start + self.batch_size)
        return np.array([self._perm(int(p // self.n))[p % self.n] for p in positions])

    def generator(self, micro_step: int) -> torch.Generator:
        seed = int(np.random.SeedSequence([self.seed, 2, micro_step, self.rank]).generate_state(1)[0])
        return torch.Generator().manual_seed(seed)


class TextStates:
    """Token states of a frozen encoder, computed once per distinct report (and the empty report)."""

    def __init__(self, bundle: Any, reports: Sequence[str], max_length: int, device: torch.device, progress: bool):
        from diffcxr_aug.generator.text_encoder import encode_tokens, tokenize

        unique = distinct_texts(reports)
        self.index = {r: i for i, r in enumerate(unique)}
        self.states: list[torch.Tensor] = []
        order = encoding_order(unique)
        results: dict[int, torch.Tensor] = {}
        chunk = TEXT_BATCH
        model = bundle.model
        with torch.no_grad():
            for start in tqdm(
                range(0, len(order), chunk), desc="encoding reports", disable=not progress, unit="batch"
            ):
                ids = order[start : start + chunk]
                tokens = tokenize(bundle.tokenizer, [unique[i] for i in ids], max_length, device)
                states, mask = encode_tokens(model, tokens)
                for row, i in enumerate(ids):
                    results[i] = states[row, : int(mask[row].sum())].float().cpu()
        self.states = [results[i] for i in range(len(unique))]

    def batch(self, reports: Sequence[str], device: torch.device, pad_to: int = 0) -> dict[str, torch.Tensor]:
        """Padded to the batch's longest report, or to at least ``pad_to`` tokens (one shape for every batch: a
        compiled squeeze then compiles once instead of again for varying lengths; the padding is masked)."""
        return _padded([self.states[self.index[r]] for r in reports], device, pad_to)


class TextStateStore:
    """The token states of :class:`TextStates`, read from a memory-mapped store on disk a batch at a time.

    Made by :func:`open_text_states`. The store is one float32 array ``(tokens, hidden)``: the states of every
    distinct text, one after another in :func:`distinct_texts` order, text ``i`` at rows
    ``offsets[i]:offsets[i + 1]``.

    Attributes:
        path: the ``.npy`` file.
        array: the read-only memmap.
        fingerprint: SHA-256 of what the states depend on (the encoder's config and weights, every text's token
            ids, which cover the tokenizer and the maximum length).
        encoded: texts this process encoded during :func:`open_text_states` (0 when the store was finished).
        reused: texts already encoded when it began.
    """

    def __init__(
        self,
        path: Path,
        array: np.ndarray,
        fingerprint: str,
        texts: Sequence[str],
        offsets: np.ndarray,
        encoded: int,
        reused: int,
    ) -> None:
        self.path, self.array, self.fingerprint = path, array, fingerprint
        self.index = {text: i for i, text in enumerate(texts)}
        self.offsets, self.encoded, self.reused = offsets, encoded, reused

    def states(self, text: str) -> torch.Tensor:
        i = self.index[text]
        return torch.from_numpy(np.array(self.array[self.offsets[i] : self.offsets[i + 1]]))

    def batch(self, reports: Sequence[str], device: torch.device, pad_to: int = 0) -> dict[str, torch.Tensor]:
        """As :meth:`TextStates.batch`, from the memory map."""
        return _padded([self.states(r) for r in reports], device, pad_to)


def distinct_texts(texts: Sequence[str]) -> list[str]:
    """The texts whose states are cached: the empty report (classifier-free guidance's) and every distinct text."""
    return list(dict.fromkeys(["", *texts]))


def encoding_order(unique: Sequence[str]) -> list[int]:
    """Longest first, encoded in fixed batches of :data:`TEXT_BATCH`: little padding, and the same batches on every
    run (and in memory as on disk)."""
    return sorted(range(len(unique)), key=lambda i: -len(unique[i]))


def open_text_states(
    bundle: Any,
    texts: Sequence[str],
    max_length: int,
    folder: Path,
    device: torch.device,
    progress: bool = True,
    chunk_batches: int = 16,
) -> TextStateStore:
    """A frozen encoder's token states of every distinct text in ``folder/text_states_<fingerprint>.npy``, encoding
    what is missing first.

    Built like the latent store (:func:`~diffcxr_aug.generator.latent_store.open_latent_store`): every process of a
    ``torchrun`` / ``accelerate launch`` job must call it; the missing chunks (``chunk_batches`` encoder batches
    each) are dealt out between the processes, each chunk recorded when on disk, so a rerun after a kill encodes
    only the missing ones; a finished store whose fingerprint matches is read as it is by every later run, rank
    and resume. The states equal :class:`TextStates`'s, batch for batch.

    Args:
        bundle: the loaded encoder (:class:`~diffcxr_aug.generator.text_encoder.TextEncoderBundle`), its model on
            ``device`` and in eval mode.
        texts: the reports (and knowledge texts) to cache.
        max_length: tokens an input is truncated to.
        folder: where the store lives (the manifest's cache folder).
        device: the encoder's device.
        progress: show a progress bar (process 0).
        chunk_batches: encoder batches a recorded chunk.
    """
    unique = distinct_texts(texts)
    lengths, ids_digest = _token_ids(bundle.tokenizer, unique, max_length)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    shape = (int(offsets[-1]), bundle.hidden_size)
    config = {k: v for k, v in bundle.model.config.to_dict().items() if not k.startswith("_")}
    config.pop("transformers_version", None)  # the weights and architecture decide the states, not the library
    parts = {
        "format": TEXT_STORE_FORMAT,
        "encoder": fingerprint_module(bundle.model, config),
        "token_ids": ids_digest,
        "texts": len(unique),
        "max_length": max_length,
        "shape": list(shape),
        "dtype": "float32",
    }
    fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    array_path = Path(folder) / f"text_states_{fingerprint[:16]}.npy"
    index_path = array_path.with_suffix(".json")
    if array_path.is_file() and index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        array = np.load(array_path, mmap_mode="r")
        if index.get("fingerprint") == fingerprint and array.shape == shape:
            logger.info("text states %s: encoded 0 of %d texts (%d reused)", array_path, len(unique), len(unique))
            return TextStateStore(array_path, array, fingerprint, unique, offsets, encoded=0, reused=len(unique))

    order = encoding_order(unique)
    chunk_texts = chunk_batches * TEXT_BATCH
    chunks = [order[a : a + chunk_texts] for a in range(0, len(order), chunk_texts)]
    partial_path = array_path.with_suffix(".partial.npy")
    done_path = array_path.with_suffix(".partial.done")
    record_path = array_path.with_suffix(".partial.json")
    with processes(device) as (rank, world, wait_for_everyone, dev):
        if rank == 0:
            logger.info(
                "text states: %d distinct texts, %d tokens: %.2f GiB in %s",
                len(unique), shape[0], 4 * math.prod(shape) / 2**30, array_path,
            )  # fmt: skip
            record = {"fingerprint": fingerprint, "chunk_texts": chunk_texts}
            start_partial(partial_path, done_path, record_path, record, shape, len(chunks), what="text states")
        wait_for_everyone()
        missing = np.flatnonzero(np.fromfile(done_path, dtype=np.uint8) == 0).tolist()
        reused = len(unique) - sum(len(chunks[c]) for c in missing)
        wait_for_everyone()  # every process deals from the same reading of the map
        mine = [chunks[c] for c in missing[rank::world]]
        encoded = _encode_text_chunks(
            bundle, unique, mine, missing[rank::world], offsets, max_length, dev, partial_path, done_path,
            progress and rank == 0,
        )  # fmt: skip
        wait_for_everyone()
        if rank == 0:
            finish_partial(
                partial_path, done_path, record_path, array_path, index_path, {**parts, "fingerprint": fingerprint}
            )
        wait_for_everyone()
    note = f" on rank {rank} of {world}" if world > 1 else ""
    logger.info("text states %s: encoded %d of %d texts (%d reused)%s", array_path, encoded, len(unique), reused, note)
    array = np.load(array_path, mmap_mode="r")
    return TextStateStore(array_path, array, fingerprint, unique, offsets, encoded=encoded, reused=reused)


def _token_ids(tokenizer: Any, texts: Sequence[str], max_length: int, batch: int = 4096) -> tuple[np.ndarray, str]:
    """Each text's token count after truncation to ``max_length``, and a SHA-256 of every text's token ids.

    In batches: the ids of a MIMIC-size corpus as Python lists would take gigabytes.
    """
    digest = hashlib.sha256(f"{max_length}".encode())
    lengths = np.zeros(len(texts), dtype=np.int64)
    for start in range(0, len(texts), batch):
        ids = tokenizer(list(texts[start : start + batch]), truncation=True, max_length=max_length)["input_ids"]
        for i, row in enumerate(ids, start):
            lengths[i] = len(row)
            digest.update(np.asarray(row, dtype=np.int64).tobytes() + b"\xff" * 8)
    return lengths, digest.hexdigest()


def _encode_text_chunks(
    bundle: Any,
    unique: Sequence[str],
    chunks: list[list[int]],
    chunk_ids: list[int],
    offsets: np.ndarray,
    max_length: int,
    device: torch.device,
    partial_path: Path,
    done_path: Path,
    progress: bool,
) -> int:
    """Encode the texts of ``chunks`` into the partial array, in batches of :data:`TEXT_BATCH`, and mark each
    chunk done once on disk; returns the texts encoded."""
    from diffcxr_aug.generator.text_encoder import encode_tokens, tokenize

    layout = np.load(partial_path, mmap_mode="r")
    header, row_bytes = layout.offset, layout.itemsize * layout.shape[1]
    del layout
    encoded = 0
    bar = tqdm(total=sum(map(len, chunks)), desc="encoding reports", disable=not progress, unit="text")
    # pwrite, as the latent store does: rows written through a mapping would stay in this process's resident set.
    with open(partial_path, "r+b") as data, open(done_path, "r+b") as done, torch.no_grad():
        for chunk, chunk_id in zip(chunks, chunk_ids, strict=True):
            for start in range(0, len(chunk), TEXT_BATCH):
                ids = chunk[start : start + TEXT_BATCH]
                tokens = tokenize(bundle.tokenizer, [unique[i] for i in ids], max_length, device)
                states, mask = encode_tokens(bundle.model, tokens)
                states = states.float().cpu().numpy()
                for row, i in enumerate(ids):
                    n = int(offsets[i + 1] - offsets[i])
                    if int(mask[row].sum()) != n:  # the layout was planned from the same tokenizer's counts
                        raise RuntimeError(f"text {i}: {int(mask[row].sum())} tokens encoded, {n} planned")
                    os.pwrite(
                        data.fileno(), np.ascontiguousarray(states[row, :n]).tobytes(), header + offsets[i] * row_bytes
                    )
                bar.update(len(ids))
            os.fdatasync(data.fileno())
            os.pwrite(done.fileno(), b"\x01", chunk_id)
            encoded += len(chunk)
    bar.close()
    return encoded


def _padded(states: list[torch.Tensor], device: torch.device, pad_to: int) -> dict[str, torch.Tensor]:
    """``(B, L, D)`` states zero-padded to the longest (or ``pad_to``) and their attention mask, on ``device``."""
    length = max(pad_to, *(s.shape[0] for s in states))
    padded = torch.zeros(len(states), length, states[0].shape[1])
    mask = torch.zeros(len(states), length, dtype=torch.long)
    for i, s in enumerate(states):
        padded[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
    return {"states": padded.to(device), "attention_mask": mask.to(device)}
