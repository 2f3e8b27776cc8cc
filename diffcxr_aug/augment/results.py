"""``results.csv`` of a classifier sweep: its columns, reading it back, adding a row, and the truth view.

One row per run. The interface contract's columns come first (``real_frac, n_real, n_synthetic, mode, model, seed,
mauc``), then one AUC per label, then the sweep's extras: the bootstrap CI, labels scored, test size, best
validation mAUC, its epoch, epochs run and optimiser steps of the run's last stage, seconds, ``source`` (the name of
the synthetic set; ``none`` for real-only runs) and ``generator_seed`` (the seed of the generator whose images the
run used, when a recipe trains several; empty otherwise). Phantom data adds the same scores against the world's
truth (``mauc_truth``, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from diffcxr_aug.errors import InputError
from diffcxr_aug.io import atomic_path

RESULTS_NAME = "results.csv"
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
    "generator_seed",
]
# Scored against the world's truth (phantom data only): the same as mauc, its CI and labels scored.
TRUTH_COLUMNS = ["mauc_truth", "mauc_truth_ci_low", "mauc_truth_ci_high", "n_labels_truth"]
RUN_KEY = ["real_frac", "mode", "source", "generator_seed", "model", "seed"]
NO_SOURCE = "none"  # the source of real-only runs
DEFAULT_SOURCE = "synthetic"  # the name of a synthetic folder given without one
SYNTHETIC_ONLY = "synthetic-only"
# synthetic-only runs train on no real image: one run per source and seed, recorded at real fraction 0.
SYNTHETIC_ONLY_FRAC = 0.0


def result_columns(label_names: list[str], truth: bool = False) -> list[str]:
    """The table's columns; with ``truth``, the scores against the phantom world's truth follow."""
    columns = BASE_COLUMNS + [f"auc_{name}" for name in label_names] + EXTRA_COLUMNS
    if truth:
        columns += TRUTH_COLUMNS + [f"auc_truth_{name}" for name in label_names]
    return columns


def with_source(results: pd.DataFrame) -> pd.DataFrame:
    """``results`` with the columns added after some tables were written: ``source`` (``none`` for real-only rows,
    ``synthetic`` for the others, the name of an unnamed synthetic folder) and ``generator_seed`` (empty)."""
    if "source" not in results.columns:
        results = results.assign(source=np.where(results["mode"] == "real", NO_SOURCE, DEFAULT_SOURCE))
    if "generator_seed" not in results.columns:
        position = list(results.columns).index("source") + 1
        results = results.copy()
        results.insert(position, "generator_seed", np.nan)
    return results


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """``results.csv`` as a frame (empty when the file does not exist yet), with the columns of :func:`with_source`."""
    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=BASE_COLUMNS + ["source", "generator_seed"])
    return with_source(pd.read_csv(path, keep_default_na=False, na_values=[""]))


def append_result(path: Path, row: dict, columns: list[str]) -> pd.DataFrame:
    """Add one row to ``results.csv``, rewriting the file atomically (a crash never leaves half a table)."""
    frame = read_results(path)
    if len(frame) and set(frame.columns) != set(columns):
        raise InputError(
            f"{path} holds runs with other columns (another label set or an older version); "
            "write this sweep to a fresh --out folder"
        )
    new = pd.DataFrame([row], columns=columns)
    frame = pd.concat([frame[columns], new], ignore_index=True) if len(frame) else new
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    return frame


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
