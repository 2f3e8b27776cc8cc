"""One run of a classifier sweep: its name, how it is trained (its stages, a shared synthetic-only stage reused
under a lock), tested and scored into a row of ``results.csv``, in this process or in worker processes
(``classifier.workers``)."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from filelock import FileLock
from safetensors.torch import load_file
from torch.utils.data import ConcatDataset

from diffcxr_aug.augment.mixing import Stage, load_synthetic, training_stages
from diffcxr_aug.augment.results import DEFAULT_SOURCE, NO_SOURCE, SYNTHETIC_ONLY
from diffcxr_aug.augment.sweep_data import SweepData, load_sweep_data, score_run
from diffcxr_aug.classifiers.models import WEIGHTS_NAME, create_classifier
from diffcxr_aug.classifiers.subsample import sample_real_fraction
from diffcxr_aug.classifiers.train import HISTORY_NAME, TrainResult, predict, seeded, train_classifier
from diffcxr_aug.config import ClassifierSection
from diffcxr_aug.data.dataset import CXRDataset
from diffcxr_aug.data.manifest import Manifest
from diffcxr_aug.io import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)


def _tagged(name: str, source: str, generator_seed: int | None = None) -> str:
    # An unnamed synthetic folder keeps the names sweeps used before sources had names (so they resume).
    tagged = name if source in (NO_SOURCE, DEFAULT_SOURCE) else f"{name}-{source}"
    return tagged if generator_seed is None else f"{tagged}-g{generator_seed}"


def run_name(
    real_frac: float, mode: str, seed: int, source: str = NO_SOURCE, generator_seed: int | None = None
) -> str:
    return f"frac{real_frac:g}_{_tagged(mode, source, generator_seed)}_seed{seed}"


@dataclass(frozen=True)
class SyntheticSet:
    """One synthetic image set of a sweep: its source name, the generator seed it came from (``None``: one
    generator, or none) and its folder."""

    source: str
    generator_seed: int | None
    folder: Path


@dataclass(frozen=True)
class SweepRun:
    """One run of the sweep: a row of ``results.csv``."""

    model: str
    real_frac: float
    mode: str
    synthetic: SyntheticSet | None  # None: real only
    seed: int

    @property
    def source(self) -> str:
        return NO_SOURCE if self.synthetic is None else self.synthetic.source

    @property
    def generator_seed(self) -> int | None:
        return None if self.synthetic is None else self.synthetic.generator_seed

    @property
    def key(self) -> tuple:
        """The run's identity in ``results.csv`` (:data:`~diffcxr_aug.augment.results.RUN_KEY`, in that order)."""
        return (round(self.real_frac, 9), self.mode, self.source, self.generator_seed, self.model, self.seed)

    @property
    def name(self) -> str:
        return run_name(self.real_frac, self.mode, self.seed, self.source, self.generator_seed)


@dataclass(frozen=True)
class RunSettings:
    """How every run of a sweep trains: the section's settings resolved for this machine and data."""

    samples_per_epoch: int | None
    precision: str
    device: torch.device
    progress: bool


def train_run(
    d: SweepData,
    section: ClassifierSection,
    run: SweepRun,
    subset: Manifest,
    synth: Manifest | None,
    runs_dir: Path,
    how: RunSettings,
) -> tuple[torch.nn.Module, Any]:
    """Train one run's stages in turn (a shared synthetic-only stage is reused from disk); the model and the
    last stage's result."""
    with seeded(run.seed, how.device):
        model = create_classifier(
            run.model, len(d.label_names), pretrained=section.pretrained, pretrained_file=section.pretrained_file
        )
    result = None
    for stage in training_stages(run.mode, subset, synth):
        if not stage.shared:
            result = train_stage(model, d, section, run, stage, runs_dir / run.name / stage.name, how)
            continue
        # A stage that sees no real training image gives one model per seed and synthetic set, which serves every
        # real fraction (pretrain-finetune's pretraining, and synthetic-only). Locked: with several worker
        # processes a second run needing it waits for the first to train it, then reuses it.
        stage_dir = runs_dir / f"{_tagged(stage.name, run.source, run.generator_seed)}_seed{run.seed}"
        stage_dir.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(stage_dir.with_name(stage_dir.name + ".lock")):
            if (stage_dir / HISTORY_NAME).is_file():
                logger.info("Run %s: reusing the finished %s stage in %s", run.name, stage.name, stage_dir)
                model.load_state_dict(load_file(str(stage_dir / WEIGHTS_NAME)))
                result = TrainResult.from_history(stage_dir / HISTORY_NAME)
            else:
                result = train_stage(model, d, section, run, stage, stage_dir, how)
    return model, result


