"""The bookkeeping of a synthesis job's output folder: the job record, the folder lock, the shard CSVs, who makes
which shard, and the final manifest and preview.

The output folder, 1,000 images a shard::

    images/000/000000.png ... images/000/000999.png, images/001/001000.png, ...
    shards/000.csv, shards/001.csv, ...   each shard's manifest rows, written again after every batch
    manifest.csv                          all rows, joined from the shards at the end of every run
    synthesis.json                        the job, its timing and memory, label prevalence
    preview.png                           the first images next to their reports (and real images)

Kill-safety: a PNG is written under a temporary name and renamed into place, then its row goes into the shard's
CSV (also written whole and renamed). Every run checks every shard it owns (:func:`check_shard`): temporary files
are removed, each image must decode at the generator's size (a damaged one is deleted and made again), rows without
a valid image are dropped and a valid image without a row gets its row. Nothing that grows with ``n`` is held in
memory but the prompt order (one integer an image): rows are handled a shard at a time.

A folder holds one job: a run whose settings would change any image (:data:`JOB_KEYS`) is refused, with the options
that reproduce the recorded job.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from diffcxr_aug.data.manifest import MANIFEST_NAME, validate_manifest_frame
from diffcxr_aug.errors import OutputInUseError
from diffcxr_aug.generator.pipeline_folder import generator_id, generator_image_size, sampling_gflops
from diffcxr_aug.generator.settings import SynthesisSettings
from diffcxr_aug.generator.synthesis_plan import IMAGE_DIR, SynthesisPlan, image_name, num_shards, shard_range
from diffcxr_aug.io import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

JOB_NAME = "synthesis.json"
SHARD_DIR = "shards"
PREVIEW_NAME = "preview.png"
LOCK_NAME = ".synthesize.lock"
# Job settings that fix every image; changing one of them in an existing folder is refused.
JOB_KEYS = (
    "generator",
    "generator_id",
    "prompts",
    "prompt_kind",
    "prompts_sha256",
    "steps",
    "guidance",
    "seed",
    "balance",
    "shard_size",
    "dkim_scale",
    "sampler_option",
    "mixed_precision",
)
# Timing and memory of the images made; a run that makes none keeps those of the run that made them.
PERFORMANCE_KEYS = (
    "seconds",
    "images_timed",
    "images_per_second",
    "device",
    "world_size",
    "rank_images",
    "batch_size",
    "rank_shards",
    "peak_rss_mib",
    "peak_cuda_mib",
)
_OPTIONS = {
    "generator": "--generator",
    "prompts": "--prompts / --labels-from",
    "prompt_kind": "--prompts / --labels-from",
    "steps": "--steps",
    "guidance": "--guidance",
    "seed": "--seed",
    "balance": "--balance",
    "dkim_scale": "--dkim-scale",
    "sampler_option": "--sampler",
    "mixed_precision": "--mixed-precision",
}


def shard_name(shard: int) -> str:
    return f"{SHARD_DIR}/{shard:03d}.csv"


# ------------------------------------------------------------------------------------------- the job record
@contextlib.contextmanager
def lock_folder(out: Path) -> Iterator[None]:
    """Hold the output folder (created if missing) for this job, refusing one another process holds."""
    from filelock import FileLock, Timeout

    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputInUseError(
            f"{out} is being synthesized by another process; wait for it to finish (or stop it), or choose another "
            "--out"
        ) from None
    try:
        yield
    finally:
        lock.release()


def start_job(
    generator: Path, out: Path, section: SynthesisSettings, plan: SynthesisPlan, job: dict[str, Any], world: int
) -> tuple[dict[str, Any], list[int], list[list[int]]]:
    """Check the job against the folder's record, write its record, and deal the shards out to ``world`` processes
    (process 0, holding the folder's lock).

    Returns:
        The job record, the images each shard lacks, and each process's shards.
    """
    job = {**job, "generator_id": generator_id(generator)}
    previous = _check_job(out, job)
    record = {
        **job,
        "n": section.n,
        "image_size": generator_image_size(generator),
        "sampler": plan.meta["meta_sampler"],
        **sampling_gflops(generator, section.steps, section.guidance),
        "prevalence": plan.prevalence(),
        **{k: previous[k] for k in PERFORMANCE_KEYS if k in previous},
    }
    atomic_write_json(out / JOB_NAME, record)
    _log_prevalence(record["prevalence"], section.balance)
    missing = _survey(out, section.n, section.shard_size)
    logger.info("%s: %d of %d images to generate", out, sum(missing), section.n)
    return record, missing, deal_shards(missing, section.n, section.shard_size, world)


def _check_job(out: Path, job: dict[str, Any]) -> dict[str, Any]:
    """The folder's previous job record (empty for a new folder); a different job is refused."""
    path = out / JOB_NAME
    if not path.is_file():
        return {}
    previous = json.loads(path.read_text())
    changed = {}
    for key in JOB_KEYS:
        old = previous.get(key, job[key])
        if old != job[key]:
            changed[key] = old
    if changed:
        details = "; ".join(f"{k}: {old!r} -> {job[k]!r}" for k, old in changed.items())
        hints = ", ".join(dict.fromkeys(_hint(key, old) for key, old in changed.items()))
        raise OutputInUseError(
            f"{out} holds images of another synthesis job ({details}). To finish or grow it, rerun with its "
            f"settings ({hints}); for the new settings choose a new --out"
        )
    return previous


def _hint(key: str, old: Any) -> str:
    """What reproduces the recorded value ``old`` of job setting ``key``."""
    if key in _OPTIONS:
        return f"{_OPTIONS[key]} {old}" if old is not None else f"no {_OPTIONS[key]}"
    if key == "shard_size":
        return f"synthesize.shard_size: {old} in the recipe"
    return {"generator_id": "the generator's weights as they were", "prompts_sha256": "the prompt file as it was"}[key]


def _log_prevalence(table: dict[str, dict[str, float]], balance: float | None) -> None:
    shares = ", ".join(f"{name} {v['pool']:.3f} -> {v['output']:.3f}" for name, v in table.items())
    logger.info("Positive share per label, pool -> images%s: %s", f" (--balance {balance})" if balance else "", shares)


# ------------------------------------------------------------------------------------------------ shards
def _survey(out: Path, n: int, shard_size: int) -> list[int]:
    """Images each shard of ``0..n-1`` lacks, by file name (process 0, before anything is written)."""
    missing = []
    for shard in range(num_shards(n, shard_size)):
        folder = out / IMAGE_DIR / f"{shard:03d}"
        present = set(os.listdir(folder)) if folder.is_dir() else set()
        missing.append(sum(f"{i:06d}.png" not in present for i in shard_range(shard, n, shard_size)))
    beyond = sum(int(p.stem) >= n for p in (out / IMAGE_DIR).glob("[0-9]*/[0-9]*.png"))
    if beyond:
        logger.warning("%s: %d images beyond --n %d are left on disk and not in the manifest", out, beyond, n)
    return missing


def deal_shards(missing: list[int], n: int, shard_size: int, world: int) -> list[list[int]]:
    """Shards per process, the most work first to the least loaded one (checking an image costs about a
    fiftieth of making it); each process then works through its shards in order.

    Not accelerate's ``split_between_processes``: its contiguous, equal-count split gives a resumed job's finished
    shards to one process and the missing images to another.
    """
    sizes = [len(shard_range(s, n, shard_size)) for s in range(len(missing))]
    cost = [50 * m + size for m, size in zip(missing, sizes, strict=True)]
    load, shards = [0] * world, [[] for _ in range(world)]
    for shard in sorted(range(len(cost)), key=lambda s: (-cost[s], s)):
        rank = min(range(world), key=lambda r: (load[r], r))
        load[rank] += cost[shard]
        shards[rank].append(shard)
    return [sorted(s) for s in shards]


def check_shard(shard: int, plan: SynthesisPlan, out: Path, size: int) -> tuple[dict[int, dict[str, str]], int]:
    """Bring one shard's files and CSV into agreement: temporary files removed, damaged images deleted, a row for
    every valid image and none for a missing one.

    Returns:
        The shard's rows by image index, and how many damaged images were deleted.
    """
    folder = out / IMAGE_DIR / f"{shard:03d}"
    for leftover in folder.glob(".*") if folder.is_dir() else []:
        leftover.unlink()  # the temporary file of a PNG whose writer was killed
    csv_path = out / shard_name(shard)
    recorded = _read_shard(csv_path)
    rows, damaged = {}, 0
    for i in shard_range(shard, plan.n, plan.shard_size):
        path = out / image_name(i, plan.shard_size)
        if not path.is_file():
            continue
        if _decodes(path, size):
            rows[i] = recorded.get(i) or plan.record(i)
        else:
            logger.warning("%s does not decode as a %d x %d image; making it again", path, size, size)
            path.unlink()
            damaged += 1
    if rows != recorded or not csv_path.is_file():
        write_shard(out, shard, plan.columns, rows)
    return rows, damaged


def _read_shard(path: Path) -> dict[int, dict[str, str]]:
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {int(Path(row["image_path"]).stem): row for row in csv.DictReader(f)}


def write_shard(out: Path, shard: int, columns: list[str], rows: dict[int, dict[str, str]]) -> None:
    """The shard's CSV, whole, in image order."""
    with atomic_path(out / shard_name(shard)) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows[i] for i in sorted(rows))


