"""``prepare``: index a dataset into the common manifest, one adapter per dataset layout."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from diffcxr_aug.data.splits import DEFAULT_FRACTIONS
from diffcxr_aug.errors import InputError
from diffcxr_aug.types import DEFAULT_IMAGE_SIZE, DEFAULT_NOISE_RATE, DEFAULT_PHANTOM_N, DatasetName

DATASETS: tuple[str, ...] = get_args(DatasetName)


def prepare_dataset(
    dataset: str,
    out: Path,
    root: Path | None = None,
    size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    n: int = DEFAULT_PHANTOM_N,
    noise_rate: float = DEFAULT_NOISE_RATE,
    build_cache: bool = True,
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    **csv_options,
) -> Path:
    """Write ``out/manifest.csv`` (plus ``rejected.csv`` and the image cache) for one dataset.

    Args:
        dataset: one of ``phantom``, ``mimic-cxr``, ``iu-xray``, ``nih-cxr14``, ``ieee8023`` (the COVID-19 image
            collection of Cohen et al.: ``metadata.csv`` and ``images/``), ``csv``.
        out: output folder.
        root: the dataset's folder in its official layout (all but phantom).
        size: image side of the cache built after indexing.
        seed: drives the phantom world and the patient-level splitter.
        n: phantom only, number of images.
        noise_rate: phantom only, expected share of noisy images.
        build_cache: build the image cache after indexing; ``False`` leaves it to the first step that reads the
            images (a benchmark that times the cache on its own, or a run whose cache is built elsewhere). The
            phantom world always builds it: its images are drawn at the cache's side, so it costs little.
        split_fractions: patient shares of train, val and test, for the phantom world and for the rows of a
            dataset without an official split.
        **csv_options: csv only: ``csv``, ``image_col``, ``label_cols``, ``report_col``, ``patient_col``,
            ``view_col``.

    Returns:
        The path of the written manifest.
    """
    out = Path(out)
    if dataset == "phantom":
        from diffcxr_aug.data.phantom import prepare_phantom

        return prepare_phantom(out, n=n, size=size, seed=seed, noise_rate=noise_rate, split_fractions=split_fractions)
    if root is None:
        raise InputError(f"prepare {dataset} needs root (the dataset folder)")
    if dataset == "mimic-cxr":
        from diffcxr_aug.data.adapters.mimic import prepare_mimic

        return prepare_mimic(root, out, size=size, seed=seed, build_cache=build_cache, split_fractions=split_fractions)
    if dataset == "iu-xray":
        from diffcxr_aug.data.adapters.iu_xray import prepare_iu_xray

        return prepare_iu_xray(
            root, out, size=size, seed=seed, build_cache=build_cache, split_fractions=split_fractions
        )
    if dataset == "nih-cxr14":
        from diffcxr_aug.data.adapters.nih import prepare_nih

        return prepare_nih(root, out, size=size, seed=seed, build_cache=build_cache, split_fractions=split_fractions)
    if dataset == "ieee8023":
        from diffcxr_aug.data.adapters.ieee8023 import prepare_ieee8023

        return prepare_ieee8023(
            root, out, size=size, seed=seed, build_cache=build_cache, split_fractions=split_fractions
        )
    if dataset == "csv":
        from diffcxr_aug.data.adapters.csv_folder import prepare_csv

        return prepare_csv(
            root, out, size=size, seed=seed, build_cache=build_cache, split_fractions=split_fractions, **csv_options
        )
    raise InputError(f"Unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
