"""``prepare``: index a dataset into the common manifest (dispatch to the adapters)."""

from __future__ import annotations

from pathlib import Path


def prepare_dataset(
    dataset: str, out: Path, root: Path | None = None, size: int = 128, seed: int = 0, n: int = 2000, **csv_options
) -> Path:
    raise NotImplementedError(f"prepare {dataset} (issue #3 / #4)")
