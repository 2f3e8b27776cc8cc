"""Classifier training over real fractions x modes x synthetic sources x seeds, with paired real subsets and a
resumable table.

For every ``(real_frac, mode, source, seed)`` the sweep draws the real subset (the same one for every mode, see
:mod:`diffcxr_aug.classifiers.subsample`), runs the mode's training stages, scores the best checkpoint on
the full real test split and appends one row to ``results.csv``. A row already there is not redone, so
an interrupted sweep finishes when rerun. ``summary.md`` and the figure are rewritten after every run.

A *source* is one named synthetic set (``generated``: the generator's images, ``ceiling``: perfect-generator
images, or any folder); the ``real`` mode has source ``none``. Several sources train against the very same
real subsets and real-only runs, so their gains over real-only are paired.

Output folder::

    results.csv                       one row per run (schema in shared/CONTRACT.md, extra columns after:
                                      bootstrap CI, labels scored, test size, best validation mAUC, its
                                      epoch, epochs run and optimiser steps of the run's last stage
                                      (pretraining: runs/pretrain-<source>_seed<s>/history.json), seconds,
                                      source (the name of the synthetic set; none for real-only runs))
    summary.md                        mean ± std over seeds, bootstrap CIs, paired gains over real-only
    mauc_vs_real_fraction.png         the sweep figure
    sweep.json                        the settings the sweep ran with
    runs/<run>/real_subset.txt        the real training images of the run
    runs/<run>/test_scores.csv        its test-set probabilities, one column per label (for paired analyses)
    runs/<run>/<stage>/               best checkpoint (model.safetensors + config.json) and history.json
    runs/pretrain-<source>_seed<s>/   pretrain-finetune: the synthetic-only pretraining, shared by all fractions

Runs of an unnamed synthetic folder (source ``synthetic``, as ``train-classifier --synthetic DIR`` gives) keep the
names without the source: ``frac0.1_mix_seed0``, ``pretrain_seed0``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from torch.utils.data import ConcatDataset
from tqdm.auto import tqdm

from diffcxr_aug.augment.mixing import MODES, load_synthetic, training_stages
from diffcxr_aug.classifiers.metrics import bootstrap_mauc_ci, mask_thin_labels, per_label_auc, scorable_labels
from diffcxr_aug.classifiers.models import WEIGHTS_NAME, ClassifierConfig, create_classifier, data_config
from diffcxr_aug.classifiers.subsample import sample_real_fraction
from diffcxr_aug.classifiers.train import (
    HISTORY_NAME,
    TrainResult,
    build_transforms,
    predict,
    seeded,
    train_classifier,
)
from diffcxr_aug.config import ClassifierSection
from diffcxr_aug.data.dataset import CXRDataset
from diffcxr_aug.data.manifest import Manifest, read_manifest
from diffcxr_aug.data.phantom.findings import findings_in, truth_labels
from diffcxr_aug.errors import InputError
from diffcxr_aug.io import atomic_path, atomic_write_json, atomic_write_text
from diffcxr_aug.runtime import resolve_device

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.csv"
SUMMARY_NAME = "summary.md"
FIGURE_NAME = "mauc_vs_real_fraction.png"
# The contract's columns come first, then one AUC per label, then this sweep's extras.
BASE_COLUMNS = ["real_frac", "n_real", "n_synthetic", "mode", "model", "seed", "mauc"]
EXTRA_COLUMNS = [
    "mauc_ci_low",
    "mauc_ci_high",
    "n_labels_scored",
    "n_test",
    "val_mauc",
    "best_epoch",
    "epochs_run",
    "steps",
    "seconds",
    "source",
]
# Scored against the world's truth (phantom data only): the same as mauc, its CI and labels scored.
TRUTH_COLUMNS = ["mauc_truth", "mauc_truth_ci_low", "mauc_truth_ci_high", "n_labels_truth"]
RUN_KEY = ["real_frac", "mode", "source", "model", "seed"]
NO_SOURCE = "none"  # the source of real-only runs
DEFAULT_SOURCE = "synthetic"  # the name of a synthetic folder given without one


def result_columns(label_names: list[str], truth: bool = False) -> list[str]:
    """The table's columns; with ``truth``, the scores against the phantom world's truth follow."""
    columns = BASE_COLUMNS + [f"auc_{name}" for name in label_names] + EXTRA_COLUMNS
    if truth:
        columns += TRUTH_COLUMNS + [f"auc_truth_{name}" for name in label_names]
    return columns


def _tagged(name: str, source: str) -> str:
    # An unnamed synthetic folder keeps the names sweeps used before sources had names (so they resume).
    return name if source in (NO_SOURCE, DEFAULT_SOURCE) else f"{name}-{source}"


def run_name(real_frac: float, mode: str, seed: int, source: str = NO_SOURCE) -> str:
    return f"frac{real_frac:g}_{_tagged(mode, source)}_seed{seed}"


def synthetic_sources(synthetic: str | os.PathLike | Mapping[str, str | os.PathLike] | None) -> dict[str, Path]:
    """Named synthetic folders: a mapping as given, one folder as ``{"synthetic": folder}``, ``None`` as none."""
    if synthetic is None:
        return {}
    if isinstance(synthetic, Mapping):
        sources = {str(name): Path(path) for name, path in synthetic.items()}
    else:
        sources = {DEFAULT_SOURCE: Path(synthetic)}
    bad = [name for name in sources if name == NO_SOURCE or not name or "/" in name or " " in name]
    if bad:
        raise InputError(f"synthetic source names {bad} are not usable: no spaces or '/', and {NO_SOURCE!r} is taken")
    return sources


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """``results.csv`` as a frame (empty when the file does not exist yet).

    A table written before sweeps had sources gains its ``source`` column: ``none`` for real-only rows and
    ``synthetic`` (the name of an unnamed synthetic folder) for the others.
    """
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=BASE_COLUMNS + ["source"])
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    if "source" not in frame.columns:
        frame["source"] = np.where(frame["mode"] == "real", NO_SOURCE, DEFAULT_SOURCE)
    return frame


def append_result(path: Path, row: dict, columns: list[str]) -> pd.DataFrame:
    """Add one row to ``results.csv``, rewriting the file atomically (a crash never leaves half a table)."""
    frame = read_results(path)
    if len(frame) and list(frame.columns) != columns:
        raise InputError(
            f"{path} holds runs with other columns (another label set or an older version); "
            "write this sweep to a fresh --out folder"
        )
    new = pd.DataFrame([row], columns=columns)
    frame = pd.concat([frame, new], ignore_index=True) if len(frame) else new
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    return frame


def _check_split(manifest: Manifest, split: str, label_names: list[str]) -> Manifest:
    part = manifest.split(split)
    if len(part) == 0:
        raise InputError(f"{manifest.source}: the {split} split is empty; the sweep needs train, val and test rows")
    if split != "train" and not scorable_labels(part.labels(label_names)).any():
        raise InputError(
            f"{manifest.source}: no label has both a positive and a negative in the {split} split, so its mAUC "
            "is undefined; give that split more images"
        )
    return part


# Settings that may change between calls into one output folder: they choose which runs exist, not how a
# run is made (so a sweep can be extended with more fractions, modes or seeds, or resumed elsewhere).
# ``metric`` only chooses the score the summary shows: results.csv holds both.
_PLAN_KEYS = {"real_fracs", "modes", "seeds", "num_workers", "synthetic", "metric"}


def _check_same_settings(path: Path, settings: dict) -> dict:
    """Refuse to add runs made with other settings to an existing sweep folder (its rows would not compare).

    Returns the settings to record: these, keeping the earlier synthetic set when this call has none.
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
    for key in ("data", "data_config"):
        if before.get(key) != settings[key]:
            changed.append(key)
    # A source may be added; one that keeps its name must keep its folder.
    changed += [
        f"synthetic source {n!r}"
        for n in sorted(set(old_sources) & set(new_sources))
        if old_sources[n] != new_sources[n]
    ]
    if changed:
        raise InputError(
            f"{path.parent} holds a sweep made with other settings ({', '.join(changed)} differ; see {path}); "
            "write to a fresh --out folder, or delete that folder to start over"
        )
    settings = {**settings, "synthetic": {**old_sources, **new_sources}}
    if old_sources and not new_sources:
        settings["classifier"] = {**new, **{k: old.get(k) for k in ("n_synthetic", "pretrain_epochs")}}
    return settings


