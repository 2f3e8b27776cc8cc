"""The validation grids of training: fixed val-split reports that together show as many findings as possible
(:func:`validation_rows`), their real images and label captions, and a grid of a pipeline's images for them next to
those (:class:`SampleGrids`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from diffcxr_aug.data.manifest import Manifest
from diffcxr_aug.data.showcase import showcase_rows


def validation_rows(manifest: Manifest, n: int, seed: int) -> Manifest:
    """Fixed reports for the sample grids: val rows that together show as many findings as possible."""
    pool = manifest.split("val")
    if len(pool) == 0:
        pool = manifest.split("train")
    if len(pool) == 0:
        return pool
    rows = showcase_rows(pool, n=min(n, len(pool)), seed=seed)
    return pool.subset(rows)


def label_caption(row: pd.Series, labels: list[str]) -> str:
    """The positive labels of a manifest row, as one short line for a figure."""
    positive = [name for name in labels if row.get(name) == 1.0]
    return "+ " + ", ".join(positive) if positive else "(no positive label)"


class SampleGrids:
    """Fixed validation reports (with their labels, for the adapter's knowledge), their real images, and a grid of
    a pipeline's images for them.

    Args:
        manifest: the manifest the reports are drawn from (its val split, else its train split).
        n: reports a grid shows at most.
        seed: picks the reports.
        image_size: side of the real images shown next to the generated ones.
    """

    def __init__(self, manifest: Manifest, n: int, seed: int, image_size: int) -> None:
        from diffcxr_aug.data.dataset import CXRDataset
        from diffcxr_aug.generator.vae import to_uint8

        self.rows = validation_rows(manifest, n, seed)
        self.reports = self.rows.frame["report"].tolist()
        self.real = [to_uint8(s["image"][None])[0] for s in CXRDataset(self.rows, image_size, progress=False)]
        self.captions = [label_caption(row, self.rows.label_names) for _, row in self.rows.frame.iterrows()]

    def save(
        self, pipeline: Any, path: Path, steps: int, guidance: float, seed: int, title: str, knowledge: bool = False
    ) -> Path:
        """Generate an image for every report with ``pipeline`` and write the grid to ``path``.

        Args:
            pipeline: a :class:`~diffcxr_aug.generator.pipeline.DiffCXRPipeline`.
            path: the PNG written.
            steps: sampler steps.
            guidance: classifier-free guidance scale.
            seed: the noise.
            title: the figure's title.
            knowledge: pass each report's labels too (a pipeline with the DKIM adapter).
        """
        from diffcxr_aug.generator.figures import save_report_grid
        from diffcxr_aug.generator.vae import to_uint8

        labels = {"labels": self.rows.frame[self.rows.label_names]} if knowledge else {}
        # Eager under a compiled UNet: a few grids do not pay for compiling the inference graphs.
        with torch.compiler.set_stance("force_eager"):
            pipeline.set_progress_bar_config(disable=True)
            images = pipeline(
                self.reports,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed),
                output_type="pt",
                **labels,
            ).images
        return save_report_grid(
            self.reports, list(to_uint8(images)), path, real=self.real, captions=self.captions, title=title
        )
