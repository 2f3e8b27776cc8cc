"""What each micro-batch of training is made of: :class:`BatchStream` (its rows, noise, timesteps and dropped
reports, a pure function of ``(seed, micro-step, rank)``) and :class:`TextStates` (a frozen report encoder's token
states, computed once per distinct text)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

# Frozen-encoder token states are cached in memory up to this size (phantom-64 with MiniLM: about 0.2 GB).
TEXT_CACHE_MAX_BYTES = 4 * 2**30


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

        unique = list(dict.fromkeys(["", *reports]))
        self.index = {r: i for i, r in enumerate(unique)}
        self.states: list[torch.Tensor] = []
        # Longest first, in fixed chunks: little padding, and the same batches on every run.
        order = sorted(range(len(unique)), key=lambda i: -len(unique[i]))
        results: dict[int, torch.Tensor] = {}
        chunk = 64
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
        states = [self.states[self.index[r]] for r in reports]
        length = max(pad_to, *(s.shape[0] for s in states))
        padded = torch.zeros(len(states), length, states[0].shape[1])
        mask = torch.zeros(len(states), length, dtype=torch.long)
        for i, s in enumerate(states):
            padded[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = 1
        return {"states": padded.to(device), "attention_mask": mask.to(device)}