SYNTHETIC_ONLY = "synthetic-only"
# synthetic-only runs train on no real image: one run per source and seed, recorded at real fraction 0.
SYNTHETIC_ONLY_FRAC = 0.0


@dataclass
class _SweepData:
    """What every run of one sweep shares: the real splits, the image pipeline and the test truth."""

    train: Manifest
    label_names: list[str]
    data_config: dict[str, Any]
    classifier_config: ClassifierConfig
    train_tf: Any
    val_set: CXRDataset
    test_set: CXRDataset
    test_paths: np.ndarray
    # The phantom world's truth for the test split (every label 1 or 0), or None for data without it.
    test_truth: np.ndarray | None
    columns: list[str]


def split_truth(manifest: Manifest, label_names: list[str]) -> np.ndarray | None:
    """``(images, labels)`` truth of a phantom split from its ``meta_findings`` column; None without that column.

    Labels the world does not know (any outside the 14 CheXpert labels) are NaN (not scored).
    """
    if "meta_findings" not in manifest.frame.columns:
        return None
    rows = []
    for number, text in zip(manifest.frame.index, manifest.frame["meta_findings"].fillna(""), strict=True):
        try:
            labels = truth_labels(findings_in(text))
        except ValueError as error:
            raise InputError(f"{manifest.source} row {number + 2}, meta_findings: {error}") from None
        rows.append([labels.get(name, np.nan) for name in label_names])
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(label_names))


