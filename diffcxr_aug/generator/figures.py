"""Figures for people to judge the generator: report-next-to-image grids and loss curves."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from diffcxr_aug.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_report_grid(
    reports: Sequence[str],
    generated: Sequence[np.ndarray],
    out_png: str | os.PathLike,
    real: Sequence[np.ndarray] | None = None,
    captions: Sequence[str] | None = None,
    title: str | None = None,
    wrap: int = 56,
    max_lines: int = 10,
    dpi: int = 90,
) -> Path:
    """One row per report: the (wrapped) report text, then the real image (if given), then the generated one.

    Args:
        reports: report texts, one per row.
        generated: ``(H, W)`` images in [0, 1] or uint8, one per report.
        out_png: output path (written atomically).
        real: optional real images of the same reports, shown before the generated ones.
        captions: optional short line per row (labels, seed) shown above the report.
        title: figure title.
        wrap: characters per text line.
        max_lines: report lines shown (longer reports end with an ellipsis).
        dpi: output resolution.
    """
    plt = _pyplot()
    rows = len(reports)
    if len(generated) != rows or (real is not None and len(real) != rows):
        raise ValueError(
            f"{rows} reports but {len(generated)} generated and {0 if real is None else len(real)} real images"
        )
    columns = [("report", 3.6)] + ([("real", 1.6)] if real is not None else []) + [("generated", 1.6)]
    height = 1.9 * rows + (0.4 if title else 0.0)
    fig, axes = plt.subplots(
        rows,
        len(columns),
        figsize=(sum(w for _, w in columns), height),
        gridspec_kw={"width_ratios": [w for _, w in columns], "wspace": 0.04, "hspace": 0.08},
        squeeze=False,
    )
    for i in range(rows):
        text = " ".join(str(reports[i]).split()) or "(empty report)"
        lines = textwrap.wrap(text, wrap)
        if len(lines) > max_lines:
            lines = lines[: max_lines - 1] + [lines[max_lines - 1][: wrap - 3] + "..."]
        if captions is not None:
            lines = [captions[i], ""] + lines
        axes[i, 0].axis("off")
        axes[i, 0].text(0.0, 1.0, "\n".join(lines), fontsize=6.2, va="top", ha="left", family="DejaVu Sans")
        images = ([real[i]] if real is not None else []) + [generated[i]]
        for j, image in enumerate(images, start=1):
            ax = axes[i, j]
            image = np.asarray(image)
            ax.imshow(image, cmap="gray", vmin=0, vmax=255 if image.dtype == np.uint8 else 1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[j][0], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 - 0.1 / height)
        fig.subplots_adjust(top=1.0 - 0.45 / height)
    out_png = Path(out_png)
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return out_png


def save_loss_plot(csv_path: str | os.PathLike, out_png: str | os.PathLike, smooth: int = 20) -> Path | None:
    """Plot the loss columns of a training log CSV (raw, light; moving average, dark). ``None`` if empty."""
    frame = pd.read_csv(csv_path)
    if frame.empty:
        return None
    plt = _pyplot()
    columns = [c for c in ("loss", "loss_diffusion", "loss_align") if c in frame and frame[c].notna().any()]
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.2), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        ax.plot(frame["step"], frame[column], color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(frame["step"], frame[column].rolling(smooth, min_periods=1).mean(), color="tab:blue")
        ax.set_xlabel("step")
        ax.set_title(column)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return out_png
