"""Classifier training over models x real fractions x modes x synthetic sources x seeds, with paired real subsets
and a resumable table.

For every ``(model, real_frac, mode, source, generator_seed, seed)`` the sweep draws the real subset (the same one
for every mode, see :mod:`diffcxr_aug.classifiers.subsample`), runs the mode's training stages, scores the best
checkpoint on the full real test split and appends one row to ``results.csv``. A row already there is not redone, so
an interrupted sweep finishes when rerun. ``summary.md`` and the figure are rewritten after every run.

A *source* is one named synthetic set (``generated``: the generator's images, ``ceiling``: perfect-generator
images, or any folder); the ``real`` mode has source ``none``. A source may hold one set per generator seed (a
recipe that trains several generators): each is run, and ``results.csv``'s ``generator_seed`` tells them apart.
Several sources train against the very same real subsets and real-only runs, so their gains over real-only are
paired. Every run draws the same number of images an epoch (``samples_per_epoch``: by default as many as the real
train split holds), so real-only at a low fraction repeats its films: the count-matched duplicate-real control.

Output folder::

    results.csv                       one row per run (:mod:`diffcxr_aug.augment.results`)
    summary.md                        mean ± std over runs, bootstrap CIs, paired gains over real-only
    mauc_vs_real_fraction.png         the sweep figure
    sweep.json                        the settings the sweep ran with
    runs/<run>/real_subset.txt        the real training images of the run
    runs/<run>/test_scores.csv        its test-set probabilities, one column per label (for paired analyses)
    runs/<run>/<stage>/               best checkpoint (model.safetensors + config.json) and history.json
    runs/pretrain-<source>_seed<s>/   pretrain-finetune: the synthetic-only pretraining, shared by all fractions

Runs of an unnamed synthetic folder (source ``synthetic``, as ``train-classifier --synthetic DIR`` gives) keep the
names without the source: ``frac0.1_mix_seed0``, ``pretrain_seed0``; a generator seed adds ``-g<S>`` to the source
(``frac0.01_mix-generated-g1_seed0``), and a sweep of several models keeps each model's runs in ``runs/<model>/``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file
from torch.utils.data import ConcatDataset
from tqdm.auto import tqdm

from diffcxr_aug.augment.mixing import MODES, load_synthetic, training_stages
from diffcxr_aug.augment.plots import plot_sweep
from diffcxr_aug.augment.results import (
    DEFAULT_SOURCE,
    NO_SOURCE,
    RESULTS_NAME,
    SYNTHETIC_ONLY,
    SYNTHETIC_ONLY_FRAC,
    append_result,
    read_results,
    scored_view,
)
from diffcxr_aug.augment.summary import write_summary
from diffcxr_aug.augment.sweep_data import SweepData, load_sweep_data, score_run
from diffcxr_aug.classifiers.models import WEIGHTS_NAME, create_classifier
from diffcxr_aug.classifiers.subsample import sample_real_fraction
from diffcxr_aug.classifiers.train import (
    HISTORY_NAME,
    TrainResult,
    predict,
    seeded,
    train_classifier,
)
from diffcxr_aug.config import ClassifierSection
from diffcxr_aug.data.dataset import CXRDataset
from diffcxr_aug.data.manifest import Manifest
from diffcxr_aug.errors import InputError
from diffcxr_aug.io import atomic_path, atomic_write_json, atomic_write_text
from diffcxr_aug.runtime import resolve_device, resolve_mixed_precision

logger = logging.getLogger(__name__)

SUMMARY_NAME = "summary.md"
FIGURE_NAME = "mauc_vs_real_fraction.png"


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


SyntheticArg = str | os.PathLike | Mapping[str, str | os.PathLike | Mapping[int, str | os.PathLike]] | None


def synthetic_sets(synthetic: SyntheticArg) -> list[SyntheticSet]:
    """The sweep's synthetic sets: a mapping of source names to a folder, or to ``{generator_seed: folder}``; one
    folder as source ``synthetic``; ``None`` as none."""
    if synthetic is None:
        return []
    if not isinstance(synthetic, Mapping):
        return [SyntheticSet(DEFAULT_SOURCE, None, Path(synthetic))]
    bad = [name for name in synthetic if name == NO_SOURCE or not name or "/" in name or " " in name]
    if bad:
        raise InputError(f"synthetic source names {bad} are not usable: no spaces or '/', and {NO_SOURCE!r} is taken")
    sets = []
    for name, value in synthetic.items():
        if isinstance(value, Mapping):
            sets += [SyntheticSet(str(name), int(seed), Path(folder)) for seed, folder in sorted(value.items())]
        else:
            sets.append(SyntheticSet(str(name), None, Path(value)))
    return sets


def _recorded_sources(sets: list[SyntheticSet]) -> dict[str, Any]:
    """The sets as ``sweep.json`` records them: name -> folder, or name -> {generator seed: folder}."""
    recorded: dict[str, Any] = {}
    for item in sets:
        folder = str(item.folder.resolve())
        if item.generator_seed is None:
            recorded[item.source] = folder
        else:
            recorded.setdefault(item.source, {})[str(item.generator_seed)] = folder
    return recorded


# Settings that may change between calls into one output folder: they choose which runs exist, not how a
# run is made (so a sweep can be extended with more models, fractions, modes or seeds, or resumed elsewhere).
# ``metric`` only chooses the score the summary shows: results.csv holds both.
_PLAN_KEYS = {"model", "real_fracs", "modes", "seeds", "num_workers", "synthetic", "metric"}


def _check_same_settings(path: Path, settings: dict) -> dict:
    """Refuse to add runs made with other settings to an existing sweep folder (its rows would not compare).

    Returns the settings to record: these, keeping the earlier synthetic sets (and models) this call does not name.
    """
    if not path.is_file():
        return settings
    before = json.loads(path.read_text(encoding="utf-8"))
    old_sources = before.get("synthetic") or {}
    if isinstance(old_sources, str):  # a sweep.json from before sources had names
        old_sources = {DEFAULT_SOURCE: old_sources}
    new_sources = settings["synthetic"]
    # The synthetic sets matter only when both sweeps used one: real-only rows do not depend on them.
    both_synthetic = bool(old_sources and new_sources)
    ignored = _PLAN_KEYS if both_synthetic else _PLAN_KEYS | {"n_synthetic", "pretrain_epochs"}
    old, new = before.get("classifier", {}), settings["classifier"]
    # A key newer than the folder's sweep.json, at its default, is how that sweep ran too.
    defaults = ClassifierSection().model_dump(mode="json")
    old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
    changed = [f"classifier.{k}" for k in sorted(set(old) | set(new)) if k not in ignored and old.get(k) != new.get(k)]
    if before.get("data") != settings["data"]:
        changed.append("data")
    # Sweeps from before the classifiers trained under autocast ran in fp32.
    if before.get("precision", "no") != settings["precision"]:
        changed.append(f"precision ({before.get('precision', 'no')} -> {settings['precision']})")
    old_configs = before.get("data_config") or {}
    if "input_size" in old_configs:  # a sweep.json from before sweeps had several models
        old_configs = {old["model"]: old_configs}
    changed += [
        f"data_config of {m}"
        for m in sorted(set(old_configs) & set(settings["data_config"]))
        if old_configs[m] != settings["data_config"][m]
    ]
    # A source may be added; one that keeps its name must keep its folder (a generator seed may be added too).
    for name in sorted(set(old_sources) & set(new_sources)):
        a, b = old_sources[name], new_sources[name]
        if isinstance(a, dict) and isinstance(b, dict):
            if any(a[seed] != b[seed] for seed in set(a) & set(b)):
                changed.append(f"synthetic source {name!r}")
        elif a != b:
            changed.append(f"synthetic source {name!r}")
    if changed:
        raise InputError(
            f"{path.parent} holds a sweep made with other settings ({', '.join(changed)} differ; see {path}); "
            "write to a fresh --out folder, or delete that folder to start over"
        )
    sources = {**old_sources}
    for name, value in new_sources.items():
        both = isinstance(value, dict) and isinstance(sources.get(name), dict)
        sources[name] = {**sources[name], **value} if both else value
    settings = {**settings, "synthetic": sources, "data_config": {**old_configs, **settings["data_config"]}}
    if old_sources and not new_sources:
        settings["classifier"] = {**new, **{k: old.get(k) for k in ("n_synthetic", "pretrain_epochs")}}
    return settings


@dataclass(frozen=True)
class _Run:
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


def models_of(section: ClassifierSection) -> list[str]:
    """The sweep's classifiers: ``classifier.model``, one name or a list."""
    return section.model if isinstance(section.model, list) else [section.model]