def _load_sweep_data(data: str | os.PathLike, section: ClassifierSection, progress: bool) -> _SweepData:
    real = read_manifest(data)
    label_names = real.label_names
    if not label_names:
        raise InputError(f"{real.source}: no label columns; a classifier needs at least one")
    train_split = _check_split(real, "train", label_names)
    val_split = _check_split(real, "val", label_names)
    test_split = _check_split(real, "test", label_names)
    truth = split_truth(test_split, label_names)
    if section.metric == "truth" and truth is None:
        raise InputError(
            f"{real.source}: classifier.metric 'truth' scores against the phantom world's truth, but the manifest "
            "has no meta_findings column (not a phantom dataset); use metric 'report'"
        )
    # The model's data config fixes the image size and normalisation for every run.
    probe = create_classifier(section.model, len(label_names), pretrained=False)
    config = data_config(probe, section.image_size)
    del probe
    size = int(config["input_size"][-1])
    classifier_config = ClassifierConfig(
        model=section.model,
        label_names=label_names,
        image_size=size,
        mean=float(config["mean"][0]),
        std=float(config["std"][0]),
    )
    eval_tf = build_transforms(config["mean"], config["std"], train=False)
    return _SweepData(
        train=train_split,
        label_names=label_names,
        data_config=json.loads(json.dumps(config)),
        classifier_config=classifier_config,
        train_tf=build_transforms(
            config["mean"], config["std"], train=True, augment=section.augment, hflip=section.hflip
        ),
        val_set=CXRDataset(val_split, size, label_names, transform=eval_tf, progress=progress),
        test_set=CXRDataset(test_split, size, label_names, transform=eval_tf, progress=progress),
        test_paths=test_split.frame["image_path"].to_numpy(),
        test_truth=truth,
        columns=result_columns(label_names, truth=truth is not None),
    )


def _plan_runs(section: ClassifierSection, sources: Mapping[str, Path]) -> list[tuple[float, str, str, int]]:
    """Every ``(real_frac, mode, source, seed)`` of the sweep, seed by seed (so each seed's table fills first)."""
    plan = []
    for seed in section.seeds:
        for frac in section.real_fracs:
            for mode in section.modes:
                if mode == SYNTHETIC_ONLY:
                    continue
                plan += [(frac, mode, src, seed) for src in ([NO_SOURCE] if mode == "real" else list(sources))]
        if SYNTHETIC_ONLY in section.modes:
            plan += [(SYNTHETIC_ONLY_FRAC, SYNTHETIC_ONLY, src, seed) for src in sources]
    return plan


def _score(
    y_true: np.ndarray, y_score: np.ndarray, names: list[str], section: ClassifierSection, seed: int, kind: str = ""
) -> dict[str, Any]:
    """mAUC, its bootstrap CI, labels scored and per-label AUCs over the labels with ``min_label_support`` of each
    class; ``kind`` ``truth`` names the columns of the scores against the world's truth (``mauc_truth``, ...)."""
    y_true = mask_thin_labels(y_true, section.min_label_support)
    aucs = per_label_auc(y_true, y_score, names)
    low = high = math.nan
    if aucs.scored:
        low, high = bootstrap_mauc_ci(
            y_true, y_score, n_bootstrap=section.n_bootstrap, rng=np.random.default_rng(seed)
        )
    mauc, auc = ("mauc_truth", "auc_truth_") if kind == "truth" else ("mauc", "auc_")
    return {
        mauc: aucs.mauc,
        **{f"{auc}{n}": aucs.per_label[n] for n in names},
        f"{mauc}_ci_low": low,
        f"{mauc}_ci_high": high,
        "n_labels_truth" if kind == "truth" else "n_labels_scored": len(aucs.scored),
    }


