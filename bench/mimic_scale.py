"""Time, peak memory and disk of every data step at MIMIC-CXR scale, on a simulated MIMIC-CXR-JPG of N films.

    python bench/mimic_scale.py --n 10000 --out DIR [--side 1024] [--pool 24] [--cache-size 256]
                                [--cache-workers 1 2] [--workers W] [--vae kl-f8] [--generator-steps 20]
                                [--synthesize-n 1000] [--synthesize-steps 4] [--steps layout prepare ...]

1. ``layout``: writes ``DIR/mimic-cxr-jpg/`` in the official MIMIC-CXR-JPG 2.0.0 layout: ``files/pXX/pSUBJECT/
   sSTUDY/DICOM_ID.jpg`` (portrait films, ``--side`` px wide and 1.2 times as tall), the ``sSTUDY.txt`` reports
   beside the study folders, and ``mimic-cxr-2.0.0-metadata.csv.gz``, ``-chexpert.csv.gz`` and ``-split.csv.gz``
   (gzipped, as PhysioNet ships them). A pool of ``--pool`` phantom studies (``diffcxr_aug.data.phantom``) is
   rendered once; every film is a varied copy of its study's pool film (shifted, another gamma and brightness),
   written as JPEG by worker processes. Three studies a patient, two films a study; splits by patient, 90 / 5 / 5 %.
   One film is planted with a corrupt header and one truncated.
2. ``prepare``: ``prepare mimic-cxr`` (:func:`~diffcxr_aug.data.adapters.mimic.prepare_mimic`, ``--workers``
   decoding threads) into ``DIR/prepared/``, without its closing cache build (timed next, as its own step).
3. ``cache-wK``: the ``--cache-size`` px image cache built from scratch with K worker processes, for each K of
   ``--cache-workers`` (the last one stays for the steps below). Each build first evicts the films from the page
   cache (``posix_fadvise``), so every K reads them from disk as a first build does (``--warm-page-cache``: not).
4. ``latent-store``: :func:`~diffcxr_aug.generator.latent_store.open_latent_store` of the whole manifest with an
   untrained ``--vae`` from the registry (``kl-f8``: 256 px -> 4 x 32 x 32, the SD geometry at a small width;
   seeded, saved to ``DIR/vae``). Untrained is enough: what is measured is the data path, and a VAE of this
   architecture costs the same trained or not. ``latent-store-again``: the same call again (it must encode 0).
5. ``lnfs``: :class:`~diffcxr_aug.generator.noise_filter.LatentNoiseFilter` (the recipe defaults) fitted on the
   stored latents.
6. ``generator``: ``train_generator`` with the ``tiny`` config for ``--generator-steps`` steps: its data setup (its
   own 2-step VAE, the 32 px cache, the manifest's latent store for that VAE, the text states) and the steps; it
   reads each batch's latents from the store, and records how many images it encoded into it (a rerun: 0).
7. ``synthesize``: ``--synthesize-n`` images from that generator (``--synthesize-steps`` sampler steps), prompts
   from the training manifest.
8. ``classifier-loading``: one epoch of a classifier's data loading (``CXRDataset`` over the train split at
   ``--cache-size`` px, shuffled batches of 32, ``--loader-workers``), no model.

Each step runs in a fresh process (``--in-process``: in this one, for a smoke test), so its peak memory is its
own. Per step: seconds of the step's work (imports excluded), seconds per 1,000 films, peak RSS (``getrusage`` of
the step's process and of its reaped worker processes, the largest; memory-mapped pages count in it, and a worker's
counts the pages it shared with the step's process when it was started), peak
anonymous memory (RSS less file-backed and shared pages, sampled every 0.2 s over the process and its
descendants, summed: the memory beyond the memory maps), and the disk written (``DIR``'s allocated size after
minus before). Prints a table and writes ``DIR/mimic_scale.json`` and ``DIR/mimic_scale.md``; then checks that
both planted films are in ``prepared/rejected.csv`` by name (exit status 1 if not). ``--steps`` reruns some steps:
their rows replace those of an earlier record of the same N, the others are kept, each row with when it ran.

The films are smaller than MIMIC's (about 2,500 x 3,000 px): decoding cost grows with the pixels, so the cache
step's time per film at ``--side 1024`` is a lower bound for the real JPEGs (``--side 2560`` writes films of the
real size, upsampled from the rendered pool, at about 1 MB each).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import multiprocessing
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the package is the repository's
    sys.path.insert(0, str(REPO))

LAYOUT_DIR, PREPARED_DIR = "mimic-cxr-jpg", "prepared"
LAYOUT_RECORD = "bench_layout.json"
# The folders a step writes from scratch: removed before it runs (and before the disk is measured).
STEP_OUTPUTS = {"prepare": PREPARED_DIR, "generator": "generator", "synthesize": "synthetic"}
FILMS_PER_STUDY, STUDIES_PER_SUBJECT = 2, 3
ASPECT = 1.2  # MIMIC films are portrait, about 3,056 x 2,544 px
SPLITS = (("train", 0.9), ("validate", 0.95), ("test", 1.0))  # cumulative shares of the patients
STEPS = (
    "layout",
    "prepare",
    "cache",
    "latent-store",
    "latent-store-again",
    "lnfs",
    "generator",
    "synthesize",
    "classifier-loading",
)


# ------------------------------------------------------------------------------------------------------ layout
def film_ids(i: int, seed: int) -> tuple[str, str, str]:
    """``(subject_id, study_id, dicom_id)`` of film ``i``: eight-digit ids spread over p10..p19 as MIMIC's are (a
    multiplication by a number prime to 10^7 is a bijection, so no two patients or studies share an id)."""
    study = i // FILMS_PER_STUDY
    subject = study // STUDIES_PER_SUBJECT
    subject_id = str(10_000_000 + (subject * 7919 + seed) % 10_000_000)
    study_id = str(50_000_000 + (study * 7919 + seed) % 10_000_000)
    digest = hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()
    return subject_id, study_id, "-".join(digest[k : k + 8] for k in range(0, 40, 8))


def film_path(root: Path, subject_id: str, study_id: str, dicom_id: str) -> Path:
    return root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}" / f"s{study_id}" / f"{dicom_id}.jpg"


def pool_index(i: int, seed: int, pool: int) -> int:
    """The pool study film ``i``'s study copies (every film of a study copies the same one)."""
    return int(np.random.default_rng([seed, 1, i // FILMS_PER_STUDY]).integers(pool))


def _render_pool_film(job: tuple[Any, int, int, int]) -> np.ndarray:
    from PIL import Image

    from diffcxr_aug.data.phantom import render_study

    truth, render_side, side, seed = job
    film = render_study(truth, render_side, seed)
    if render_side != side:
        film = np.asarray(Image.fromarray(film).resize((side, side), Image.Resampling.BICUBIC))
    return film


def _write_films(job: tuple[str, str, int, int, list[int]]) -> int:
    """Worker: films ``indices`` as varied copies of their pool films (a shift in a portrait frame, gamma and
    brightness), JPEG quality 90."""
    from PIL import Image

    root, pool_file, seed, pool, indices = job
    films = np.load(pool_file, mmap_mode="r")
    side = films.shape[1]
    height = round(ASPECT * side)
    for i in indices:
        rng = np.random.default_rng([seed, 2, i])
        gamma, gain = rng.uniform(0.8, 1.25), rng.uniform(0.9, 1.1)
        lut = np.clip(255.0 * gain * (np.arange(256) / 255.0) ** gamma, 0, 255).astype(np.uint8)
        frame = np.full((height, side), int(rng.integers(0, 12)), dtype=np.uint8)
        top = int(rng.integers(0, height - side + 1))
        dx = int(rng.integers(-side // 40, side // 40 + 1))
        copy = np.roll(np.asarray(films[pool_index(i, seed, pool)]), dx, axis=1)
        frame[top : top + side] = lut[copy]
        target = film_path(Path(root), *film_ids(i, seed))
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(target, format="JPEG", quality=90)
    return len(indices)


def _chexpert_cell(value: float) -> str:
    return "" if np.isnan(value) else f"{value:.1f}"


def write_layout(
    root: Path,
    n: int,
    side: int = 1024,
    pool: int = 24,
    render_side: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    pool_file: Path | None = None,
) -> dict[str, Any]:
    """Write ``n`` films in the MIMIC-CXR-JPG layout under ``root`` (see the module docstring); returns the planted
    bad films' names and the layout's size. ``render_side``: the side the pool is rendered at (then resized to
    ``side``); default ``min(side, 1024)``."""
    from diffcxr_aug.data.labels import CHEXPERT_LABELS
    from diffcxr_aug.data.phantom import sample_world, write_report

    if n < 3:
        raise ValueError(f"n must be at least 3 (two films are planted bad), got {n}")
    render_side = render_side or min(side, 1024)
    workers = workers or os.cpu_count() or 1
    root.mkdir(parents=True, exist_ok=True)
    truths = sample_world(pool, seed=seed)
    pool_file = pool_file or root.parent / "pool.npy"
    chunk = max(16, min(512, n // (8 * workers) or 1))
    jobs = [(str(root), str(pool_file), seed, pool, list(range(a, min(a + chunk, n)))) for a in range(0, n, chunk)]
    with multiprocessing.get_context("spawn").Pool(workers) as processes:
        films = processes.map(_render_pool_film, [(t, render_side, side, seed) for t in truths])
        np.save(pool_file, np.stack(films))
        for _ in processes.imap_unordered(_write_films, jobs):
            pass

    reports = [write_report(t, np.random.default_rng([seed, 3, t.index])) for t in truths]
    meta, split, labels = [], [], {}
    height = round(ASPECT * side)
    for i in range(n):
        subject_id, study_id, dicom_id = film_ids(i, seed)
        truth = truths[pool_index(i, seed, pool)]
        meta.append(
            {
                "dicom_id": dicom_id,
                "subject_id": subject_id,
                "study_id": study_id,
                "PerformedProcedureStepDescription": f"CHEST ({truth.view})",
                "ViewPosition": truth.view,
                "Rows": height,
                "Columns": side,
                "StudyDate": str(21000101 + (i // FILMS_PER_STUDY) % 28),
                "StudyTime": "120000.000",
            }
        )
        share = np.random.default_rng([seed, 4, int(subject_id)]).random()
        split.append(
            {
                "dicom_id": dicom_id,
                "study_id": study_id,
                "subject_id": subject_id,
                "split": next(name for name, upper in SPLITS if share < upper),
            }
        )
        if (subject_id, study_id) not in labels:
            report = reports[pool_index(i, seed, pool)]
            labels[(subject_id, study_id)] = {
                "subject_id": subject_id,
                "study_id": study_id,
                **{name: _chexpert_cell(report.labels[name]) for name in CHEXPERT_LABELS},
            }
            text = "                                 FINAL REPORT\n " + report.text.replace("\n", "\n ")
            folder = root / "files" / f"p{subject_id[:2]}" / f"p{subject_id}"
            (folder / f"s{study_id}.txt").write_text(text + "\n", encoding="utf-8")
    for name, rows in (("metadata", meta), ("split", split), ("chexpert", list(labels.values()))):
        with gzip.open(root / f"mimic-cxr-2.0.0-{name}.csv.gz", "wt", encoding="utf-8") as f:
            pd.DataFrame(rows).to_csv(f, index=False)
    return {"planted": plant_bad_films(root, n, seed), "studies": len(labels), "side": side, "height": height}


def plant_bad_films(root: Path, n: int, seed: int) -> dict[str, str]:
    """Spoil two films: a third of the way in, its header overwritten (a corrupt file: nothing decodes it); two
    thirds in, its second half cut off (a truncated download). Returns ``{kind: file name}``."""
    corrupt = film_path(root, *film_ids(n // 3, seed))
    data = bytearray(corrupt.read_bytes())
    data[2:514] = np.random.default_rng([seed, 5]).integers(0, 256, 512, dtype=np.uint8).tobytes()
    corrupt.write_bytes(bytes(data))
    truncated = film_path(root, *film_ids((2 * n) // 3, seed))
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    return {"corrupt": corrupt.name, "truncated": truncated.name}


# ------------------------------------------------------------------------------------------------------- steps
def _manifest(out: Path):
    from diffcxr_aug.data.manifest import read_manifest

    return read_manifest(out / PREPARED_DIR)


def step_layout(args: argparse.Namespace) -> dict[str, Any]:
    root = args.out / LAYOUT_DIR
    settings = {"n": args.n, "side": args.side, "pool": args.pool, "render_side": args.render_side, "seed": args.seed}
    record = args.out / LAYOUT_RECORD
    if record.is_file() and json.loads(record.read_text())["settings"] == settings:
        return {**json.loads(record.read_text()), "note": "reused (written by an earlier run)"}
    shutil.rmtree(root, ignore_errors=True)
    record.unlink(missing_ok=True)
    written = write_layout(root, args.n, args.side, args.pool, args.render_side, args.seed, args.workers)
    result = {"settings": settings, **written}
    record.write_text(json.dumps(result, indent=2))
    return result


def step_prepare(args: argparse.Namespace) -> dict[str, Any]:
    from diffcxr_aug.data.adapters.mimic import prepare_mimic

    out = args.out / PREPARED_DIR
    # The image cache is timed as a step of its own (cache-wK), so prepare stops before it.
    prepare_mimic(
        args.out / LAYOUT_DIR, out, size=args.cache_size, progress=False, workers=args.workers, build_cache=False
    )
    rejected = pd.read_csv(out / "rejected.csv", dtype=str, keep_default_na=False)
    return {"rows": len(_manifest(args.out)), "rejected": len(rejected)}


def step_cache(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    from diffcxr_aug.data.cache import open_cache

    images = open_cache(_manifest(args.out), args.cache_size, progress=False, workers=workers)
    return {"workers": workers, "shape": list(images.shape)}


def _vae(args: argparse.Namespace):
    from diffcxr_aug.generator.vae import build_vae, load_vae

    folder = args.out / "vae"
    if not (folder / "config.json").is_file():
        import torch

        torch.manual_seed(args.seed)
        build_vae(args.vae, sample_size=args.cache_size).save_pretrained(folder, safe_serialization=True)
    return load_vae(folder)


def _store(args: argparse.Namespace, build: bool = True):
    from diffcxr_aug.generator.latent_store import open_latent_store

    manifest = _manifest(args.out)
    settings = {"batch_size": args.store_batch_size, "device": "cpu", "build": build, "progress": False}
    return open_latent_store(manifest.full, _vae(args), args.cache_size, **settings)


def step_latent_store(args: argparse.Namespace) -> dict[str, Any]:
    store = _store(args)
    return {"encoded": store.encoded, "reused": store.reused, "shape": list(store.array.shape)}


def step_lnfs(args: argparse.Namespace) -> dict[str, Any]:
    from diffcxr_aug.generator.noise_filter import LatentNoiseFilter

    store = _store(args, build=False)
    flagged = LatentNoiseFilter(seed=args.seed, progress=False).fit(store.array).flagged_
    return {"images": len(store), "flagged": int(flagged.sum())}


class _Lines(logging.Handler):
    """The messages a logger emits while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def step_generator(args: argparse.Namespace) -> dict[str, Any]:
    from diffcxr_aug.generator.settings import GeneratorSettings
    from diffcxr_aug.generator.training import train_generator

    out = args.out / STEP_OUTPUTS["generator"]
    settings = GeneratorSettings(
        config="tiny",
        max_steps=args.generator_steps,
        batch_size=8,
        num_validation_reports=1,
        validation_steps=1,
        mixed_precision="no",
    )
    store_log, lines = logging.getLogger("diffcxr_aug.generator.latent_store"), _Lines()
    level = store_log.level
    store_log.addHandler(lines)
    store_log.setLevel(logging.INFO)
    try:
        train_generator(args.out / PREPARED_DIR, out, settings, device="cpu", seed=args.seed)
    finally:
        store_log.removeHandler(lines)
        store_log.setLevel(level)
    info = json.loads((out / "training_info.json").read_text())
    # The store's own line: "latent store PATH: encoded N of M images (K reused)".
    encoded = [
        int(m.group(1)) for m in map(re.compile(r"latent store .*: encoded (\d+) of").match, lines.messages) if m
    ]
    return {"steps": info["steps"], "train_images": info["train_images"], "latents_encoded": sum(encoded)}


def step_synthesize(args: argparse.Namespace) -> dict[str, Any]:
    from diffcxr_aug.generator.settings import SynthesisSettings
    from diffcxr_aug.generator.synthesize import synthesize

    out = args.out / STEP_OUTPUTS["synthesize"]
    settings = SynthesisSettings(n=args.synthesize_n, steps=args.synthesize_steps)
    synthesize(args.out / STEP_OUTPUTS["generator"], out, settings, device="cpu", seed=args.seed)
    return {"images": args.synthesize_n, "steps": args.synthesize_steps}


def step_classifier_loading(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from diffcxr_aug.data.dataset import CXRDataset

    train = CXRDataset(_manifest(args.out).split("train"), args.cache_size, progress=False)
    generator = torch.Generator().manual_seed(args.seed)
    sampler = RandomSampler(train, generator=generator)
    loader = DataLoader(train, batch_size=32, sampler=sampler, num_workers=args.loader_workers)
    images = sum(len(batch["image"]) for batch in loader)
    return {"images": images, "batches": len(loader), "loader_workers": args.loader_workers}


def step_functions(args: argparse.Namespace) -> dict[str, Callable[[], dict[str, Any]]]:
    """Step name -> the call that runs it (one ``cache-wK`` a worker count)."""
    functions: dict[str, Callable[[], dict[str, Any]]] = {
        "layout": lambda: step_layout(args),
        "prepare": lambda: step_prepare(args),
    }
    for workers in args.cache_workers:
        functions[f"cache-w{workers}"] = lambda workers=workers: step_cache(args, workers)
    functions.update(
        {
            "latent-store": lambda: step_latent_store(args),
            "latent-store-again": lambda: step_latent_store(args),
            "lnfs": lambda: step_lnfs(args),
            "generator": lambda: step_generator(args),
            "synthesize": lambda: step_synthesize(args),
            "classifier-loading": lambda: step_classifier_loading(args),
        }
    )
    return functions


def _clear_before(name: str, out: Path, cache_size: int, cold: bool = True) -> None:
    """A build step measures a build: remove what an earlier run of it left (the layout keeps a matching one), before
    the disk is measured. With ``cold``, a cache build first evicts the films from the page cache, so that every
    worker count reads them from disk as a first build of real films would (MIMIC-CXR-JPG's 570 GB never sit in
    memory); otherwise whichever build ran first would pay the reads for the others."""
    cache = out / PREPARED_DIR / "cache"
    if name in STEP_OUTPUTS:
        shutil.rmtree(out / STEP_OUTPUTS[name], ignore_errors=True)
    elif name.startswith("cache-w"):
        for path in cache.glob(f"images_{cache_size}_*"):
            path.unlink()
        if cold:
            evict_from_page_cache(_manifest(out).image_paths())
    elif name == "latent-store":
        for path in cache.glob("latents_*"):
            path.unlink()


def evict_from_page_cache(paths: list[Path]) -> None:
    """Drop the files' clean pages from the kernel's page cache (``posix_fadvise`` DONTNEED: no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------------- measuring
class MemorySampler(threading.Thread):
    """The largest anonymous memory (RSS less file-backed and shared pages) of this process and its descendants,
    summed, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, 0, threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop_event.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    info = process.memory_info()
                    total += info.rss - info.shared
                except psutil.Error:  # a worker that exited between listing and reading
                    pass
            self.peak = max(self.peak, total)
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


# What each step imports before it is timed (the data steps leave torch out, so their peak memory is theirs).
STEP_MODULES = {
    "latent-store": ("diffcxr_aug.generator.latent_store",),
    "latent-store-again": ("diffcxr_aug.generator.latent_store",),
    "lnfs": ("diffcxr_aug.generator.latent_store", "diffcxr_aug.generator.noise_filter"),
    "generator": ("diffcxr_aug.generator.settings", "diffcxr_aug.generator.training"),
    "synthesize": ("diffcxr_aug.generator.settings", "diffcxr_aug.generator.synthesize"),
    "classifier-loading": ("diffcxr_aug.data.dataset",),
}


def _import_libraries(step: str, threads: int | None) -> None:
    """Import what ``step`` uses before it is timed, so that its seconds are its work (diffusers, for one, imports
    its model classes on first use)."""
    import importlib

    import diffcxr_aug.data.adapters.mimic  # noqa: F401
    import diffcxr_aug.data.cache  # noqa: F401

    if step not in STEP_MODULES:
        return
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401

    for module in STEP_MODULES[step]:
        importlib.import_module(module)
    if threads:
        torch.set_num_threads(threads)


def measure(function: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one step here: its seconds, peak RSS (this process's and its reaped children's) and peak anonymous
    memory, and what it returned."""
    sampler = MemorySampler()
    sampler.start()
    started = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - started
    anonymous = sampler.stop()
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "seconds": seconds,
        "peak_rss_mib": max(own, children),
        "peak_rss_self_mib": own,
        "peak_rss_workers_mib": children,
        "peak_anon_mib": anonymous / 2**20,
        "result": result,
    }


def disk_usage(folder: Path) -> int:
    """Bytes allocated to the files under ``folder`` (a sparse file counts what it holds)."""
    total = 0
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
    return total


def _child_command(args: argparse.Namespace, name: str, record: Path) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--run-step", name, "--record", str(record)]
    for key, value in vars(args).items():
        if key in ("run_step", "record", "steps", "in_process") or value is None or value is False:
            continue
        if value is True:
            command.append(f"--{key.replace('_', '-')}")
            continue
        flag = f"--{key.replace('_', '-')}"
        command += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return command


def run_step(args: argparse.Namespace, name: str, function: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One step (in a fresh process unless ``--in-process``) with its disk written."""
    _clear_before(name, args.out, args.cache_size, cold=not args.warm_page_cache)
    before = disk_usage(args.out)
    if args.in_process:
        row = measure(function)
    else:
        record = args.out / "steps" / f"{name}.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        record.unlink(missing_ok=True)
        started = time.perf_counter()
        process = subprocess.run(_child_command(args, name, record), cwd=REPO)
        if process.returncode != 0:
            raise RuntimeError(f"step {name} failed with exit status {process.returncode}")
        row = {**json.loads(record.read_text()), "process_seconds": time.perf_counter() - started}
    row["disk_written_mib"] = (disk_usage(args.out) - before) / 2**20
    return {"step": name, **row}


def _note(name: str, result: dict[str, Any]) -> str:
    if name == "layout":
        return result.get("note", f"{result['studies']} studies")
    if name == "prepare":
        return f"{result['rows']} rows, {result['rejected']} rejected"
    if name.startswith("latent-store"):
        return f"encoded {result['encoded']}, reused {result['reused']}"
    if name == "lnfs":
        return f"{result['flagged']} of {result['images']} flagged"
    if name == "generator":
        return f"{result['steps']} steps on {result['train_images']}; {result['latents_encoded']} latents encoded"
    if name == "synthesize":
        return f"{result['images']} images, {result['steps']} sampler steps"
    if name == "classifier-loading":
        return f"{result['images']} images in {result['batches']} batches"
    return ""


def markdown_table(rows: list[dict[str, Any]], n: int) -> str:
    lines = [
        "| step | seconds | s / 1,000 films | peak RSS MiB | peak anon MiB | disk written MiB | note | measured |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['step']} | {row['seconds']:.1f} | {1000 * row['seconds'] / n:.2f} | {row['peak_rss_mib']:.0f} | "
            f"{row['peak_anon_mib']:.0f} | {row['disk_written_mib']:.1f} | {_note(row['step'], row['result'])} | "
            f"{row.get('measured_at', '')} |"
        )
    return "\n".join(lines)


def _step_rank(name: str) -> tuple[int, int]:
    """Position of a step in :data:`STEPS` (``cache-wK``: at ``cache``, by K)."""
    if name.startswith("cache-w"):
        return STEPS.index("cache"), int(name.removeprefix("cache-w"))
    return STEPS.index(name), 0


def merge_rows(earlier: dict[str, Any] | None, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with the rows of the steps they do not rerun kept from ``earlier``, a record of the same N (a rerun of
    some steps replaces just their rows; each row says when it was measured), in step order."""
    if earlier is None:
        return rows
    merged = {row["step"]: row for row in earlier["steps"]}
    merged.update({row["step"]: row for row in rows})
    return sorted(merged.values(), key=lambda row: _step_rank(row["step"]))


def check_planted(out: Path) -> dict[str, bool]:
    """Whether each planted film is in ``prepared/rejected.csv`` (by file name) and not in the manifest."""
    planted = json.loads((out / LAYOUT_RECORD).read_text())["planted"]
    rejected = {Path(p).name for p in pd.read_csv(out / PREPARED_DIR / "rejected.csv", dtype=str)["file"]}
    kept = {Path(p).name for p in _manifest(out).frame["image_path"]}
    return {kind: name in rejected and name not in kept for kind, name in planted.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, required=True, help="films")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--side", type=int, default=1024, help="film width in px (the height is 1.2 times it)")
    parser.add_argument("--render-side", type=int, default=None, help="pool render side; default min(side, 1024)")
    parser.add_argument("--pool", type=int, default=24, help="phantom studies rendered; films are copies of them")
    parser.add_argument("--cache-size", type=int, default=256)
    parser.add_argument("--cache-workers", type=int, nargs="+", default=[os.cpu_count() or 1])
    parser.add_argument("--workers", type=int, default=None, help="layout processes and prepare's threads")
    parser.add_argument("--vae", default="kl-f8", help="registered VAE architecture (untrained) of the store")
    parser.add_argument(
        "--store-batch-size", type=int, default=64, help="VAE batch of the store (its peak memory grows with it)"
    )
    parser.add_argument("--generator-steps", type=int, default=20)
    parser.add_argument("--synthesize-n", type=int, default=1000)
    parser.add_argument("--synthesize-steps", type=int, default=4)
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader workers (the classifier's default)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads a step (default torch's; 1 on a busy machine)"
    )
    parser.add_argument(
        "--warm-page-cache",
        action="store_true",
        help="do not evict the films from the page cache before each cache build (default: evict; a cold first build)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", nargs="+", default=None, help=f"a subset of {', '.join(STEPS)}")
    parser.add_argument("--in-process", action="store_true", help="run the steps in this process (smoke tests)")
    parser.add_argument("--run-step", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.steps or ()) - set(STEPS))
    if unknown:
        parser.error(f"unknown step(s) {unknown}; choose from {', '.join(STEPS)}")
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    functions = step_functions(args)
    if args.run_step is not None:  # a child: one step, its measurements into --record
        logging.getLogger("diffcxr_aug").setLevel(logging.INFO)
        _import_libraries(args.run_step, args.threads)
        args.record.write_text(json.dumps(measure(functions[args.run_step]), indent=2, default=str))
        return {}
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = set(args.steps or STEPS)
    rows = []
    for name, function in functions.items():
        base = "cache" if name.startswith("cache-w") else name
        if base not in chosen:
            continue
        rows.append({**run_step(args, name, function), "measured_at": time.strftime("%Y-%m-%d %H:%M")})
        print(f"{name}: {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    import torch

    record = args.out / "mimic_scale.json"
    earlier = json.loads(record.read_text()) if record.is_file() else None
    if earlier is not None and earlier["n"] != args.n:
        earlier = None  # another N's record: nothing of it carries over
    report = {
        "n": args.n,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": sys.platform},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "run_step"},
        "steps": merge_rows(earlier, rows),
    }
    rows = report["steps"]
    if {"layout", "prepare"} <= chosen:
        report["planted_rejected"] = check_planted(args.out)
    elif earlier is not None and "planted_rejected" in earlier:
        report["planted_rejected"] = earlier["planted_rejected"]
    table = markdown_table(rows, args.n)
    (args.out / "mimic_scale.json").write_text(json.dumps(report, indent=2, default=str))
    heading = f"# bench/mimic_scale.py --n {args.n} ({report['date']}, {os.cpu_count()} CPUs)\n\n"
    (args.out / "mimic_scale.md").write_text(heading + table + "\n")
    print(table)
    if "planted_rejected" in report:
        print(f"planted films rejected by name: {report['planted_rejected']}")
        if not all(report["planted_rejected"].values()):
            raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