def _plan_runs(section: ClassifierSection, sets: list[SyntheticSet]) -> list[_Run]:
    """Every run of the sweep: model by model, and within a model seed by seed (so each seed's table fills first)."""
    plan = []
    for model in models_of(section):
        for seed in section.seeds:
            for frac in section.real_fracs:
                for mode in section.modes:
                    if mode == SYNTHETIC_ONLY:
                        continue
                    choices = [None] if mode == "real" else sets
                    plan += [_Run(model, frac, mode, item, seed) for item in choices]
            if SYNTHETIC_ONLY in section.modes:
                plan += [_Run(model, SYNTHETIC_ONLY_FRAC, SYNTHETIC_ONLY, item, seed) for item in sets]
    return plan


def _finished(results: pd.DataFrame) -> set[tuple]:
    """The keys of the runs ``results.csv`` already holds."""
    return {
        (
            round(float(r.real_frac), 9),
            str(r.mode),
            str(r.source),
            None if pd.isna(r.generator_seed) else int(r.generator_seed),
            str(r.model),
            int(r.seed),
        )
        for r in results.itertuples(index=False)
    }


def samples_per_epoch(section: ClassifierSection, n_train: int) -> int | None:
    """Images drawn per epoch: ``matched`` (the default) as many as the real train split holds (``n_train``), for
    every run, so that runs of one sweep take the same steps; ``one-pass`` one pass over each run's own data
    (``None``); or the number given."""
    if section.samples_per_epoch == "matched":
        return n_train
    if section.samples_per_epoch == "one-pass":
        return None
    return int(section.samples_per_epoch)


