"""The sweep's statistics: mAUC per cell over seeds, paired gains over real-only, the share of the gap to all real
closed, and per-label gains.

A *cell* is one ``(model, real_frac, mode, source)``. Its runs differ by classifier seed and, when a recipe trains
several generators, by generator seed: the ± spreads pool both (the combined spread), and the spread between
generator trainings (the standard deviation of the per-generator means) is given separately. Gains are paired: each
run against the real-only run of the same model, classifier seed and real fraction (the same real subset).
"""

from __future__ import annotations

import math

import pandas as pd

from diffcxr_aug.augment.mixing import MODES
from diffcxr_aug.augment.results import NO_SOURCE, SYNTHETIC_ONLY, with_source

CELL = ["model", "real_frac", "mode", "source"]


def models_in_order(results: pd.DataFrame) -> list[str]:
    """The classifiers of ``results`` in the order the sweep ran them (first appearance)."""
    return list(dict.fromkeys(results["model"].astype(str)))


def _std(values: pd.Series | list[float]) -> float:
    values = pd.Series(values, dtype=float).dropna()
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def _between_generators(results: pd.DataFrame, value: str, keys: list[str]) -> pd.Series:
    """Per ``keys`` group: the standard deviation over generator seeds of the mean of ``value`` (NaN below two)."""
    runs = results[results["generator_seed"].notna()]
    if not len(runs):
        return pd.Series(dtype=float)
    means = runs.groupby([*keys, "generator_seed"])[value].mean()
    return means.groupby(level=list(range(len(keys)))).agg(_std)


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: runs, classifier seeds, generators, mean sizes, mAUC mean and std over the runs, the std
    between generators (NaN with fewer than two) and the mean CI bounds."""
    results = with_source(results).assign(model=lambda f: f["model"].astype(str))
    table = (
        results.groupby(CELL, sort=True)
        .agg(
            runs=("mauc", "size"),
            seeds=("seed", "nunique"),
            generators=("generator_seed", "nunique"),
            n_real=("n_real", "mean"),
            n_synthetic=("n_synthetic", "mean"),
            mauc_mean=("mauc", "mean"),
            mauc_std=("mauc", "std"),
            ci_low=("mauc_ci_low", "mean"),
            ci_high=("mauc_ci_high", "mean"),
        )
        .reset_index()
    )
    table["mauc_std"] = table["mauc_std"].fillna(0.0)
    between = _between_generators(results, "mauc", CELL)
    table["mauc_between_generators"] = [between.get(tuple(key), math.nan) for key in table[CELL].itertuples(False)]
    models = {m: i for i, m in enumerate(models_in_order(results))}
    modes = {m: i for i, m in enumerate(MODES)}
    order = {"model": models, "mode": modes}
    table = table.sort_values(CELL, key=lambda c: c.map(order[c.name]) if c.name in order else c)
    return table.reset_index(drop=True)


GAIN_COLUMNS = [
    *CELL,
    "against",
    "pairs",
    "generators",
    "gain_mean",
    "gain_std",
    "gain_between_generators",
    "outside_spread",
    "kept_start",
    "gap_closed",
    "gap_outside_spread",
    "gap_closed_std",
    "gap_closed_between_generators",
    "share_of_all_real",
]


def _share_closed(real: pd.Series, model: str, against: float, run) -> float:
    """The share of the gap from real-only at ``against`` to all real that ``run`` closes, against its own seed's
    two real-only runs (NaN when there is no gap to close)."""
    low, high = real.get((model, against, run.seed)), real.get((model, 1.0, run.seed))
    if against >= 1.0 or low is None or high is None or high <= low:
        return math.nan
    return (run.mauc - low) / (high - low)


def paired_gains(results: pd.DataFrame) -> pd.DataFrame:
    """Synthetic modes (per model and source) against real-only at the same fraction and seed (paired: same real
    subset).

    Columns: ``gain_mean``/``gain_std`` of the per-run differences (over classifier seeds and generator seeds),
    ``gain_between_generators`` (the std of the per-generator mean gains; NaN with fewer than two generators),
    ``outside_spread`` (the mode's mean minus its std lies above the real-only mean plus its std, i.e. the error bars
    do not overlap; ``-1`` when it lies below, ``0`` when they overlap), ``kept_start`` (runs whose best checkpoint
    is the starting point of their last stage: for ``pretrain-finetune``, fine-tuning never beat the synthetic-only
    model on validation), ``gap_closed``: the share of the gap between real-only at this fraction and real-only at
    fraction 1.0 that the mode closes (ratio of the means), ``gap_closed_std``: the std of the same share computed
    run by run (each run against the same seed's two real-only runs), ``gap_closed_between_generators``: the std
    of the per-generator shares, ``gap_outside_spread``: whether that gap itself lies outside the spread (all real's
    mean minus its std above real-only's mean plus its std; where it does not, a share of it means nothing), and
    ``share_of_all_real``: the mode's mean mAUC as a share of all real's.
    ``against`` is the real-only fraction compared with: the run's own, or 1.0 (all real) for ``synthetic-only``,
    which trains on no real image.
    """
    results = with_source(results).assign(model=lambda f: f["model"].astype(str))
    real = results[results["mode"] == "real"].set_index(["model", "real_frac", "seed"])["mauc"]
    stats = summarize(results).set_index(CELL)
    rows = []
    for (model, frac, mode, source), group in results[results["mode"] != "real"].groupby(CELL):
        against = 1.0 if mode == SYNTHETIC_ONLY else frac
        runs = [r for r in group.itertuples() if (model, against, r.seed) in real.index]
        if not runs:
            continue
        gains = pd.Series([r.mauc - real[(model, against, r.seed)] for r in runs])
        generator = pd.Series([r.generator_seed for r in runs])
        shares = pd.Series([_share_closed(real, model, against, r) for r in runs], dtype=float)
        mode_mean, mode_std = stats.loc[(model, frac, mode, source), ["mauc_mean", "mauc_std"]]
        real_mean, real_std = stats.loc[(model, against, "real", NO_SOURCE), ["mauc_mean", "mauc_std"]]
        all_real = stats["mauc_mean"].get((model, 1.0, "real", NO_SOURCE), math.nan)
        if mode_mean - mode_std > real_mean + real_std:
            outside = 1
        elif mode_mean + mode_std < real_mean - real_std:
            outside = -1
        else:
            outside = 0
        gap = all_real - real_mean
        all_real_std = stats["mauc_std"].get((model, 1.0, "real", NO_SOURCE), math.nan)
        rows.append(
            {
                "model": model,
                "real_frac": frac,
                "mode": mode,
                "source": source,
                "against": against,
                "pairs": len(runs),
                "generators": int(generator.nunique()),
                "gain_mean": float(gains.mean()),
                "gain_std": float(gains.std(ddof=1)) if len(gains) > 1 else 0.0,
                "gain_between_generators": _std(gains.groupby(generator).mean()),
                "outside_spread": outside,
                "kept_start": int((group["best_epoch"] == 0).sum()) if "best_epoch" in group else 0,
                "gap_closed": float((mode_mean - real_mean) / gap) if against < 1.0 and gap > 0 else math.nan,
                "gap_outside_spread": bool(all_real - all_real_std > real_mean + real_std) if against < 1.0 else False,
                "gap_closed_std": _std(shares),
                "gap_closed_between_generators": _std(shares.groupby(generator).mean()),
                "share_of_all_real": float(mode_mean / all_real) if all_real > 0 else math.nan,
            }
        )
    return pd.DataFrame(rows, columns=GAIN_COLUMNS)


def per_label_gains(results: pd.DataFrame, real_frac: float, model: str | None = None) -> pd.DataFrame:
    """Per-label paired AUC gains at ``real_frac`` for one classifier (``None``: the first the sweep ran): for each
    synthetic mode and source, the mean and standard deviation over runs of (its AUC - real-only's AUC, same seed)
    for every label; one row per label, columns ``(mode, source, "mean" | "std")``. Labels not scored in a run (too
    few of one class) are left out of its pairs."""
    results = with_source(results).assign(model=lambda f: f["model"].astype(str))
    model = model if model is not None else models_in_order(results)[0]
    labels = [c for c in results.columns if c.startswith("auc_")]
    at = results[(results["real_frac"] == real_frac) & (results["model"] == model)]
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
