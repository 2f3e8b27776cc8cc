"""``synthesize``: labelled chest radiographs from a trained :class:`DiffCXRPipeline`, at scale and kill-safe.

Image ``i`` of a job is fully determined by the job (generator, prompt source, steps, guidance, seed,
balance) and ``i`` alone: its prompt is position ``i`` of a seeded prompt sequence that does not depend on
``n`` (:mod:`diffcxr_aug.generator.prompts`), and its initial noise comes from its own seed (the ``seed``
column). So a job can grow (``--n 4`` then ``--n 6`` makes only images 4 and 5), and an interrupted run,
started again, makes only what is missing.

The output folder, 1,000 images a shard::

    images/000/000000.png ... images/000/000999.png, images/001/001000.png, ...
    shards/000.csv, shards/001.csv, ...   each shard's manifest rows, written again after every batch
    manifest.csv                          all rows, joined from the shards at the end of every run
    synthesis.json                        the job, its timing and memory, label prevalence
    preview.png                           the first images next to their reports (and real images)

Kill-safety: a PNG is written under a temporary name and renamed into place, then its row goes into the
shard's CSV (also written whole and renamed). Every run checks every shard it owns: temporary files are
removed, each image must decode at the generator's size (a damaged one is deleted and made again), rows
without a valid image are dropped and a valid image without a row gets its row. Nothing that grows with
``n`` is held in memory but the prompt order (one integer an image): rows are handled a shard at a time.

Several processes (``torchrun`` or ``accelerate launch``) split the shards: process 0 surveys what each
shard lacks and deals the shards out (the most work first, to the least loaded process), each process
writes only its own shards, and process 0 joins the shard CSVs into ``manifest.csv``.

The manifest is in the contract schema: labels copied from the prompt's row, split ``train``,
``patient_id``/``study_id`` ``synthetic-<i>``, the prompt row's view, plus ``prompt`` (the report the image
was generated from), ``seed``, ``meta_prompt_image`` (the real image whose report it is, if any) and what
regenerates the image exactly: ``meta_generator`` (the generator's id), ``meta_sampler``, ``meta_steps`` and
``meta_guidance`` (and ``meta_precision`` for images sampled under bf16, ``meta_dkim_scale`` for a DKIM model).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from diffcxr_aug.data.manifest import CORE_COLUMNS, MANIFEST_NAME, validate_manifest_frame
from diffcxr_aug.errors import InputError, MissingInputError
from diffcxr_aug.generator.prompts import (
    PromptPool,
    balanced_prompt_rows,
    file_sha256,
    load_prompt_pool,
    prevalence,
    prompt_rows,
)
from diffcxr_aug.generator.settings import SynthesisSettings
from diffcxr_aug.io import atomic_path, atomic_write_json
from diffcxr_aug.runtime import attention_backend

logger = logging.getLogger(__name__)

JOB_NAME = "synthesis.json"
IMAGE_DIR = "images"
SHARD_DIR = "shards"
PREVIEW_NAME = "preview.png"
LOCK_NAME = ".synthesize.lock"
SHARD_SIZE = 1000  # the default of SynthesisSettings.shard_size
CPU_BATCH_SIZE = 16
# --batch-size auto on CUDA starts here and halves on out-of-memory.
CUDA_MAX_BATCH_SIZE = 256
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


def image_name(index: int, shard_size: int = SHARD_SIZE) -> str:
    """``images/<shard>/<index>.png`` of image ``index``, relative to the output folder."""
    return f"{IMAGE_DIR}/{index // shard_size:03d}/{index:06d}.png"


def shard_name(shard: int) -> str:
    return f"{SHARD_DIR}/{shard:03d}.csv"


def shard_range(shard: int, n: int, shard_size: int) -> range:
    """The indices of images ``0..n-1`` in shard ``shard``."""
    return range(shard * shard_size, min(n, (shard + 1) * shard_size))


def num_shards(n: int, shard_size: int) -> int:
    return (n + shard_size - 1) // shard_size


def image_seed(seed: int, index: int) -> int:
    """The torch seed of image ``index``'s initial noise (a 32-bit integer derived from the job seed)."""
    return int(np.random.SeedSequence([seed, 4, index]).generate_state(1)[0])