@dataclass(frozen=True)
class _Training:
    """How every run of a sweep trains: the section's settings resolved for this machine and data."""

    samples_per_epoch: int | None
    precision: str
    device: torch.device
    progress: bool


def _train_run(
    d: SweepData,
    section: ClassifierSection,
    run: _Run,
    subset: Manifest,
    synth: Manifest | None,
    runs_dir: Path,
    how: _Training,
) -> tuple[torch.nn.Module, Any]:
    """Train one run's stages in turn (a shared synthetic-only stage is reused from disk); the model and the
    last stage's result."""
    with seeded(run.seed, how.device):
        model = create_classifier(
            run.model, len(d.label_names), pretrained=section.pretrained, pretrained_file=section.pretrained_file
        )
    result = None
    for stage in training_stages(run.mode, subset, synth):
        if stage.shared:
            # A stage that sees no real training image gives one model per seed and synthetic set, which serves
            # every real fraction (pretrain-finetune's pretraining, and synthetic-only).
            stage_dir = runs_dir / f"{_tagged(stage.name, run.source, run.generator_seed)}_seed{run.seed}"
            if (stage_dir / HISTORY_NAME).is_file():
                logger.info("Run %s: reusing the finished %s stage in %s", run.name, stage.name, stage_dir)
                model.load_state_dict(load_file(str(stage_dir / WEIGHTS_NAME)))
                result = TrainResult.from_history(stage_dir / HISTORY_NAME)
                continue
        else:
            stage_dir = runs_dir / run.name / stage.name
        train_set = ConcatDataset(
            [
                CXRDataset(m, d.classifier_config.image_size, d.label_names, d.train_tf, progress=how.progress)
                for m in stage.manifests
            ]
        )
        epochs = section.pretrain_epochs if stage.name == "pretrain" and section.pretrain_epochs else section.epochs
        # Each stage starts from the seed (train_classifier seeds its draws), so its random draws do not depend on
        # whether an earlier stage ran in this process or was reused from disk.
        result = train_classifier(
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
    return model, result


def run_sweep(
    data: str | os.PathLike,
    out: str | os.PathLike,
    section: ClassifierSection,
    synthetic: SyntheticArg = None,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Train and test one classifier per ``(model, real_frac, mode, source, generator_seed, seed)`` of ``section``;
    resumable.

    Args:
        data: folder with the real ``manifest.csv`` (train, val and test splits).
        out: output folder (``results.csv``, ``summary.md``, the figure, checkpoints).
        section: the recipe's classifier section (models, fractions, modes, seeds, training settings).
        synthetic: folder with a synthetic manifest, or a mapping of source names to such folders (each synthetic
            mode runs once per source) or to ``{generator_seed: folder}`` (once per generator too), needed by the
            ``mix``, ``pretrain-finetune`` and ``synthetic-only`` modes.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        progress: show progress bars.

    Returns:
        The path of ``results.csv``.
    """
    torch_device = resolve_device(device)
    sets = synthetic_sets(synthetic)
    needs_synthetic = [m for m in section.modes if m != "real"]
    if needs_synthetic and not sets:
        raise InputError(f"modes {needs_synthetic} need synthetic images; pass --synthetic DIR or use mode 'real'")
    for mode in section.modes:
        if mode not in MODES:
            raise InputError(f"Unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    models = models_of(section)
    sweep_data = {model: load_sweep_data(data, section, model, progress) for model in models}
    first = sweep_data[models[0]]
    how = _Training(
        samples_per_epoch=samples_per_epoch(section, len(first.train)),
        # bf16 autocast (channels-last) ran test_resnet 6.7x and resnet18 3.0x faster a step on the project's
        # AVX512-BF16 CPU than fp32 (bench/classifier_step.py): auto takes it there too.
        precision=resolve_mixed_precision(section.mixed_precision, torch_device, cpu_auto="bf16"),
        device=torch_device,
        progress=progress,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_NAME
    settings = {
        "data": str(Path(data).resolve()),
        "synthetic": _recorded_sources(sets),
        "device": str(torch_device),
        "precision": how.precision,
        "data_config": {model: d.data_config for model, d in sweep_data.items()},
        "classifier": section.model_dump(mode="json"),
    }
    settings = _check_same_settings(out / "sweep.json", settings)
    atomic_write_json(out / "sweep.json", settings)
    title = f"{', '.join(models)} on {Path(first.train.source).parent.name}"

    plan = _plan_runs(section, sets)
    finished = _finished(read_results(results_path))
    todo = [run for run in plan if run.key not in finished]
    logger.info(
        "Sweep: %d runs planned, %d already in %s, %d to do", len(plan), len(plan) - len(todo), results_path, len(todo)
    )
    synthetic_manifests: dict[tuple[SyntheticSet, int], Manifest] = {}
    for run in tqdm(todo, desc="sweep", disable=not progress, unit="run"):
        d = sweep_data[run.model]
        synth = None
        if run.synthetic is not None:
            if (run.synthetic, run.seed) not in synthetic_manifests:
                synthetic_manifests[run.synthetic, run.seed] = load_synthetic(
                    run.synthetic.folder, d.label_names, section.n_synthetic, seed=run.seed
                )
            synth = synthetic_manifests[run.synthetic, run.seed]
        if run.mode == SYNTHETIC_ONLY:
            subset = d.train.subset(d.train.frame.index[:0])
        else:
            subset = sample_real_fraction(d.train, run.real_frac, run.seed, d.label_names)
        runs_dir = out / "runs" / (run.model if len(models) > 1 else "")
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
        model, result = _train_run(d, section, run, subset, synth, runs_dir, how)
        y_true, y_score = predict(
            model,
            d.test_set,
            torch_device,
            max(section.batch_size, 64),
            section.num_workers,
            progress,
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
        frame = append_result(results_path, row, d.columns)
        logger.info(
            "Run %s: test mAUC %.4f (95%% CI %.4f-%.4f)",
            run.name,
            row["mauc"],
            row["mauc_ci_low"],
            row["mauc_ci_high"],
        )
        _write_outputs(frame, out, title, section.metric)

    frame = read_results(results_path)
    if len(frame):  # also when nothing was left to run
        _write_outputs(frame, out, title, section.metric)
    return results_path


def _write_outputs(results: pd.DataFrame, out: Path, title: str, metric: str) -> None:
    view = scored_view(results, metric)
    scored = "scored against the world's truth" if metric == "truth" else ""
    write_summary(view, out / SUMMARY_NAME, title=title, scored=scored)
    plot_sweep(view, out / FIGURE_NAME)


def load_sweep_settings(out: str | os.PathLike) -> dict:
    """The settings a sweep in ``out`` ran with (``sweep.json``)."""
    return json.loads((Path(out) / "sweep.json").read_text(encoding="utf-8"))
