"""Montages of phantom (or any manifest's) images with their reports and labels, for people to judge."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from diffcxr_aug.data.images import load_image
from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.manifest import Manifest, read_manifest
from diffcxr_aug.data.showcase import showcase_rows
from diffcxr_aug.figures import pyplot, save_figure, show_image, wrap_report


def _label_line(row, labels: list[str]) -> str:
    pos = [c for c in labels if row[c] == 1.0]
    unc = [c for c in labels if row[c] == -1.0]
    parts = []
    if pos:
        parts.append("+ " + ", ".join(pos))
    if unc:
        parts.append("? " + ", ".join(unc))
    return "  ".join(parts) if parts else "(no labels)"


def draw_montage(
    manifest: Manifest | str | os.PathLike,
    out_png: str | os.PathLike,
    rows: list[int] | None = None,
    n: int = 12,
    cols: int = 4,
    wrap: int = 58,
    max_lines: int = 11,
    title: str | None = None,
    dpi: int = 80,
) -> Path:
    """Draw images with their (wrapped) report text and labels into one PNG.

    Args:
        manifest: a manifest or the folder/file holding one.
        out_png: output path.
        rows: row indices to show; defaults to :func:`showcase_rows`.
        n: number of images when ``rows`` is not given.
        cols: images per line.
        wrap: characters per text line.
        max_lines: report lines shown per image (longer reports are cut with an ellipsis).
        title: figure title.
        dpi: output resolution.

    Returns:
        The written path.
    """
    plt = pyplot()
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    rows = list(rows) if rows is not None else showcase_rows(manifest, n)
    frame = manifest.frame
    labels = [c for c in CHEXPERT_LABELS if c in frame.columns]
    paths = manifest.image_paths()
    lines = (len(rows) + cols - 1) // cols
    height = lines * (3.9 + 0.115 * max_lines) + (0.5 if title else 0.1)
    fig = plt.figure(figsize=(cols * 3.6, height))
    ratios = [3.4, 0.11 * max_lines + 0.1] * lines
    top = 1.0 - (0.5 if title else 0.1) / height
    grid = fig.add_gridspec(lines * 2, cols, height_ratios=ratios, hspace=0.12, wspace=0.06, top=top, bottom=0.01)
    for k, i in enumerate(rows):
        r, c = divmod(k, cols)
        row = frame.loc[i]
        ax = fig.add_subplot(grid[2 * r, c])
        show_image(ax, load_image(paths[frame.index.get_loc(i)]), interpolation="lanczos")
        ax.set_anchor("S")  # sit on the report text below, whatever the cell's aspect
        noise = str(row.get("noise", "") or "")
        head = f"{row['view']}" + (f"   noise: {noise}" if noise else "")
        label_text = "\n".join(textwrap.wrap(_label_line(row, labels), wrap - 8))
        ax.set_title(head + "\n" + label_text, fontsize=7, color="crimson" if noise else "navy", pad=2, loc="left")
        tx = fig.add_subplot(grid[2 * r + 1, c])
        tx.axis("off")
        wrapped = wrap_report(row["report"], wrap, max_lines)
        tx.text(0.0, 1.0, "\n".join(wrapped), fontsize=6.3, va="top", ha="left", family="DejaVu Sans")
    if title:
        fig.suptitle(title, fontsize=11, y=1.0 - 0.1 / height)
    return save_figure(fig, out_png, dpi=dpi, bbox_inches="tight")