def _decodes(path: Path, size: int) -> bool:
    from diffcxr_aug.data.images import verify_image
    from diffcxr_aug.errors import ImageReadError

    try:
        return verify_image(path) == (size, size)
    except ImageReadError:
        return False


# ------------------------------------------------------------------------------------------ the end of a run
def finish_job(out: Path, plan: SynthesisPlan, record: dict[str, Any], stats: list[dict[str, Any]]) -> Path:
    """Join the manifest, draw the preview and record the run's timing and memory (process 0).

    Args:
        out: the output folder.
        plan: the job's plan.
        record: the job record :func:`start_job` wrote.
        stats: each process's images made, shards, damaged images, seconds, batch size, device and peak memory.

    Returns:
        The path of the joined manifest.
    """
    manifest = _join_shards(out, plan.n, plan.shard_size)
    _preview(plan, out)
    made = sum(s["images"] for s in stats)
    if made:
        # Throughput of all processes together: the images made over the slowest process's time.
        seconds = max(s["seconds"] for s in stats)
        record["seconds"] = record.get("seconds", 0.0) + seconds
        record["images_timed"] = record.get("images_timed", 0) + made
        record["images_per_second"] = record["images_timed"] / max(record["seconds"], 1e-9)
        record["device"] = stats[0]["device"]
        record["world_size"] = len(stats)
        record["rank_images"] = [s["images"] for s in stats]
        record["rank_shards"] = [s["shards"] for s in stats]
        record["batch_size"] = [s["batch_size"] for s in stats]
        record["peak_rss_mib"] = [round(s["peak_rss_mib"], 1) for s in stats]
        peaks = [s["peak_cuda_mib"] for s in stats]
        record["peak_cuda_mib"] = None if peaks[0] is None else [round(p, 1) for p in peaks]
        logger.info(
            "%d images in %.1f s (%.2f images/s, %d process(es), per process %s); peak RSS %s MiB",
            made,
            seconds,
            made / max(seconds, 1e-9),
            len(stats),
            record["rank_images"],
            record["peak_rss_mib"],
        )
    damaged = sum(s["damaged"] for s in stats)
    if damaged:
        logger.warning("%s: %d damaged images were made again", out, damaged)
    atomic_write_json(out / JOB_NAME, record)
    logger.info("Synthetic manifest with %d images: %s", plan.n, manifest)
    return manifest


