"""``synthesize``: labelled chest radiographs from a trained :class:`DiffCXRPipeline`, at scale and kill-safe.

This module holds the entry point and the sampling loop; what image ``i`` is (its file, prompt, seed and manifest
row) is :mod:`diffcxr_aug.generator.synthesis_plan`, and the output folder's bookkeeping (the job record, the lock,
the shard CSVs, the manifest and preview) is :mod:`diffcxr_aug.generator.synthesis_job`. A run checks every shard it
owns and makes only the images that are missing or damaged, so an interrupted or grown job is finished by running
the same command again.

Several processes (``torchrun`` or ``accelerate launch``) split the shards through accelerate's ``PartialState``:
process 0 checks the job and surveys what each shard lacks, deals the shards out (the most work first, to the least
loaded process) and broadcasts the deal; each process writes only its own shards; process 0 gathers every process's
timing and memory and joins the shard CSVs into ``manifest.csv``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffcxr_aug.data.manifest import MANIFEST_NAME
from diffcxr_aug.errors import MissingInputError
from diffcxr_aug.generator.pipeline_folder import generator_image_size
from diffcxr_aug.generator.settings import SynthesisSettings
from diffcxr_aug.generator.synthesis_job import check_shard, finish_job, lock_folder, start_job, write_shard
from diffcxr_aug.generator.synthesis_plan import SynthesisPlan, image_name, image_seed, plan_job, shard_range
from diffcxr_aug.runtime import attention_backend, autocast, resolve_device, resolve_mixed_precision

if TYPE_CHECKING:
    from accelerate import PartialState

logger = logging.getLogger(__name__)

CPU_BATCH_SIZE = 16
# --batch-size auto on CUDA starts here and halves on out-of-memory.
CUDA_MAX_BATCH_SIZE = 256


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
            ``section.mixed_precision`` is resolved on it: ``auto`` samples in bf16 on a GPU that has it, fp16 on
            one that has not, and fp32 on a CPU (there bf16 sampled phantom-128 1.8x faster, README "Performance",
            but changes every image of the recipes recorded in fp32; ask for it with ``bf16``).
        seed: the job seed (prompt order and every image's noise).

    Returns:
        The path of the written manifest.
    """
    from accelerate.utils import broadcast_object_list, gather_object

    generator, out = Path(generator), Path(out)
    if not (generator / "model_index.json").is_file():
        raise MissingInputError(
            f"{generator} is not a trained pipeline folder (no model_index.json); pass the --out of train-generator"
        )
    # The job records the precision it ran in (auto is bf16 on one GPU and fp16 on another), so a folder's images
    # are never mixed from two precisions.
    section = section.model_copy(
        update={"mixed_precision": resolve_mixed_precision(section.mixed_precision, resolve_device(device))}
    )
    plan, job = plan_job(generator, section, seed)
    with _processes(device) as (state, dev), contextlib.ExitStack() as stack:
        rank, world = (0, 1) if state is None else (state.process_index, state.num_processes)
        start: Any = None
        if rank == 0:
            try:
                stack.enter_context(lock_folder(out))
                start = start_job(generator, out, section, plan, job, world)
            except (ValueError, FileNotFoundError, FileExistsError) as err:
                start = err  # raised by every process below, so that none waits for ever for process 0
        if state is not None:
            start = broadcast_object_list([start])[0]
        if isinstance(start, Exception):
            raise start
        record, missing, shards = start
        plan.meta["meta_generator"] = record["generator_id"]
        sampler = _Sampler(generator, plan, section, dev)
        progress = None if rank else "synthesizing" if world == 1 else f"synthesizing (process 0 of {world})"
        stats = _fill_shards(shards[rank], missing, plan, out, sampler, progress)
        stats = [stats] if state is None else gather_object([stats])
        path = finish_job(out, plan, record, stats) if rank == 0 else out / MANIFEST_NAME
        if state is not None:
            state.wait_for_everyone()  # every process returns once the manifest is joined
    return path


@contextlib.contextmanager
def _processes(device: str) -> Iterator[tuple[PartialState | None, torch.device]]:
    """This process's accelerate state and the device it samples on.

    A single process (``WORLD_SIZE`` unset or 1) gets no state and no process group: accelerate's state is
    process-wide and fixes the device for the rest of the process (with accelerate 1.16 an ``Accelerator(cpu=True)``
    after a ``PartialState()`` that chose a GPU gets that GPU), and a recipe runs all its steps in one process.
    Under ``torchrun`` / ``accelerate launch`` it is ``PartialState`` (gloo on CPU, NCCL on CUDA with one GPU a
    process), joining the state and process group an earlier step of the process started (a training) or starting
    both; what it started it ends, so that a later step of the process chooses its device afresh. (A script that
    runs more steps under one launch should start accelerate first: torch can hang re-creating a destroyed default
    group when the processes reach it at different times.)
    """
    dev = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        yield None, dev
        return
    import torch.distributed as dist
    from accelerate import PartialState

    started_group, started_state = not dist.is_initialized(), PartialState._shared_state == {}
    state = PartialState(cpu=dev.type == "cpu")
    if dev.type == "cuda":
        dev = torch.device("cuda", state.local_process_index)
    try:
        yield state, dev
    finally:
        if started_group and dist.is_initialized():
            dist.destroy_process_group()
        if started_state:
            PartialState._reset_state()


# ------------------------------------------------------------------------------------------------ sampling
class _Sampler:
    """Images for a list of indices, a batch at a time, with the pipeline loaded on first use (a rerun with
    nothing to make loads no model). With ``batch_size: auto`` on CUDA a batch that runs out of memory is
    halved and run again, and the smaller size kept."""

    def __init__(self, generator: Path, plan: SynthesisPlan, section: SynthesisSettings, dev: torch.device) -> None:
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
        # The math attention backend on a CPU: the fp32 guided step of phantom-128 at batch 2 x 32 took 0.315 s
        # against 0.375 s with torch's choice, at 0.97 of the fp32 matmul limit (bench/perf.py); bf16 the same.
        with (
            torch.inference_mode(),
            autocast(self.dev, self.section.mixed_precision),
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


def _fill_shards(
    shards: list[int], missing: list[int], plan: SynthesisPlan, out: Path, sampler: _Sampler, progress: str | None
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


def _fill_shard(
    shard: int, plan: SynthesisPlan, out: Path, size: int, sampler: _Sampler, bar: tqdm
) -> tuple[int, int, float]:
    """Check one shard (files, rows) and make the images it lacks; returns the images made, the damaged ones
    and the seconds spent making (sampling and saving) them."""
    from diffcxr_aug.data.images import save_png

    rows, damaged = check_shard(shard, plan, out, size)
    indices = shard_range(shard, plan.n, plan.shard_size)
    made, began = 0, time.perf_counter()
    for batch, images in sampler([i for i in indices if i not in rows]):
        for i, image in zip(batch, images, strict=True):
            save_png(image, out / image_name(i, plan.shard_size))
            rows[i] = plan.record(i)
        write_shard(out, shard, plan.columns, rows)
        made += len(batch)
        bar.update(len(batch))
    return made, damaged, time.perf_counter() - began