def generator_id(generator: Path) -> str:
    """``<folder name>@<sha256 prefix>`` over every file of the pipeline's components (weights, configs,
    tokenizer): it changes when the generator is trained further or replaced in the same folder."""
    index = json.loads((generator / "model_index.json").read_text())
    digest = hashlib.sha256((generator / "model_index.json").read_bytes())
    for component, spec in sorted(index.items()):
        if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        for path in sorted(p for p in (generator / component).rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(generator)).encode())
            digest.update(file_sha256(path).encode())
    return f"{generator.name}@{digest.hexdigest()[:16]}"


def _read_config(generator: Path, component: str) -> dict[str, Any]:
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((generator / component / name).read_text())


def generator_image_size(generator: Path) -> int:
    """Image side the pipeline generates: the UNet's latent size times the VAE's downsampling factor."""
    unet, vae = _read_config(generator, "unet"), _read_config(generator, "vae")
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def sampling_gflops(generator: Path, steps: int, guidance: float) -> dict[str, float]:
    """GFLOPs of one denoising step (a UNet pass at batch 1, and the DKIM adapter's when the folder has one, counted
    on the meta device) and of one image
    (``steps`` of them, twice each with classifier-free guidance); the VAE decode is not counted."""
    from diffusers import UNet2DConditionModel

    from diffcxr_aug.generator.configs import denoising_step_flops
    from diffcxr_aug.generator.disease_adapter import DiseaseKnowledgeAdapter

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_read_config(generator, "unet"))
        adapter = (
            DiseaseKnowledgeAdapter.from_config(_read_config(generator, "adapter")) if has_adapter(generator) else None
        )
    per_step = denoising_step_flops(unet, int(_read_config(generator, "token_squeeze")["num_tokens"]), adapter) / 1e9
    return {"gflops_per_denoising_step": per_step, "gflops_per_image": per_step * steps * (2 if guidance > 1 else 1)}


@dataclass
class _Plan:
    """Every image of the job: its prompt row, its seed and its manifest row."""

    pool: PromptPool
    rows: np.ndarray  # prompt row (position in pool.frame) of images 0..n-1
    seed: int
    shard_size: int
    meta: dict[str, str]  # meta_generator, meta_sampler, meta_steps, meta_guidance (and meta_dkim_scale)
    knowledge: list[str] | None = None  # a DKIM generator: each prompt row's knowledge text
    dkim_scale: float | None = None  # a DKIM generator: the weight of its residuals

    def __post_init__(self) -> None:
        frame = self.pool.frame
        self._reports, self._views, self._images = (frame[c].tolist() for c in ("report", "view", "image"))
        self._labels = [
            ["" if pd.isna(v) else str(int(v)) for v in values]
            for values in frame[self.pool.label_names].to_numpy(dtype=np.float32)
        ]

    def knowledge_of(self, index: int) -> str:
        return self.knowledge[self.rows[index]]

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> list[str]:
        knowledge = ["meta_knowledge"] if self.knowledge is not None else []
        return [*CORE_COLUMNS, *self.pool.label_names, "prompt", *knowledge, "seed", "meta_prompt_image", *self.meta]

    def report(self, index: int) -> str:
        return self._reports[self.rows[index]]

    def record(self, index: int) -> dict[str, str]:
        row = self.rows[index]
        record = {
            "image_path": image_name(index, self.shard_size),
            "patient_id": f"synthetic-{index}",
            "study_id": f"synthetic-{index}",
            "view": self._views[row],
            "split": "train",
            "report": self._reports[row],
        }
        record.update(zip(self.pool.label_names, self._labels[row], strict=True))
        record["prompt"] = self._reports[row]
        if self.knowledge is not None:
            record["meta_knowledge"] = self.knowledge[row]
        record["seed"] = str(image_seed(self.seed, index))
        record["meta_prompt_image"] = self._images[row]
        return {**record, **self.meta}

    def prevalence(self) -> dict[str, dict[str, float]]:
        """Each label's positive share in the pool and in the job's images."""
        positives = self.pool.positives()
        pool = prevalence(positives)
        output = prevalence(positives, np.bincount(self.rows, minlength=len(self.pool)))
        return {
            name: {"pool": round(float(p), 4), "output": round(float(o), 4)}
            for name, p, o in zip(self.pool.label_names, pool, output, strict=True)
        }