def train_stage(
    model: torch.nn.Module,
    d: SweepData,
    section: ClassifierSection,
    run: SweepRun,
    stage: Stage,
    stage_dir: Path,
    how: RunSettings,
) -> TrainResult:
    train_set = ConcatDataset(
        [
            CXRDataset(m, d.classifier_config.image_size, d.label_names, d.train_tf, progress=how.progress)
            for m in stage.manifests
        ]
    )
    epochs = section.pretrain_epochs if stage.name == "pretrain" and section.pretrain_epochs else section.epochs
    # Each stage starts from the seed (train_classifier seeds its draws), so its random draws do not depend on
    # whether an earlier stage ran in this process or was reused from disk.
    return train_classifier(
        model,
        train_set,
        d.val_set,
        stage_dir,
        d.classifier_config,
        epochs=epochs,
        batch_size=section.batch_size,
        learning_rate=section.learning_rate,
        weight_decay=section.weight_decay,
        patience=section.patience,
        uncertainty=section.uncertainty,
        samples_per_epoch=how.samples_per_epoch,
        device=how.device,
        mixed_precision=how.precision,
        seed=run.seed,
        num_workers=section.num_workers,
        evaluate_start=stage.evaluate_start,
        progress=how.progress,
        desc=f"{run.name} {stage.name}",
    )


@dataclass(frozen=True)
class SweepContext:
    """What a process needs to run any run of the sweep (picklable, for worker processes)."""

    data: Path
    out: Path
    section: ClassifierSection
    how: RunSettings
    root_model: str | None  # the model whose runs sit directly in runs/ (the others in runs/MODEL/)


def execute_run(run: SweepRun, context: SweepContext, d: SweepData, synthetic: dict) -> dict[str, Any]:
    """Train, test and score one run; its row of ``results.csv``. ``synthetic`` caches the synthetic manifests
    (by set and seed) across the runs of one process."""
    section, how = context.section, context.how
    synth = None
    if run.synthetic is not None:
        if (run.synthetic, run.seed) not in synthetic:
            synthetic[run.synthetic, run.seed] = load_synthetic(
                run.synthetic.folder, d.label_names, section.n_synthetic, seed=run.seed
            )
        synth = synthetic[run.synthetic, run.seed]
    if run.mode == SYNTHETIC_ONLY:
        subset = d.train.subset(d.train.frame.index[:0])
    else:
        subset = sample_real_fraction(d.train, run.real_frac, run.seed, d.label_names)
    runs_dir = context.out / "runs" / ("" if run.model == context.root_model else run.model)
    logger.info(
        "Run %s (%s): %d real + %d synthetic images",
        run.name,
        run.model,
        len(subset),
        0 if synth is None else len(synth),
    )
    run_dir = runs_dir / run.name
    # The real images this run trained on, for audits and paired analyses across modes.
    atomic_write_text(run_dir / "real_subset.txt", "".join(f"{p}\n" for p in subset.frame["image_path"]))
    start = time.perf_counter()
    model, result = train_run(d, section, run, subset, synth, runs_dir, how)
    y_true, y_score = predict(
        model,
        d.test_set,
        how.device,
        max(section.batch_size, 64),
        section.num_workers,
        how.progress,
        f"{run.name} test",
        mixed_precision=how.precision,
    )
    scores = pd.DataFrame(y_score, columns=d.label_names)
    scores.insert(0, "image_path", d.test_paths)
    with atomic_path(run_dir / "test_scores.csv") as tmp:
        scores.to_csv(tmp, index=False, float_format="%.6g")
    row = {
        "real_frac": run.real_frac,
        "n_real": len(subset),
        "n_synthetic": 0 if synth is None else len(synth),
        "mode": run.mode,
        "model": run.model,
        "seed": run.seed,
        **score_run(y_true, y_score, d.label_names, section, run.seed),
        "n_test": len(d.test_set),
        "val_mauc": result.best_val_mauc,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "steps": result.steps,
        "seconds": round(time.perf_counter() - start, 1),
        "source": run.source,
        "generator_seed": run.generator_seed,
    }
    if d.test_truth is not None:
        row.update(score_run(d.test_truth, y_score, d.label_names, section, run.seed, "truth"))
    return row


def run_all(todo: list[SweepRun], context: SweepContext, sweep_data: dict[str, SweepData]) -> Iterator[dict[str, Any]]:
    """The rows of ``todo``'s runs as they finish: in this process, one after another, or with
    ``classifier.workers`` > 1 in that many worker processes, each run in one of them (so the rows arrive in the
    order the runs finish; every run seeds itself, so which process ran it does not change it)."""
    workers = min(context.section.workers, len(todo))
    if workers <= 1:
        synthetic: dict = {}
        for run in todo:
            yield execute_run(run, context, sweep_data[run.model], synthetic)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    worker_context = dataclasses.replace(context, how=dataclasses.replace(context.how, progress=False))
    with ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(worker_context, threads),
    ) as pool:
        futures = [pool.submit(_worker_execute, run) for run in todo]
        for future in as_completed(futures):
            yield future.result()


_WORKER: dict[str, Any] = {}


def _start_worker(context: SweepContext, threads: int) -> None:
    # Each worker process takes its share of the cores: oversubscribed OpenMP threads stall at every barrier.
    torch.set_num_threads(threads)
    _WORKER.update(context=context, data={}, synthetic={})


def _worker_execute(run: SweepRun) -> dict[str, Any]:
    context, data = _WORKER["context"], _WORKER["data"]
    if run.model not in data:
        data[run.model] = load_sweep_data(context.data, context.section, run.model, progress=False)
    return execute_run(run, context, data[run.model], _WORKER["synthetic"])
