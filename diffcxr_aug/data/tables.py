"""A dataset's own tables: finding them in its folder, reading them as strings and checking their columns."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from diffcxr_aug.errors import InputError, MissingInputError


class DatasetLayoutError(InputError):
    """The dataset folder or one of its tables is not in the layout the adapter expects."""


def require_columns(frame: pd.DataFrame, columns: Iterable[str], source: str, hint: str = "") -> None:
    """Raise naming each missing column and listing the columns the table does have."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetLayoutError(
            f"{source}: missing column(s) {missing}; found columns {list(frame.columns)}"
            + (f". {hint}" if hint else "")
        )


def find_table(root: Path, names: Sequence[str], what: str) -> Path:
    """The first of ``names`` (plain or ``.gz``) found in ``root``; an error listing what was looked for."""
    for name in names:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    tried = ", ".join(f"{n}[.gz]" for n in names)
    raise MissingInputError(f"{root}: no {what} found (looked for {tried})")


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV (plain or gzipped) as strings, empty cells as ``""``."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DatasetLayoutError(f"{path}: not a readable CSV ({err})") from err
