"""Shared test fixtures: tiny, seeded, on CPU, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture
def shared_dir() -> Path:
    """The ``shared/`` folder beside the checkout (real CXR fixtures, CheXpert phrases, label statistics)."""
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: the tests need the shared/ folder beside the repository")
    return SHARED


@pytest.fixture
def recipes_dir() -> Path:
    return REPO_ROOT / "recipes"
