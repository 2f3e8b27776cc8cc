"""Figures for people to judge the generator: report-next-to-image grids and loss curves."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from diffcxr_aug.figures import pyplot, save_figure, show_image, wrap_report


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
    plt = pyplot()
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
        lines = wrap_report(reports[i] if str(reports[i]).split() else "(empty report)", wrap, max_lines)
        if captions is not None:
            lines = [captions[i], ""] + lines
        axes[i, 0].axis("off")
        axes[i, 0].text(0.0, 1.0, "\n".join(lines), fontsize=6.2, va="top", ha="left", family="DejaVu Sans")
        images = ([real[i]] if real is not None else []) + [generated[i]]
        for j, image in enumerate(images, start=1):
            show_image(axes[i, j], image)
            if i == 0:
                axes[i, j].set_title(columns[j][0], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9, y=1.0 - 0.1 / height)
        fig.subplots_adjust(top=1.0 - 0.45 / height)
    return save_figure(fig, out_png, dpi=dpi, bbox_inches="tight")


def save_loss_plot(csv_path: str | os.PathLike, out_png: str | os.PathLike, smooth: int = 20) -> Path | None:
    """Plot the loss columns of a training log CSV (raw, light; moving average, dark). ``None`` if empty."""
    frame = pd.read_csv(csv_path)
    if frame.empty:
        return None
    plt = pyplot()
    columns = [c for c in ("loss", "loss_diffusion", "loss_align") if c in frame and frame[c].notna().any()]
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.2), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        ax.plot(frame["step"], frame[column], color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(frame["step"], frame[column].rolling(smooth, min_periods=1).mean(), color="tab:blue")
        ax.set_xlabel("step")
        ax.set_title(column)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=90)
