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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from diffcxr_aug.augment.mixing import MODES
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
from diffcxr_aug.augment.sweep_data import load_sweep_data
from diffcxr_aug.augment.sweep_runs import RunSettings, SweepContext, SweepRun, SyntheticSet, run_all, run_name
from diffcxr_aug.config import ClassifierSection
from diffcxr_aug.errors import InputError
from diffcxr_aug.io import atomic_write_json
from diffcxr_aug.runtime import resolve_device, resolve_mixed_precision

logger = logging.getLogger(__name__)

SUMMARY_NAME = "summary.md"
FIGURE_NAME = "mauc_vs_real_fraction.png"


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
_PLAN_KEYS = {"model", "real_fracs", "modes", "seeds", "num_workers", "workers", "synthetic", "metric"}


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


def _root_model(path: Path, models: list[str]) -> str | None:
    """The model whose runs sit directly in ``runs/`` (every other model's in ``runs/MODEL/``), fixed by the folder's
    first sweep so that a later call with other models never writes into its run folders: that sweep's only model,
    or ``None`` (each model in its own folder) when it ran several. Read from ``sweep.json``."""
    if not path.is_file():
        return models[0] if len(models) == 1 else None
    before = json.loads(path.read_text(encoding="utf-8"))
    if "runs_root_model" in before:
        return before["runs_root_model"]
    first = before.get("classifier", {}).get("model")  # a sweep.json from before the key: its call's models
    first = first if isinstance(first, list) else [first]
    return first[0] if len(first) == 1 else None


def models_of(section: ClassifierSection) -> list[str]:
    """The sweep's classifiers: ``classifier.model``, one name or a list."""
    return section.model if isinstance(section.model, list) else [section.model]


def _plan_runs(section: ClassifierSection, sets: list[SyntheticSet]) -> list[SweepRun]:
    """Every run of the sweep: model by model, and within a model seed by seed (so each seed's table fills first)."""
    plan = []
    for model in models_of(section):
        for seed in section.seeds:
            for frac in section.real_fracs:
                for mode in section.modes:
                    if mode == SYNTHETIC_ONLY:
                        continue
                    choices = [None] if mode == "real" else sets
                    plan += [SweepRun(model, frac, mode, item, seed) for item in choices]
            if SYNTHETIC_ONLY in section.modes:
                plan += [SweepRun(model, SYNTHETIC_ONLY_FRAC, SYNTHETIC_ONLY, item, seed) for item in sets]
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
    how = RunSettings(
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
    root_model = _root_model(out / "sweep.json", models)
    settings = {**_check_same_settings(out / "sweep.json", settings), "runs_root_model": root_model}
    atomic_write_json(out / "sweep.json", settings)
    title = f"{', '.join(models)} on {Path(first.train.source).parent.name}"

    plan = _plan_runs(section, sets)
    finished = _finished(read_results(results_path))
    todo = [run for run in plan if run.key not in finished]
    logger.info(
        "Sweep: %d runs planned, %d already in %s, %d to do", len(plan), len(plan) - len(todo), results_path, len(todo)
    )
    context = SweepContext(data=Path(data), out=out, section=section, how=how, root_model=root_model)
    bar = tqdm(total=len(todo), desc="sweep", disable=not progress, unit="run")
    for row in run_all(todo, context, sweep_data):
        frame = append_result(results_path, row, sweep_data[row["model"]].columns)
        logger.info(
            "Run %s (%s): test mAUC %.4f (95%% CI %.4f-%.4f)",
            run_name(row["real_frac"], row["mode"], row["seed"], row["source"], row["generator_seed"]),
            row["model"],
            row["mauc"],
            row["mauc_ci_low"],
            row["mauc_ci_high"],
        )
        _write_outputs(frame, out, title, section.metric)
        bar.update(1)
    bar.close()

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
