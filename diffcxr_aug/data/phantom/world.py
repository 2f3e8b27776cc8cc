"""``prepare phantom``: write a phantom CXR world as a dataset in the common manifest format."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from diffcxr_aug.data.cache import open_cache
from diffcxr_aug.data.images import save_png
from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.manifest import read_manifest, write_manifest, write_rejected
from diffcxr_aug.data.phantom import noise as noise_mod
from diffcxr_aug.data.phantom.findings import StudyTruth, sample_world
from diffcxr_aug.data.phantom.pathology import cardiothoracic_ratio
from diffcxr_aug.data.phantom.render import render_frontal, resample
from diffcxr_aug.data.phantom.reports import write_report
from diffcxr_aug.data.splits import DEFAULT_FRACTIONS, assign_patient_splits
from diffcxr_aug.errors import InputError
from diffcxr_aug.types import DEFAULT_IMAGE_SIZE, DEFAULT_PHANTOM_N

logger = logging.getLogger(__name__)

MIN_SIZE, MAX_SIZE = 32, 1024
IMAGE_DIR = "images"

# Stream ids for the per-image random generators: seeding each image from (seed, stream, index) keeps
# results independent of the order and the number of processes images are drawn in.
_RENDER_STREAM, _REPORT_STREAM = 3, 4


def render_study(truth: StudyTruth, size: int, seed: int) -> np.ndarray:
    """The image of one study as ``size`` x ``size`` uint8, drawn at twice the size and downsampled."""
    rng = np.random.default_rng([seed, _RENDER_STREAM, truth.index])
    res = 2 * size
    if truth.noise == "not_cxr":
        img = noise_mod.render_not_cxr(res, rng)
    elif truth.noise == "lateral":
        img = noise_mod.render_lateral(truth, res, rng)
    else:
        img = render_frontal(truth, res, rng)
        if rng.random() < 0.4:
            img = noise_mod.side_marker(img, rng)
        if truth.noise:
            img = noise_mod.corrupt(img, truth.noise, rng)
    return resample(img, size)


def _render_and_save(job: tuple[StudyTruth, int, int, str]) -> None:
    truth, size, seed, path = job
    save_png(render_study(truth, size, seed), path)


def _check_args(n: int, size: int, noise_rate: float, split_fractions) -> None:
    if n < 1:
        raise InputError(f"n must be at least 1, got {n}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise InputError(
            f"size must be between {MIN_SIZE} and {MAX_SIZE} px (64 to 512 is the designed range), got {size}"
        )
    if not 0.0 <= noise_rate <= 1.0:
        raise InputError(f"noise_rate must be in [0, 1], got {noise_rate}")
    if len(split_fractions) != 3 or any(f < 0 for f in split_fractions) or abs(sum(split_fractions) - 1) > 1e-6:
        raise InputError(f"split_fractions must be three non-negative numbers summing to 1, got {split_fractions}")


def phantom_rows(truths: list[StudyTruth], seed: int) -> list[dict]:
    """Manifest rows (without split) for the given studies: paths, ids, view, report, labels, noise, metadata."""
    rows = []
    for truth in truths:
        report = write_report(truth, np.random.default_rng([seed, _REPORT_STREAM, truth.index]))
        row = {
            "image_path": f"{IMAGE_DIR}/{truth.study_id}.png",
            "patient_id": truth.patient_id,
            "study_id": truth.study_id,
            "view": truth.view,
            "report": report.text,
        }
        row.update({label: report.labels[label] for label in CHEXPERT_LABELS})
        row["noise"] = truth.noise
        row["meta_age"] = str(truth.age)
        row["meta_sex"] = truth.sex
        row["meta_study_index"] = str(truth.study_index)
        row["meta_findings"] = truth.describe()
        row["meta_ctr"] = f"{cardiothoracic_ratio(truth):.3f}" if truth.view != "LATERAL" else ""
        rows.append(row)
    return rows


def prepare_phantom(
    out: Path,
    n: int = DEFAULT_PHANTOM_N,
    size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    noise_rate: float = 0.05,
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    progress: bool = True,
    workers: int | None = None,
) -> Path:
    """Generate ``n`` phantom chest radiographs with reports, labels, noise truth and patient-level splits.

    The world is deterministic: the same ``(n, size, seed, noise_rate, split_fractions)`` gives byte-identical
    images and manifest, whatever the number of worker processes. Patient ids carry the seed
    (``phantom-s{seed}-p{i:05d}``), so worlds drawn with different seeds never share a patient.

    Args:
        out: output folder; receives ``images/``, ``manifest.csv``, ``rejected.csv`` (empty: nothing is
            rejected) and the image cache at ``size``.
        n: number of images (one frontal image per study; patients have one to five studies).
        size: image side in pixels (64 to 512 is the designed range).
        seed: the world's seed.
        noise_rate: expected share of noisy images (see :mod:`noise`); 0 gives a clean set.
        split_fractions: patient shares for train, val and test; ``(1, 0, 0)`` puts everything in train.
        progress: show progress bars.
        workers: processes drawing images; defaults to up to 2 (the images do not depend on it).

    Returns:
        The path of the written manifest.
    """
    _check_args(n, size, noise_rate, split_fractions)
    out = Path(out)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    truths = sample_world(n, seed=seed, noise_rate=noise_rate)
    frame = pd.DataFrame(phantom_rows(truths, seed))
    frame.insert(4, "split", assign_patient_splits(frame["patient_id"], tuple(split_fractions), seed=seed))

    # Workers need only the study itself; the prior study is for the report writer.
    jobs = [
        (dataclasses.replace(t, prior=None), size, seed, str(out / IMAGE_DIR / f"{t.study_id}.png")) for t in truths
    ]
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    bar = dict(total=len(jobs), desc=f"drawing phantom CXRs ({size}px)", unit="img", disable=not progress)
    if workers > 1 and len(jobs) >= 64:
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            for _ in tqdm(pool.imap_unordered(_render_and_save, jobs, chunksize=16), **bar):
                pass
    else:
        for job in tqdm(jobs, **bar):
            _render_and_save(job)

    path = write_manifest(frame, out / "manifest.csv")
    write_rejected([], out / "rejected.csv")
    noisy = int((frame["noise"] != "").sum())
    logger.info("Phantom world: %d images, %d patients, %d noisy, at %s", n, frame["patient_id"].nunique(), noisy, out)
    open_cache(read_manifest(out), size, progress=progress)
    return path
