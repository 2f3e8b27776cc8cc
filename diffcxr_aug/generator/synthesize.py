"""``synthesize``: labelled chest radiographs from a trained :class:`DiffCXRPipeline`, resumably.

Image ``i`` of a job is fully determined by the job (pipeline, prompt source, steps, guidance, seed) and
``i`` alone: its prompt row is position ``i`` of a seeded stream of permutations of the prompt
manifest's train rows, and its initial noise comes from its own seed (the ``seed`` column). So a job can
grow (``--n 4`` then ``--n 6`` makes only images 4 and 5) and an interrupted run, started again, makes
only the missing images. Images are written atomically, one PNG each; the manifest and the preview grid
are written at the end.

The output is a manifest in the contract schema: labels copied from the prompt's row, split ``train``,
``patient_id``/``study_id`` ``synthetic-<i>``, the view of the prompt's row, plus ``prompt`` (the report
the image was generated from), ``seed`` and ``meta_prompt_image`` (the real image whose report it is).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from diffcxr_aug.config import SynthesizeSection
from diffcxr_aug.data.manifest import MANIFEST_NAME, Manifest, read_manifest, write_manifest
from diffcxr_aug.errors import InputError, MissingInputError
from diffcxr_aug.io import atomic_write_json

logger = logging.getLogger(__name__)

JOB_NAME = "synthesis.json"
IMAGE_DIR = "images"
PREVIEW_NAME = "preview.png"
# Job settings that fix every image; changing one of them in an existing folder is refused.
JOB_KEYS = ("generator", "prompts", "steps", "guidance", "seed")


def image_name(index: int) -> str:
    return f"{IMAGE_DIR}/{index:06d}.png"


def image_seed(seed: int, index: int) -> int:
    """The torch seed of image ``index``'s initial noise (a 32-bit integer derived from the job seed)."""
    return int(np.random.SeedSequence([seed, 4, index]).generate_state(1)[0])


def prompt_rows(n_prompts: int, n: int, seed: int) -> np.ndarray:
    """Row positions (into the prompt pool) of images ``0..n-1``: consecutive seeded permutations, so every
    prompt is used once before any is used twice, and image ``i``'s prompt does not depend on ``n``."""
    epochs = (n + n_prompts - 1) // n_prompts
    return np.concatenate([np.random.default_rng([seed, 3, e]).permutation(n_prompts) for e in range(epochs)])[:n]


def _prompt_source(generator: Path, prompts: Path | None) -> Path:
    if prompts is not None:
        return Path(prompts)
    info_path = generator / "training_info.json"
    if info_path.is_file():
        data = json.loads(info_path.read_text()).get("data")
        if data:
            return Path(data)
    raise InputError(
        f"{generator} records no training manifest (no training_info.json with 'data'); pass --prompts with a "
        "manifest folder or CSV whose train-split reports and labels to draw"
    )


def _prompt_pool(source: Path) -> Manifest:
    manifest = read_manifest(source)
    pool = manifest.split("train")
    if len(pool) == 0:
        pool = manifest
    empty = pool.frame["report"].str.strip() == ""
    if empty.any():
        logger.info("%s: %d prompt rows have an empty report and are not used as prompts", source, int(empty.sum()))
        pool = pool.subset(pool.frame.index[~empty.to_numpy()])
    if len(pool) == 0:
        raise InputError(f"{manifest.source}: no row with a non-empty report to use as a prompt")
    return pool


def _check_job(out: Path, job: dict[str, Any]) -> None:
    path = out / JOB_NAME
    if not path.is_file():
        return
    previous = json.loads(path.read_text())
    changed = {k: (previous.get(k), job[k]) for k in JOB_KEYS if previous.get(k) != job[k]}
    if changed:
        details = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise InputError(
            f"{out} holds images of another synthesis job ({details}). Rerun with the same settings to finish or "
            "grow it, or choose a new --out"
        )