def _train_run(
    d: _SweepData,
    section: ClassifierSection,
    name: str,
    mode: str,
    source: str,
    seed: int,
    subset: Manifest,
    synth: Manifest | None,
    out: Path,
    device: torch.device,
    progress: bool,
) -> tuple[torch.nn.Module, Any]:
    """Train one run's stages in turn (a shared synthetic-only stage is reused from disk); the model and the
    last stage's result."""
    run_dir = out / "runs" / name
    with seeded(seed, device):
        model = create_classifier(
            section.model, len(d.label_names), pretrained=section.pretrained, pretrained_file=section.pretrained_file
        )
    result = None
    for stage in training_stages(mode, subset, synth):
        if stage.shared:
            # A stage that sees no real training image gives one model per seed and source, which serves every
            # real fraction (pretrain-finetune's pretraining, and synthetic-only).
            stage_dir = out / "runs" / f"{_tagged(stage.name, source)}_seed{seed}"
            if (stage_dir / HISTORY_NAME).is_file():
                logger.info("Run %s: reusing the finished %s stage in %s", name, stage.name, stage_dir)
                model.load_state_dict(load_file(str(stage_dir / WEIGHTS_NAME)))
                result = TrainResult.from_history(stage_dir / HISTORY_NAME)
                continue
        else:
            stage_dir = run_dir / stage.name
        train_set = ConcatDataset(
            [
                CXRDataset(m, d.classifier_config.image_size, d.label_names, transform=d.train_tf, progress=progress)
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
            samples_per_epoch=section.samples_per_epoch,
            device=device,
            seed=seed,
            num_workers=section.num_workers,
            evaluate_start=stage.evaluate_start,
            progress=progress,
            desc=f"{name} {stage.name}",
        )
    return model, result


def run_sweep(
    data: str | os.PathLike,
    out: str | os.PathLike,
    section: ClassifierSection,
    synthetic: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Train and test one classifier per ``(real_frac, mode, source, seed)`` of ``section``; resumable.

    Args:
        data: folder with the real ``manifest.csv`` (train, val and test splits).
        out: output folder (``results.csv``, ``summary.md``, the figure, checkpoints).
        section: the recipe's classifier section (model, fractions, modes, seeds, training settings).
        synthetic: folder with a synthetic manifest, or a mapping of source names to such folders (each
            synthetic mode runs once per source), needed by the ``mix``, ``pretrain-finetune`` and
            ``synthetic-only`` modes.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        progress: show progress bars.

    Returns:
        The path of ``results.csv``.
    """
    torch_device = resolve_device(device)
    sources = synthetic_sources(synthetic)
    needs_synthetic = [m for m in section.modes if m != "real"]
    if needs_synthetic and not sources:
        raise InputError(f"modes {needs_synthetic} need synthetic images; pass --synthetic DIR or use mode 'real'")
    for mode in section.modes:
        if mode not in MODES:
            raise InputError(f"Unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    d = _load_sweep_data(data, section, progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_NAME
    settings = {
        "data": str(Path(data).resolve()),
        "synthetic": {name: str(folder.resolve()) for name, folder in sources.items()},
        "device": str(torch_device),
        "data_config": d.data_config,
        "classifier": section.model_dump(mode="json"),
    }
    settings = _check_same_settings(out / "sweep.json", settings)
    atomic_write_json(out / "sweep.json", settings)
    title = f"{section.model} on {Path(d.train.source).parent.name}"

    plan = _plan_runs(section, sources)
    finished = {
        (round(float(r.real_frac), 9), str(r.mode), str(r.source), str(r.model), int(r.seed))
        for r in read_results(results_path).itertuples(index=False)
    }
    todo = [(f, m, src, s) for f, m, src, s in plan if (round(f, 9), m, src, section.model, s) not in finished]
    logger.info(
        "Sweep: %d runs planned, %d already in %s, %d to do", len(plan), len(plan) - len(todo), results_path, len(todo)
    )
    synthetic_sets: dict[tuple[str, int], Manifest] = {}
    for real_frac, mode, source, seed in tqdm(todo, desc="sweep", disable=not progress, unit="run"):
        synth = None
        if mode != "real":
            if (source, seed) not in synthetic_sets:
                synthetic_sets[source, seed] = load_synthetic(
                    sources[source], d.label_names, section.n_synthetic, seed=seed
                )
            synth = synthetic_sets[source, seed]
        if mode == SYNTHETIC_ONLY:
            subset = d.train.subset(d.train.frame.index[:0])
        else:
            subset = sample_real_fraction(d.train, real_frac, seed, d.label_names)
        name = run_name(real_frac, mode, seed, source)
        logger.info("Run %s: %d real + %d synthetic images", name, len(subset), 0 if synth is None else len(synth))
        run_dir = out / "runs" / name
        # The real images this run trained on, for audits and paired analyses across modes.
        atomic_write_text(run_dir / "real_subset.txt", "".join(f"{p}\n" for p in subset.frame["image_path"]))
        start = time.perf_counter()
        model, result = _train_run(d, section, name, mode, source, seed, subset, synth, out, torch_device, progress)
        y_true, y_score = predict(
            model, d.test_set, torch_device, max(section.batch_size, 64), section.num_workers, progress, f"{name} test"
        )
        scores = pd.DataFrame(y_score, columns=d.label_names)
        scores.insert(0, "image_path", d.test_paths)
        with atomic_path(run_dir / "test_scores.csv") as tmp:
            scores.to_csv(tmp, index=False, float_format="%.6g")
        row = {
            "real_frac": real_frac,
            "n_real": len(subset),
            "n_synthetic": 0 if synth is None else len(synth),
            "mode": mode,
            "model": section.model,
            "seed": seed,
            **_score(y_true, y_score, d.label_names, section, seed),
            "n_test": len(d.test_set),
            "val_mauc": result.best_val_mauc,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "steps": result.steps,
            "seconds": round(time.perf_counter() - start, 1),
            "source": source,
        }
        if d.test_truth is not None:
            row.update(_score(d.test_truth, y_score, d.label_names, section, seed, "truth"))
        frame = append_result(results_path, row, d.columns)
        logger.info(
            "Run %s: test mAUC %.4f (95%% CI %.4f-%.4f)", name, row["mauc"], row["mauc_ci_low"], row["mauc_ci_high"]
        )
        _write_outputs(frame, out, title, section.metric)

    frame = read_results(results_path)
    if len(frame):  # also when nothing was left to run
        _write_outputs(frame, out, title, section.metric)
    return results_path


def scored_view(results: pd.DataFrame, metric: str = "report") -> pd.DataFrame:
    """``results`` as the summary, the gains and the plot read them: with ``metric`` ``truth``, ``mauc``, its CI,
    labels scored and the per-label AUCs are those against the world's truth (the report-derived mAUC stays as
    ``mauc_report``); with ``report``, the table as it is."""
    if metric != "truth":
        return results
    if "mauc_truth" not in results.columns:
        raise InputError("metric 'truth': these results hold no scores against the truth (not phantom data)")
    view = results.drop(
        columns=[c for c in results.columns if c.startswith("auc_") and not c.startswith("auc_truth_")]
    )
    view = view.rename(
        columns={
            "mauc": "mauc_report",
            "mauc_ci_low": "mauc_report_ci_low",
            "mauc_ci_high": "mauc_report_ci_high",
            "n_labels_scored": "n_labels_report",
        }
    )
    renames = {c: "auc_" + c[len("auc_truth_") :] for c in view.columns if c.startswith("auc_truth_")}
    renames.update(
        {
            "mauc_truth": "mauc",
            "mauc_truth_ci_low": "mauc_ci_low",
            "mauc_truth_ci_high": "mauc_ci_high",
            "n_labels_truth": "n_labels_scored",
        }
    )
    return view.rename(columns=renames)


def _write_outputs(results: pd.DataFrame, out: Path, title: str, metric: str) -> None:
    from diffcxr_aug.augment.plots import plot_sweep

    view = scored_view(results, metric)
    scored = "scored against the world's truth" if metric == "truth" else ""
    write_summary(view, out / SUMMARY_NAME, title=title, scored=scored)
    plot_sweep(view, out / FIGURE_NAME)


def _with_source(results: pd.DataFrame) -> pd.DataFrame:
    if "source" in results.columns:
        return results
    return results.assign(source=np.where(results["mode"] == "real", NO_SOURCE, DEFAULT_SOURCE))


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """One row per ``(real_frac, mode, source)``: seeds, mean sizes, mAUC mean and std over seeds, mean CI bounds."""
    results = _with_source(results)
    grouped = results.groupby(["real_frac", "mode", "source"], sort=True)
    table = grouped.agg(
        seeds=("seed", "nunique"),
        n_real=("n_real", "mean"),
        n_synthetic=("n_synthetic", "mean"),
        mauc_mean=("mauc", "mean"),
        mauc_std=("mauc", "std"),
        ci_low=("mauc_ci_low", "mean"),
        ci_high=("mauc_ci_high", "mean"),
    ).reset_index()
    table["mauc_std"] = table["mauc_std"].fillna(0.0)
    order = {m: i for i, m in enumerate(MODES)}
    return table.sort_values(
        ["real_frac", "mode", "source"], key=lambda c: c.map(order) if c.name == "mode" else c
    ).reset_index(drop=True)


def paired_gains(results: pd.DataFrame) -> pd.DataFrame:
    """Synthetic modes (per source) against real-only at the same fraction and seed (paired: same real subset).

    Columns: ``gain_mean``/``gain_std`` of the per-seed differences, ``outside_spread`` (the mode's mean
    minus its std lies above the real-only mean plus its std, i.e. the seed error bars do not overlap;
    ``-1`` when it lies below, ``0`` when they overlap), ``kept_start`` (runs whose best checkpoint is
    the starting point of their last stage: for ``pretrain-finetune``, fine-tuning never beat the
    synthetic-only model on validation), ``gap_closed``: the share of the gap between real-only at this fraction
    and real-only at fraction 1.0 that the mode closes (ratio of the means), and ``gap_closed_std``: the standard
    deviation of the same share computed seed by seed (each seed's run against the same seed's two real-only runs).
    ``against`` is the real-only fraction compared with: the run's own, or 1.0 (all real) for ``synthetic-only``,
    which trains on no real image.
    """
    results = _with_source(results)
    real = results[results["mode"] == "real"].set_index(["real_frac", "seed"])["mauc"]
    stats = summarize(results).set_index(["real_frac", "mode", "source"])
    all_real = stats["mauc_mean"].get((1.0, "real", NO_SOURCE), math.nan)
    rows = []
    synthetic_runs = results[results["mode"] != "real"]
    for (frac, mode, source), group in synthetic_runs.groupby(["real_frac", "mode", "source"]):
        against = 1.0 if mode == "synthetic-only" else frac
        paired = [(r.mauc - real[(against, r.seed)]) for r in group.itertuples() if (against, r.seed) in real.index]
        if not paired:
            continue
        mode_mean, mode_std = stats.loc[(frac, mode, source), ["mauc_mean", "mauc_std"]]
        real_mean, real_std = stats.loc[(against, "real", NO_SOURCE), ["mauc_mean", "mauc_std"]]
        per_seed = [
            (r.mauc - real[(against, r.seed)]) / (real[(1.0, r.seed)] - real[(against, r.seed)])
            for r in group.itertuples()
            if against < 1.0 and (1.0, r.seed) in real.index and (against, r.seed) in real.index
            and real[(1.0, r.seed)] > real[(against, r.seed)]
        ]  # fmt: skip
        if mode_mean - mode_std > real_mean + real_std:
            outside = 1
        elif mode_mean + mode_std < real_mean - real_std:
            outside = -1
        else:
            outside = 0
        gap = all_real - real_mean
        rows.append(
            {
                "real_frac": frac,
                "mode": mode,
                "source": source,
                "against": against,
                "pairs": len(paired),
                "gain_mean": float(np.mean(paired)),
                "gain_std": float(np.std(paired, ddof=1)) if len(paired) > 1 else 0.0,
                "outside_spread": outside,
                "kept_start": int((group["best_epoch"] == 0).sum()) if "best_epoch" in group else 0,
                "gap_closed": float((mode_mean - real_mean) / gap) if against < 1.0 and gap > 0 else math.nan,
                "gap_closed_std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan,
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "real_frac",
            "mode",
            "source",
            "against",
            "pairs",
            "gain_mean",
            "gain_std",
            "outside_spread",
            "kept_start",
            "gap_closed",
            "gap_closed_std",
        ],
    )


def per_label_gains(results: pd.DataFrame, real_frac: float) -> pd.DataFrame:
    """Per-label paired AUC gains at ``real_frac``: for each synthetic mode and source, the mean and standard
    deviation over seeds of (its AUC - real-only's AUC, same seed) for every label; one row per label, columns
    ``(mode, source, "mean" | "std")``. Labels not scored in a run (too few of one class) are left out of its
    pairs."""
    results = _with_source(results)
    labels = [c for c in results.columns if c.startswith("auc_")]
    at = results[results["real_frac"] == real_frac]
    real = at[at["mode"] == "real"].set_index("seed")[labels]
    columns = {}
    for (mode, source), group in at[at["mode"] != "real"].groupby(["mode", "source"]):
        runs = group.set_index("seed")[labels]
        diffs = runs - real.reindex(runs.index)
        columns[(mode, source, "mean")] = diffs.mean()
        columns[(mode, source, "std")] = diffs.std(ddof=1)
    frame = pd.DataFrame(columns)
    frame.index = [label[len("auc_") :] for label in frame.index]
    return frame


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


SOURCE_ORDER = ("generated", "dkim", "dkim-balanced", "ceiling")  # the headline's columns, then any other source


def _mean_std(mean: float, std: float) -> str:
    return f"{_fmt(mean)} ± {_fmt(std)}"


def _gap_closed_text(gap_closed: float, gap_closed_std: float) -> str:
    """``74% ± 8%`` (the share of the gap closed, ± its seed-by-seed std when known); ``""`` when there is no gap."""
    if math.isnan(gap_closed):
        return ""
    return f"{100 * gap_closed:.0f}%" + ("" if math.isnan(gap_closed_std) else f" ± {100 * gap_closed_std:.0f}%")


def headline_markdown(results: pd.DataFrame) -> str:
    """The two headline tables (the README's front page shows them as they are): test mAUC, and the paired gain
    over real-only with the share of the gap to all real it closes, one row per real fraction x synthetic mode
    (and the ``synthetic-only`` row), one column per synthetic source.

    Gains in **bold** lie outside the seed spread (the ± std bars of the mode and of real-only do not overlap);
    "(worse)" marks one outside the spread below real-only. ``synthetic-only`` trains on no real image and is
    compared with all real.
    """
    results = _with_source(results)
    if not (results["mode"] != "real").any():
        return ""
    stats = summarize(results).set_index(["real_frac", "mode", "source"])
    gains = paired_gains(results).set_index(["real_frac", "mode", "source"])
    present = set(results.loc[results["mode"] != "real", "source"])
    sources = [s for s in SOURCE_ORDER if s in present] + sorted(present - set(SOURCE_ORDER))
    modes = [m for m in MODES if m not in ("real", SYNTHETIC_ONLY) and m in set(results["mode"])]
    fracs = sorted(f for f in results.loc[results["mode"] == "real", "real_frac"].unique())
    rows = [(f, m) for f in fracs for m in modes]
    if SYNTHETIC_ONLY in set(results["mode"]):
        rows.append((SYNTHETIC_ONLY_FRAC, SYNTHETIC_ONLY))

    def real_only(frac: float) -> str:
        key = (frac, "real", NO_SOURCE)
        if key not in stats.index:
            return "n/a"
        return _mean_std(*stats.loc[key, ["mauc_mean", "mauc_std"]])

    def n_real(frac: float) -> str:
        key = (frac, "real", NO_SOURCE)
        return f"{stats.loc[key, 'n_real']:,.0f}" if key in stats.index else "0"

    columns, rule = " | ".join(sources) + " |", "---|" * len(sources)
    mauc = [f"| real fraction | n real | mode | real only | {columns}", f"|---:|---:|---|---|{rule}"]
    gain = [f"| real fraction | n real | mode | {columns}", f"|---:|---:|---|{rule}"]
    for frac, mode in rows:
        control = f"all real: {real_only(1.0)}" if mode == SYNTHETIC_ONLY else real_only(frac)
        cells, gain_cells = [], []
        for source in sources:
            key = (frac, mode, source)
            cells.append(_mean_std(*stats.loc[key, ["mauc_mean", "mauc_std"]]) if key in stats.index else "–")
            if key not in gains.index:
                gain_cells.append("–")
                continue
            g = gains.loc[key]
            text = f"{g.gain_mean:+.3f} ± {g.gain_std:.3f}"
            closed = _gap_closed_text(g.gap_closed, g.gap_closed_std)
            text += f", {closed}" if closed else ""
            text = {1: f"**{text}**", -1: f"{text} (worse)", 0: text}[int(g.outside_spread)]
            gain_cells.append(text)
        name = "synthetic only (no real image)" if mode == SYNTHETIC_ONLY else mode
        lead = f"| {frac:g} | {n_real(frac)} | {name} |"
        mauc.append(f"{lead} {control} | " + " | ".join(cells) + " |")
        gain.append(f"{lead} " + " | ".join(gain_cells) + " |")
    lines = [
        "Test mAUC, mean ± std over seeds (real only at the same fraction is the count-matched duplicate-real "
        "control):",
        "",
        *mauc,
        "",
        "Paired gain over real only at the same fraction (synthetic only: over all real), mean ± std over seeds, and "
        "the share of the gap from real only to all real that it closes (± its seed-by-seed std); **bold**: outside "
        "the seed spread:",
        "",
        *gain,
    ]
    return "\n".join(lines) + "\n"


def summary_markdown(results: pd.DataFrame, title: str = "", scored: str = "") -> str:
    """The sweep's ``summary.md``: the headline tables, the mAUC table, paired gains over real-only and per-label
    AUCs.

    ``scored`` says what the labels were scored against when it is not the test reports (see :func:`scored_view`).
    """
    stats = summarize(results)
    lines = [f"# Classifier sweep{': ' + title if title else ''}", ""]
    headline = headline_markdown(results)
    n_test = int(results["n_test"].iloc[0]) if "n_test" in results and len(results) else 0
    lines += [
        f"{len(results)} runs. Test: the full real test split ({n_test} images), "
        f"{scored or 'scored against the labels of the test reports'}. mAUC is the mean ROC AUC over the scored "
        "labels (both classes present, at "
        "least classifier.min_label_support of each; see the per-label table); ± is the standard deviation over "
        "seeds; the CI is the 95% bootstrap interval over test images, averaged over seeds. synthetic-only runs "
        "(real fraction 0) train on no real image.",
        "",
        *(["## Headline", "", headline.rstrip("\n"), "", "## Every cell", ""] if headline else []),
        "| real fraction | mode | source | n real | n synthetic | seeds | mAUC (mean ± std) | bootstrap 95% CI |",
        "|---:|---|---|---:|---:|---:|---|---|",
    ]
    for r in stats.itertuples():
        lines.append(
            f"| {r.real_frac:g} | {r.mode} | {r.source} | {r.n_real:.0f} | {r.n_synthetic:.0f} | {r.seeds} | "
            f"{_mean_std(r.mauc_mean, r.mauc_std)} | {_fmt(r.ci_low)}–{_fmt(r.ci_high)} |"
        )
    gains = paired_gains(results)
    if len(gains):
        verdict = {1: "yes, better", -1: "yes, worse", 0: "no (within spread)"}
        lines += [
            "",
            "## Synthetic modes against real-only (paired by seed: the same real subset)",
            "",
            "A gain is claimed only when it lies outside the seed-to-seed spread (the ± std bars do not overlap). "
            "Gap closed: the share of the distance from real-only at this fraction to real-only at fraction 1.0. "
            "Fine-tune kept pretrained: seeds in which fine-tuning on the real subset never beat the synthetic-only "
            "model on validation, so the synthetic-only model was tested. pretrain-finetune trains in two stages "
            "and so may take up to twice the steps of the other modes.",
            "",
            "| real fraction | mode | source | gain in mAUC (mean ± std of pairs) | outside seed spread | gap closed "
            "| fine-tune kept pretrained |",
            "|---:|---|---|---|---|---:|---:|",
        ]
        for r in gains.itertuples():
            closed = _gap_closed_text(r.gap_closed, r.gap_closed_std) or "n/a"
            kept = f"{r.kept_start}/{r.pairs}" if r.mode == "pretrain-finetune" else "–"
            gain = f"{r.gain_mean:+.3f} ± {r.gain_std:.3f} ({r.pairs} seeds)"
            if r.against != r.real_frac:
                gain += f", against real-only at {r.against:g}"
            verdict_text = verdict[r.outside_spread]
            lines.append(f"| {r.real_frac:g} | {r.mode} | {r.source} | {gain} | {verdict_text} | {closed} | {kept} |")
        lines += _per_label_gain_lines(results)
    auc_columns = [c for c in results.columns if c.startswith("auc_")]
    if auc_columns:
        per_label = _with_source(results).groupby(["real_frac", "mode", "source"])[auc_columns].mean()
        order = list(zip(stats["real_frac"], stats["mode"], stats["source"], strict=True))
        per_label = per_label.loc[order]
        header = [f"{f:g} {m}" if src == NO_SOURCE else f"{f:g} {m} {src}" for f, m, src in order]
        lines += [
            "",
            "## Per-label test AUC (mean over seeds; n/a: not scored, too few of one class in the test split)",
            "",
            "| label | " + " | ".join(header) + " |",
            "|---|" + "---:|" * len(header),
        ]
        for column in auc_columns:
            values = [_fmt(float(v)) for v in per_label[column]]
            lines.append(f"| {column[4:]} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def _per_label_gain_lines(results: pd.DataFrame) -> list[str]:
    """The per-label paired gains at the smallest real fraction below 1, as a markdown table."""
    fractions = sorted(f for f in results["real_frac"].unique() if 0 < f < 1)
    if not fractions:
        return []
    gains = per_label_gains(results, fractions[0])
    pairs = list(dict.fromkeys((mode, source) for mode, source, _ in gains.columns))
    if not pairs:
        return []
    lines = [
        "",
        f"## Per-label gains at {fractions[0]:g} real (paired by seed; mean ± std)",
        "",
        "+ helps / − hurts: the mean ± std excludes zero; blank: within the seed spread; n/a: not scored.",
        "",
        "| label | " + " | ".join(f"{m} {s}" for m, s in pairs) + " |",
        "|---|" + "---:|" * len(pairs),
    ]
    for label, row in gains.iterrows():
        cells = []
        for mode, source in pairs:
            mean, std = row[(mode, source, "mean")], row[(mode, source, "std")]
            if pd.isna(mean):
                cells.append("n/a")
                continue
            if pd.isna(std):  # one seed: no spread, no verdict
                cells.append(f"{mean:+.3f} (1 seed)")
                continue
            mark = " +" if mean - std > 0 else (" −" if mean + std < 0 else "")
            cells.append(f"{mean:+.3f} ± {std:.3f}{mark}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def write_summary(results: pd.DataFrame, path: str | os.PathLike, title: str = "", scored: str = "") -> Path:
    path = Path(path)
    atomic_write_text(path, summary_markdown(results, title, scored))
    return path


def load_sweep_settings(out: str | os.PathLike) -> dict:
    """The settings a sweep in ``out`` ran with (``sweep.json``)."""
    return json.loads((Path(out) / "sweep.json").read_text(encoding="utf-8"))
