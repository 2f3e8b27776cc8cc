"""Montages of phantom (or any manifest's) images with their reports and labels, for people to judge."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np

from diffcxr_aug.data.images import load_image
from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.manifest import Manifest, read_manifest
from diffcxr_aug.io import atomic_path


def _severities(frame, index) -> float:
    """Highest finding severity of a phantom row (from ``meta_findings``), 0 for other manifests."""
    text = str(frame.at[index, "meta_findings"]) if "meta_findings" in frame.columns else ""
    values = [float(item.split(":")[1]) for item in text.split(";") if item.count(":") >= 1]
    return max(values, default=0.0)


def showcase_rows(manifest: Manifest, n: int = 12, seed: int = 0) -> list[int]:
    """Pick ``n`` clean frontal rows that together show every label positive at least once where possible.

    Greedy: first a normal study without devices, then each pick is a row adding labels not yet shown,
    preferring rows with few findings (each easy to see) and of at least moderate severity (0.7, where
    the phantom's ``meta_findings`` says), chosen at random among equals.
    """
    frame = manifest.frame
    clean = frame[(frame.get("noise", "") == "") & (frame["view"] != "LATERAL")]
    rng = np.random.default_rng(seed)
    labels = [c for c in CHEXPERT_LABELS if c in frame.columns and c != "No Finding"]
    positive = {i: {c for c in labels if clean.at[i, c] == 1.0} for i in clean.index}
    picked: list[int] = []
    shown: set[str] = set()
    normal = (
        [i for i in clean.index if clean.at[i, "No Finding"] == 1.0 and not positive[i]]
        if "No Finding" in clean
        else []
    )
    if normal:
        picked.append(int(rng.choice(normal)))
    while len(picked) < min(n, len(clean)):
        order = rng.permutation(list(positive))

        def score(i, shown=frozenset(shown)):
            new = positive[i] - shown
            # Any severity from 0.7 up counts the same (ties go to the random order): clear, not all florid.
            return (len(new) > 0, -len(positive[i]) if new else 0, min(_severities(clean, i), 0.7) if new else 0.0)

        best = max((i for i in order if i not in picked), key=score)
        picked.append(int(best))
        shown |= positive[best]
    return picked


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        ax.imshow(load_image(paths[frame.index.get_loc(i)]), cmap="gray", vmin=0.0, vmax=1.0, interpolation="lanczos")
        ax.set_anchor("S")  # sit on the report text below, whatever the cell's aspect
        ax.set_xticks([])
        ax.set_yticks([])
        noise = str(row.get("noise", "") or "")
        head = f"{row['view']}" + (f"   noise: {noise}" if noise else "")
        label_text = "\n".join(textwrap.wrap(_label_line(row, labels), wrap - 8))
        ax.set_title(head + "\n" + label_text, fontsize=7, color="crimson" if noise else "navy", pad=2, loc="left")
        tx = fig.add_subplot(grid[2 * r + 1, c])
        tx.axis("off")
        report = " ".join(str(row["report"]).split())
        wrapped = textwrap.wrap(report, wrap)
        if len(wrapped) > max_lines:
            wrapped = wrapped[: max_lines - 1] + [wrapped[max_lines - 1][: wrap - 3] + "..."]
        tx.text(0.0, 1.0, "\n".join(wrapped), fontsize=6.3, va="top", ha="left", family="DejaVu Sans")
    if title:
        fig.suptitle(title, fontsize=11, y=1.0 - 0.1 / height)
    out_png = Path(out_png)
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return out_png
