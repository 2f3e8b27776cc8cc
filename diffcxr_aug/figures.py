"""What every figure of the package shares: a headless pyplot, image cells, report text and atomic saves.

The figures themselves (montages, report grids, loss curves, nearest neighbours, mAUC curves) live with the
step that draws them; these helpers keep their common parts in one place.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from diffcxr_aug.io import atomic_path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def show_image(ax, image: np.ndarray, **imshow_kwargs: Any) -> None:
    """A grey image in an axes cell without ticks; ``vmin``/``vmax`` default to the dtype's range (uint8 or [0, 1])."""
    image = np.asarray(image)
    imshow_kwargs.setdefault("vmin", 0)
    imshow_kwargs.setdefault("vmax", 255 if image.dtype == np.uint8 else 1.0)
    ax.imshow(image, cmap="gray", **imshow_kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def wrap_report(text: str, width: int, max_lines: int) -> list[str]:
    """A report as at most ``max_lines`` lines of ``width`` characters (whitespace collapsed, cut with '...')."""
    lines = textwrap.wrap(" ".join(str(text).split()), width)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [lines[max_lines - 1][: width - 3] + "..."]
    return lines


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Write ``fig`` atomically (format from the suffix, PNG without one) and release it."""
    path = Path(path)
    with atomic_path(path, suffix=path.suffix or ".png") as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    pyplot().close(fig)
    return path
