"""The sweep figure: test mAUC against the real fraction, one panel per synthetic mode, one line per source, error
bars over seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from diffcxr_aug.errors import InputError
from diffcxr_aug.figures import pyplot, save_figure

MODE_TITLE = {"mix": "real + synthetic (mix)", "pretrain-finetune": "synthetic pretrain, real fine-tune"}
# One colour per synthetic source, the same in every panel; a source not named here takes the next spare colour.
SOURCE_COLORS = {"generated": "#1f77b4", "dkim": "#9467bd", "dkim-balanced": "#ff7f0e", "ceiling": "#2ca02c"}
SPARE_COLORS = ["#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
REAL_COLOR = "#444444"


def _source_colors(sources: list[str]) -> dict[str, str]:
    spare = iter(SPARE_COLORS * (1 + len(sources) // len(SPARE_COLORS)))
    return {s: SOURCE_COLORS.get(s) or next(spare) for s in sources}


def _panel(ax, mode, real, only, curves, all_real, colors, fracs) -> None:
    """One panel: real only, all real, each source's synthetic-only level and its curve in ``mode``."""
    if len(all_real):
        mean, std = float(all_real["mean"].iloc[0]), float(all_real["std"].iloc[0])
        ax.axhline(mean, color="black", linestyle="--", linewidth=1.0, label=f"all real ({mean:.3f})")
        ax.axhspan(mean - std, mean + std, color="black", alpha=0.08, linewidth=0)
    for source, rows in only.groupby("source"):
        mean = float(rows["mean"].iloc[0])
        ax.axhline(mean, color=colors[source], linestyle=":", linewidth=1.2, label=f"{source} only ({mean:.3f})")
    sources = sorted(set(curves.loc[curves["mode"] == mode, "source"])) if mode else []
    lines = [("real only", real, REAL_COLOR, "o")] + [
        (source, curves[(curves["mode"] == mode) & (curves["source"] == source)], colors[source], "s")
        for source in sources
    ]
    # Nudge the lines apart on the log axis so their error bars do not hide one another.
    for i, (label, rows, color, marker) in enumerate(lines):
        rows = rows.sort_values("real_frac")
        ax.errorbar(
            rows["real_frac"] * (1.0 + 0.04 * (i - (len(lines) - 1) / 2)),
            rows["mean"],
            yerr=rows["std"],
            label=label if label == "real only" else f"real + {label}",
            color=color,
            marker=marker,
            capsize=3,
            linewidth=1.5,
        )
    ax.set_xscale("log")
    ax.set_xticks(fracs)
    ax.set_xticklabels([f"{f:g}" for f in fracs])
    ax.minorticks_off()
    ax.set_xlabel("fraction of the real training split (log scale)")
    ax.set_title(MODE_TITLE.get(mode, mode or "real only"), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def plot_sweep(
    results: pd.DataFrame | str | os.PathLike,
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Draw mAUC against real fraction (log x axis), mean with a standard-deviation bar over runs.

    One row of panels per classifier, one panel per synthetic mode (``mix``, ``pretrain-finetune``; one panel when
    there is neither), sharing the y axis. Every panel has the real-only line (the count-matched duplicate-real
    control), the all-real level (the mean of the real-only runs at fraction 1.0, its seed spread shaded), one line
    per synthetic source, and each source's ``synthetic-only`` level (no real image, so no place on the log axis)
    dotted in its colour.

    Args:
        results: a ``results.csv`` path or its frame (columns ``real_frac, mode, seed, mauc``; ``source`` names
            the synthetic set of each run, when there are several).
        path: output image (PNG by suffix).
        title: figure title.
    """
    plt = pyplot()
    frame = results if isinstance(results, pd.DataFrame) else pd.read_csv(results)
    missing = {"real_frac", "mode", "seed", "mauc"} - set(frame.columns)
    if missing:
        raise InputError(f"results need columns real_frac, mode, seed, mauc; missing {sorted(missing)}")
    if "source" not in frame.columns:
        frame = frame.assign(source=["none" if m == "real" else "synthetic" for m in frame["mode"]])
    if "model" not in frame.columns:
        frame = frame.assign(model="")
    frame = frame.assign(model=frame["model"].astype(str))
    models = list(dict.fromkeys(frame["model"]))
    stats = frame.groupby(["model", "mode", "source", "real_frac"])["mauc"].agg(["mean", "std", "count"]).reset_index()
    stats["std"] = stats["std"].fillna(0.0)
    curves_all = stats[~stats["mode"].isin(["real", "synthetic-only"])]
    panels = [m for m in MODE_TITLE if m in set(curves_all["mode"])] + sorted(
        set(curves_all["mode"]) - set(MODE_TITLE)
    )
    panels = panels or [None]
    colors = _source_colors(sorted(set(stats.loc[stats["mode"] != "real", "source"])))
    fracs = sorted(set(stats.loc[stats["mode"] != "synthetic-only", "real_frac"]))

    fig, axes = plt.subplots(
        len(models), len(panels), figsize=(5.2 * len(panels), 4.4 * len(models)), dpi=150, sharey=True, squeeze=False
    )
    for row, model in zip(axes, models, strict=True):
        at = stats[stats["model"] == model]
        real = at[at["mode"] == "real"].sort_values("real_frac")
        only = at[at["mode"] == "synthetic-only"]
        curves = at[~at["mode"].isin(["real", "synthetic-only"])]
        all_real = real[real["real_frac"] == 1.0]
        for ax, mode in zip(row, panels, strict=True):
            _panel(ax, mode, real, only, curves, all_real, colors, fracs)
            if len(models) > 1:
                ax.set_title(f"{model}: {ax.get_title()}", fontsize=10)
        row[0].set_ylabel("test mAUC (mean ± std over runs)")
    # Points pool different numbers of runs (a generated cell pools generators x seeds, real only the seeds alone).
    counts = sorted(set(stats["count"].astype(int)))
    runs = " or ".join(str(c) for c in counts) if counts else "0"
    fig.suptitle(title or f"mAUC vs real fraction ({runs} runs a point)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)
