"""Shared test fixtures: tiny, seeded, on CPU, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread. On a busy 2-core box OpenMP threads spin-waiting on each other make them
    5-10x slower than they compute (modules that train models use it with ``pytest.mark.usefixtures``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fixtures_dir() -> Path:
    """``tests/fixtures/``: real CXR files and hand-labelled reports, with their licences (see its README)."""
    return FIXTURES


@pytest.fixture
def recipes_dir() -> Path:
    return REPO_ROOT / "recipes"


def make_tiny_manifest(folder: Path, n: int = 24, size: int = 32, seed: int = 0) -> Path:
    """A small manifest of learnable toy images (a bright disc for Cardiomegaly), 3 images per patient.

    For tests that need a manifest before (or without) the phantom world; real consumers use the phantom.
    """
    import numpy as np
    import pandas as pd

    from diffcxr_aug.data.images import save_png
    from diffcxr_aug.data.labels import CHEXPERT_LABELS
    from diffcxr_aug.data.manifest import write_manifest

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        radius = 0.3 if positive else 0.15
        img = 0.2 + 0.1 * rng.random((size, size))
        img[(yy - 0.55) ** 2 + (xx - 0.5) ** 2 < radius**2] = 0.8
        save_png(img, folder / "images" / f"{i:04d}.png")
        patient = i // 3
        split = ("train", "train", "val", "test")[patient % 4]
        row = {
            "image_path": f"images/{i:04d}.png",
            "patient_id": f"tiny-p{patient}",
            "study_id": f"tiny-s{i}",
            "view": "PA",
            "split": split,
            "report": "The heart is enlarged." if positive else "Normal heart size. No pneumothorax.",
        }
        row.update({name: "" for name in CHEXPERT_LABELS})
        row["Cardiomegaly"] = "1" if positive else "0"
        row["Pneumothorax"] = "0"
        rows.append(row)
    return write_manifest(pd.DataFrame(rows), folder)


@pytest.fixture
def tiny_manifest(tmp_path) -> Path:
    return make_tiny_manifest(tmp_path / "tiny")