def synthesize(
    generator: str | os.PathLike,
    out: str | os.PathLike,
    section: SynthesizeSection,
    device: str = "auto",
    seed: int = 0,
) -> Path:
    """Generate ``section.n`` labelled images with the pipeline in ``generator`` into ``out``.

    Args:
        generator: a pipeline folder written by ``train-generator``.
        out: output folder: ``manifest.csv``, ``images/``, ``preview.png``, ``synthesis.json`` (the job).
        section: ``n``, ``steps``, ``guidance``, ``batch_size`` and ``prompts`` (a manifest folder or CSV whose
            train-split reports and labels are drawn; default: the manifest the generator was trained on).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        seed: the job seed (prompt order and every image's noise).

    Returns:
        The path of the written manifest.
    """
    from diffcxr_aug.data.images import save_png
    from diffcxr_aug.runtime import resolve_device

    generator, out = Path(generator), Path(out)
    if not (generator / "model_index.json").is_file():
        raise MissingInputError(
            f"{generator} is not a trained pipeline folder (no model_index.json); pass the --out of train-generator"
        )
    source = _prompt_source(generator, section.prompts)
    pool = _prompt_pool(source)
    job = {
        "generator": str(generator.resolve()),
        "prompts": str(Path(pool.source).resolve()),
        "steps": section.steps,
        "guidance": section.guidance,
        "seed": seed,
    }
    _check_job(out, job)
    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / JOB_NAME).read_text()) if (out / JOB_NAME).is_file() else {}
    # Sampling time accumulates over resumed invocations; images_per_second is over the images timed.
    # A rerun with nothing to make keeps them as they were.
    timing = {k: previous[k] for k in ("seconds", "images_timed", "images_per_second", "device") if k in previous}
    atomic_write_json(out / JOB_NAME, {**job, "n": section.n, **timing})

    n = section.n
    rows = prompt_rows(len(pool), n, seed)
    seeds = [image_seed(seed, i) for i in range(n)]
    frame = pool.frame
    reports = frame["report"].tolist()
    missing = [i for i in range(n) if not (out / image_name(i)).is_file()]
    extra = sorted(out.glob(f"{IMAGE_DIR}/*.png"))[n:] if (out / IMAGE_DIR).is_dir() else []
    if extra:
        logger.warning("%s: %d images beyond --n %d are left on disk and not in the manifest", out, len(extra), n)
    logger.info("%s: %d of %d images to generate", out, len(missing), n)

    if missing:
        from diffcxr_aug.generator.pipeline import DiffCXRPipeline

        pipe = DiffCXRPipeline.from_pretrained(generator).to(dev)
        pipe.set_progress_bar_config(disable=True)
        batches = [missing[i : i + section.batch_size] for i in range(0, len(missing), section.batch_size)]
        started = time.perf_counter()
        with tqdm(total=len(missing), desc="synthesizing", unit="img") as bar:
            for batch in batches:
                images = pipe(
                    [reports[rows[i]] for i in batch],
                    num_inference_steps=section.steps,
                    guidance_scale=section.guidance,
                    generator=[torch.Generator().manual_seed(seeds[i]) for i in batch],
                    output_type="np",
                ).images
                for i, image in zip(batch, images, strict=True):
                    save_png(image[..., 0], out / image_name(i))
                bar.update(len(batch))
                timing["seconds"] = timing.get("seconds", 0.0) + time.perf_counter() - started
                timing["images_timed"] = timing.get("images_timed", 0) + len(batch)
                started = time.perf_counter()
                timing["images_per_second"] = timing["images_timed"] / max(timing["seconds"], 1e-9)
                timing["device"] = str(dev)
                atomic_write_json(out / JOB_NAME, {**job, "n": section.n, **timing})

    manifest_path = write_manifest(_synthetic_frame(pool, rows, seeds), out / MANIFEST_NAME)
    _preview(pool, rows, seeds, out)
    logger.info("Synthetic manifest with %d images: %s", n, manifest_path)
    return manifest_path


def _synthetic_frame(pool: Manifest, rows: np.ndarray, seeds: list[int]) -> pd.DataFrame:
    frame = pool.frame
    labels = pool.label_names
    source_paths = frame["image_path"].tolist()
    records = []
    for i, (row, image_seed_) in enumerate(zip(rows, seeds, strict=True)):
        prompt = frame.iloc[row]
        record = {
            "image_path": image_name(i),
            "patient_id": f"synthetic-{i}",
            "study_id": f"synthetic-{i}",
            "view": prompt["view"],
            "split": "train",
            "report": prompt["report"],
        }
        record.update({name: prompt[name] for name in labels})
        record.update({"prompt": prompt["report"], "seed": str(image_seed_), "meta_prompt_image": source_paths[row]})
        records.append(record)
    return pd.DataFrame(records)


def _preview(pool: Manifest, rows: np.ndarray, seeds: list[int], out: Path, count: int = 8) -> Path:
    """The first images next to their reports and the real images those reports belong to."""
    from diffcxr_aug.data.images import load_image
    from diffcxr_aug.generator.figures import save_report_grid

    shown = range(min(count, len(rows)))
    frame = pool.frame
    paths = pool.image_paths()
    labels = pool.label_names
    generated = [load_image(out / image_name(i)) for i in shown]
    real = [load_image(paths[rows[i]]) for i in shown]
    captions = []
    for i in shown:
        positive = [name for name in labels if frame.iloc[rows[i]][name] == 1.0]
        captions.append(
            f"#{i} seed {seeds[i]}   " + ("+ " + ", ".join(positive) if positive else "(no positive label)")
        )
    return save_report_grid(
        [frame.iloc[rows[i]]["report"] for i in shown],
        generated,
        out / PREVIEW_NAME,
        real=real,
        captions=captions,
        title="synthetic images (right) from the reports of real images (middle)",
    )