def _prompt_source(generator: Path, section: SynthesisSettings) -> tuple[Path, bool]:
    """The prompt source and whether its reports are written from its labels (``--labels-from``)."""
    if section.labels_from is not None:
        if section.prompts is not None:
            logger.info(
                "labels_from %s is the prompt source; prompts %s is not used", section.labels_from, section.prompts
            )
        return Path(section.labels_from), True
    if section.prompts is not None:
        return Path(section.prompts), False
    info_path = generator / "training_info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("data"):
            # A generator trained on template reports (report_source: labels) gets its prompts written the same way.
            return Path(info["data"]), info.get("section", {}).get("report_source") == "labels"
    raise InputError(
        f"{generator} records no training manifest (no training_info.json with 'data'); pass --prompts with a "
        "manifest folder or a CSV / text file of reports, or --labels-from with a manifest"
    )


def _plan(generator: Path, section: SynthesisSettings, seed: int) -> tuple[_Plan, dict[str, Any]]:
    """The prompt order and the job record (without the generator id, which process 0 adds)."""
    source, labels_only = _prompt_source(generator, section)
    pool = load_prompt_pool(source, labels_only=labels_only)
    if section.balance is None:
        rows = prompt_rows(len(pool), section.n, seed)
    else:
        rows = balanced_prompt_rows(pool.positives(), section.n, seed, section.balance)
    scheduler = _read_config(generator, "scheduler")["_class_name"]
    if section.sampler != "pipeline":
        from diffcxr_aug.generator.pipeline import SAMPLERS

        scheduler = SAMPLERS[section.sampler][0].__name__
    meta = {
        "meta_generator": "",
        "meta_sampler": scheduler,
        "meta_steps": str(section.steps),
        "meta_guidance": str(section.guidance),
    }
    dkim_scale, knowledge = _dkim(generator, section, pool)
    if dkim_scale is not None:
        meta["meta_dkim_scale"] = str(dkim_scale)
    if section.mixed_precision != "no":  # fp32 rows (and folders made before the option) have no column
        meta["meta_precision"] = section.mixed_precision
    job = {
        "generator": str(generator.resolve()),
        "prompts": str(pool.source.resolve()),
        "prompt_kind": pool.kind,
        "prompts_sha256": pool.fingerprint(),
        "steps": section.steps,
        "guidance": section.guidance,
        "seed": seed,
        "balance": section.balance,
        "shard_size": section.shard_size,
        "dkim_scale": dkim_scale,
        "sampler_option": section.sampler,  # "sampler" is the scheduler class, in the record
        "mixed_precision": section.mixed_precision,
    }
    return _Plan(pool, rows, seed, section.shard_size, meta, knowledge, dkim_scale), job


def has_adapter(generator: Path) -> bool:
    """Whether the pipeline folder holds a DKIM adapter (a stage-2 model)."""
    index = json.loads((generator / "model_index.json").read_text())
    return (index.get("adapter") or [None])[0] is not None and (generator / "adapter").is_dir()


def _dkim(generator: Path, section: SynthesisSettings, pool: PromptPool) -> tuple[float | None, list[str] | None]:
    """A DKIM generator's residual weight and the knowledge text of every prompt row (written from the row's labels
    with the adapter's own templates); ``(None, None)`` for a stage-1 generator."""
    from diffcxr_aug.generator.knowledge import knowledge_texts, load_templates

    if not has_adapter(generator):
        if section.dkim_scale is not None:
            logger.info("%s has no DKIM adapter (a stage-1 model): dkim_scale is not used", generator)
        return None, None
    scale = section.dkim_scale
    if scale is None:
        info = generator / "training_info.json"
        recorded = json.loads(info.read_text()).get("section", {}) if info.is_file() else {}
        scale = float(recorded.get("dkim_scale", 1.0))
    adapter = _read_config(generator, "adapter")
    templates = load_templates(adapter.get("knowledge_templates"))
    return scale, knowledge_texts(
        pool.frame[pool.label_names], templates, adapter.get("knowledge_states", "positive-only")
    )