def _join_shards(out: Path, n: int, shard_size: int) -> Path:
    """``manifest.csv`` from the shard CSVs, one shard at a time, after checking that every image
    ``0..n-1`` has exactly one row."""
    path = out / MANIFEST_NAME
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        for shard in range(num_shards(n, shard_size)):
            source = out / shard_name(shard)
            frame = pd.read_csv(source, dtype=str, keep_default_na=False, encoding="utf-8")
            index = frame["image_path"].map(lambda p: int(Path(p).stem))
            frame = frame[index < n]
            expected = list(shard_range(shard, n, shard_size))
            if sorted(index[index < n]) != expected:
                raise RuntimeError(f"{source}: rows {sorted(set(expected) - set(index))} are missing after the run")
            validate_manifest_frame(frame, source=str(source))
            frame.to_csv(f, header=shard == 0, index=False)
    return path


def _preview(plan: SynthesisPlan, out: Path, count: int = 8) -> Path:
    """The first images next to their reports (and the real images those reports belong to, if any)."""
    from diffcxr_aug.data.images import load_image
    from diffcxr_aug.generator.figures import save_report_grid

    shown = range(min(count, plan.n))
    pool = plan.pool
    records = [plan.record(i) for i in shown]
    real = None
    if pool.root is not None:
        real = [load_image(pool.root / r["meta_prompt_image"]) for r in records]
    captions = []
    for i, record in zip(shown, records, strict=True):
        positive = [name for name in pool.label_names if record[name] == "1"]
        captions.append(
            f"#{i} seed {record['seed']}   " + ("+ " + ", ".join(positive) if positive else "(no positive label)")
        )
    title = "synthetic images (right) from the reports" + (" of real images (middle)" if real else "")
    return save_report_grid(
        [r["prompt"] for r in records],
        [load_image(out / r["image_path"]) for r in records],
        out / PREVIEW_NAME,
        real=real,
        captions=captions,
        title=title,
    )