def _hint(key: str, old: Any) -> str:
    """What reproduces the recorded value ``old`` of job setting ``key``."""
    if key in _OPTIONS:
        return f"{_OPTIONS[key]} {old}" if old is not None else f"no {_OPTIONS[key]}"
    if key == "shard_size":
        return f"synthesize.shard_size: {old} in the recipe"
    return {"generator_id": "the generator's weights as they were", "prompts_sha256": "the prompt file as it was"}[key]


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
        raise InputError(
            f"{out} holds images of another synthesis job ({details}). To finish or grow it, rerun with its "
            f"settings ({hints}); for the new settings choose a new --out"
        )
    return previous


# -------------------------------------------------------------------------------------------- processes
@contextlib.contextmanager
def _processes(device: str) -> Iterator[tuple[int, int, torch.device]]:
    """``(rank, world_size, device)`` of this process; under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE``
    set) the process group (gloo on CPU, NCCL on CUDA with one GPU a process), torn down at the end.

    torch.distributed directly rather than accelerate's ``PartialState``: that state is process-wide and fixes
    the device choice for every later step a recipe runs in the same process.
    """
    from diffcxr_aug.runtime import resolve_device

    dev = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield 0, 1, dev
        return
    import torch.distributed as dist

    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), dev
    finally:
        if created:
            dist.destroy_process_group()


def _broadcast(value: Any, world: int) -> Any:
    """Process 0's ``value`` on every process."""
    if world == 1:
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _gather(value: Any, world: int) -> list[Any]:
    if world == 1:
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


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


def _deal(missing: list[int], n: int, shard_size: int, world: int) -> list[list[int]]:
    """Shards per process, the most work first to the least loaded one (checking an image costs about a
    fiftieth of making it); each process then works through its shards in order."""
    sizes = [len(shard_range(s, n, shard_size)) for s in range(len(missing))]
    cost = [50 * m + size for m, size in zip(missing, sizes, strict=True)]
    load, shards = [0] * world, [[] for _ in range(world)]
    for shard in sorted(range(len(cost)), key=lambda s: (-cost[s], s)):
        rank = min(range(world), key=lambda r: (load[r], r))
        load[rank] += cost[shard]
        shards[rank].append(shard)
    return [sorted(s) for s in shards]


def _read_shard(path: Path) -> dict[int, dict[str, str]]:
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {int(Path(row["image_path"]).stem): row for row in csv.DictReader(f)}


def _write_shard(path: Path, columns: list[str], rows: dict[int, dict[str, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
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


class _Sampler:
    """Images for a list of indices, a batch at a time, with the pipeline loaded on first use (a rerun with
    nothing to make loads no model). With ``batch_size: auto`` on CUDA a batch that runs out of memory is
    halved and run again, and the smaller size kept."""

    def __init__(self, generator: Path, plan: _Plan, section: SynthesisSettings, dev: torch.device) -> None:
        self.generator, self.plan, self.section, self.dev = generator, plan, section, dev
        self.auto = section.batch_size == "auto"
        if not self.auto:
            self.batch_size = int(section.batch_size)
        else:
            self.batch_size = CUDA_MAX_BATCH_SIZE if dev.type == "cuda" else CPU_BATCH_SIZE
        self.pipe = None
        self.load_seconds = 0.0

    def _run(self, batch: list[int]) -> np.ndarray:
        if self.pipe is None:
            from diffcxr_aug.generator.pipeline import DiffCXRPipeline, sampler_scheduler

            began = time.perf_counter()
            self.pipe = DiffCXRPipeline.from_pretrained(self.generator).to(self.dev)
            if self.section.sampler != "pipeline":
                self.pipe.scheduler = sampler_scheduler(self.section.sampler, self.pipe.scheduler.config)
            self.pipe.set_progress_bar_config(disable=True)
            self.load_seconds = time.perf_counter() - began
        dkim = {}
        if self.plan.knowledge is not None:
            dkim = {"knowledge": [self.plan.knowledge_of(i) for i in batch], "dkim_scale": self.plan.dkim_scale}
        bf16 = self.section.mixed_precision == "bf16"
        # The math attention backend on a CPU: the fp32 guided step of phantom-128 at batch 2 x 32 took 0.315 s
        # against 0.375 s with torch's choice, at 0.97 of the fp32 matmul limit (bench/perf.py); bf16 the same.
        with (
            torch.inference_mode(),
            torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=bf16),
            attention_backend("auto", self.dev),
        ):
            return self._sample(batch, dkim)

    def _sample(self, batch: list[int], dkim: dict[str, Any]) -> np.ndarray:
        return self.pipe(
            [self.plan.report(i) for i in batch],
            num_inference_steps=self.section.steps,
            guidance_scale=self.section.guidance,
            generator=[torch.Generator().manual_seed(image_seed(self.plan.seed, i)) for i in batch],
            output_type="np",
            **dkim,
        ).images[..., 0]

    def __call__(self, indices: list[int]) -> Iterator[tuple[list[int], np.ndarray]]:
        start = 0
        while start < len(indices):
            batch = indices[start : start + self.batch_size]
            try:
                images = self._run(batch)
            except torch.cuda.OutOfMemoryError:
                if not self.auto or self.batch_size == 1:
                    raise
                images = None  # out of the except block first, so the failed batch's tensors can be freed
            if images is None:
                torch.cuda.empty_cache()
                self.batch_size //= 2
                logger.info("Out of CUDA memory at batch %d; going on with %d", len(batch), self.batch_size)
                continue
            start += len(batch)
            yield batch, images


def _fill_shard(shard: int, plan: _Plan, out: Path, size: int, sampler: _Sampler, bar: tqdm) -> tuple[int, int, float]:
    """Check one shard (files, rows) and make the images it lacks; returns the images made, the damaged ones
    and the seconds spent making (sampling and saving) them."""
    from diffcxr_aug.data.images import save_png

    indices = shard_range(shard, plan.n, plan.shard_size)
    folder = out / IMAGE_DIR / f"{shard:03d}"
    for leftover in folder.glob(".*") if folder.is_dir() else []:
        leftover.unlink()  # the temporary file of a PNG whose writer was killed
    csv_path = out / shard_name(shard)
    recorded = _read_shard(csv_path)
    rows, damaged = {}, 0
    for i in indices:
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
        _write_shard(csv_path, plan.columns, rows)
    made, began = 0, time.perf_counter()
    for batch, images in sampler([i for i in indices if i not in rows]):
        for i, image in zip(batch, images, strict=True):
            save_png(image, out / image_name(i, plan.shard_size))
            rows[i] = plan.record(i)
        _write_shard(csv_path, plan.columns, rows)
        made += len(batch)
        bar.update(len(batch))
    return made, damaged, time.perf_counter() - began


def _fill_shards(
    shards: list[int], missing: list[int], plan: _Plan, out: Path, sampler: _Sampler, progress: str | None
) -> dict[str, Any]:
    """This process's part: its shards checked and completed; returns what it made, in what time and memory."""
    size = generator_image_size(sampler.generator)
    dev = sampler.dev
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    made, damaged, seconds = 0, 0, 0.0
    todo = sum(missing[shard] for shard in shards)
    with tqdm(total=todo, desc=progress, unit="img", disable=progress is None) as bar:
        for shard in shards:
            shard_made, shard_damaged, shard_seconds = _fill_shard(shard, plan, out, size, sampler, bar)
            made, damaged, seconds = made + shard_made, damaged + shard_damaged, seconds + shard_seconds
    return {
        "images": made,
        "shards": shards,
        "damaged": damaged,
        # Making images (sampling and saving), not loading the pipeline or checking the images already there.
        "seconds": seconds - sampler.load_seconds,
        "batch_size": sampler.batch_size,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
        "device": str(dev),
    }


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


# ------------------------------------------------------------------------------------------- entry point
def synthesize(
    generator: str | os.PathLike,
    out: str | os.PathLike,
    section: SynthesisSettings,
    device: str = "auto",
    seed: int = 0,
) -> Path:
    """Generate ``section.n`` labelled images with the pipeline in ``generator`` into ``out``.

    Run it again after an interruption (or with a larger ``n``) to finish (or grow) the job; run it under
    ``torchrun --nproc_per_node P -m diffcxr_aug.cli -- synthesize ...`` (or ``accelerate launch``) to split it
    over P processes.

    Args:
        generator: a pipeline folder written by ``train-generator``.
        out: output folder: ``manifest.csv``, ``images/``, ``shards/``, ``preview.png``, ``synthesis.json``.
        section: ``n``, ``steps``, ``guidance``, ``batch_size`` (``auto``: 16 on CPU, the most that fits on
            CUDA), the prompt source (``prompts``: a manifest's train split, a CSV or text file of reports, or
            a CSV of labels; ``labels_from``: a manifest's labels; default: the manifest the generator was
            trained on) and ``balance`` (the positive share each label should reach).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (with several processes each takes its own GPU).
        seed: the job seed (prompt order and every image's noise).

    Returns:
        The path of the written manifest.
    """
    generator, out = Path(generator), Path(out)
    if not (generator / "model_index.json").is_file():
        raise MissingInputError(
            f"{generator} is not a trained pipeline folder (no model_index.json); pass the --out of train-generator"
        )
    plan, job = _plan(generator, section, seed)
    with _processes(device) as (rank, world, dev), contextlib.ExitStack() as stack:
        if section.mixed_precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise InputError(f"--mixed-precision bf16: {torch.cuda.get_device_name(dev)} has no bf16; use no")
        main = rank == 0
        start = None
        if main:
            start = _start_job(generator, out, section, plan, job, stack)
        start = _broadcast(start, world)
        if isinstance(start, Exception):
            raise start
        record, shards = start
        plan.meta["meta_generator"] = record["generator_id"]
        missing = record.pop("_missing")
        sampler = _Sampler(generator, plan, section, dev)
        progress = None if not main else "synthesizing" if world == 1 else f"synthesizing (process 0 of {world})"
        stats = _gather(_fill_shards(shards[rank], missing, plan, out, sampler, progress), world)
        path = _finish_job(out, plan, record, stats) if main else out / MANIFEST_NAME
        _broadcast(None, world)  # every process returns once the manifest is joined
    return path


def _start_job(
    generator: Path,
    out: Path,
    section: SynthesisSettings,
    plan: _Plan,
    job: dict[str, Any],
    stack: contextlib.ExitStack,
) -> tuple[dict[str, Any], list[list[int]]] | Exception:
    """Process 0: lock the folder, check the job, write its record, and deal the shards out. Bad input is
    returned (and raised by every process) rather than raised here, so that no process waits for ever."""
    from filelock import FileLock, Timeout

    try:
        out.mkdir(parents=True, exist_ok=True)
        try:
            stack.enter_context(FileLock(out / LOCK_NAME, timeout=0))
        except Timeout:
            raise FileExistsError(
                f"{out} is being synthesized by another process; wait for it to finish (or stop it), or choose "
                "another --out"
            ) from None
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
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        return err
    _log_prevalence(record["prevalence"], section.balance)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    missing = _survey(out, section.n, section.shard_size)
    logger.info("%s: %d of %d images to generate", out, sum(missing), section.n)
    return {**record, "_missing": missing}, _deal(missing, section.n, section.shard_size, world)


def _log_prevalence(table: dict[str, dict[str, float]], balance: float | None) -> None:
    shares = ", ".join(f"{name} {v['pool']:.3f} -> {v['output']:.3f}" for name, v in table.items())
    logger.info("Positive share per label, pool -> images%s: %s", f" (--balance {balance})" if balance else "", shares)


def _finish_job(out: Path, plan: _Plan, record: dict[str, Any], stats: list[dict[str, Any]]) -> Path:
    """Process 0: join the manifest, draw the preview and record the run's timing and memory."""
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


def _preview(plan: _Plan, out: Path, count: int = 8) -> Path:
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
