"""The sweep figure: test mAUC against the real fraction, one line per mode and source, error bars over seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from diffcxr_aug.errors import InputError
from diffcxr_aug.figures import pyplot, save_figure

MODE_STYLE = {
    "real": {"label": "real only", "color": "#444444", "marker": "o"},
    "mix": {"label": "real + {source} (mix)", "color": "#1f77b4", "marker": "s"},
    "pretrain-finetune": {"label": "{source} pretrain, real fine-tune", "color": "#d62728", "marker": "^"},
}
# A second source of one mode gets its own colour; the line style tells the modes apart.
SOURCE_COLORS = {"generated": None, "ceiling": "#2ca02c", "dkim": "#9467bd"}
MODE_LINESTYLE = {"real": "-", "mix": "-", "pretrain-finetune": "--"}


def plot_sweep(
    results: pd.DataFrame | str | os.PathLike,
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """Draw mAUC against real fraction (log x axis), mean with a standard-deviation bar over seeds.

    The all-real line is the mean of the real-only runs at fraction 1.0, with its seed spread shaded.

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
    stats = frame.groupby(["mode", "source", "real_frac"])["mauc"].agg(["mean", "std", "count"]).reset_index()
    stats["std"] = stats["std"].fillna(0.0)

    fig, ax = plt.subplots(figsize=(6.0, 4.2), dpi=150)
    all_real = stats[(stats["mode"] == "real") & (stats["real_frac"] == 1.0)]
    if len(all_real):
        mean, std = float(all_real["mean"].iloc[0]), float(all_real["std"].iloc[0])
        ax.axhline(mean, color="black", linestyle="--", linewidth=1.0, label=f"all real ({mean:.3f})")
        ax.axhspan(mean - std, mean + std, color="black", alpha=0.08, linewidth=0)
    # synthetic-only trains on no real image (real fraction 0, off a log axis): a dotted level per source.
    for source, rows in stats[stats["mode"] == "synthetic-only"].groupby("source"):
        mean = float(rows["mean"].iloc[0])
        ax.axhline(
            mean,
            color=SOURCE_COLORS.get(source) or "#ff7f0e",
            linestyle=":",
            linewidth=1.2,
            label=f"{source} only, no real image ({mean:.3f})",
        )
    stats = stats[stats["mode"] != "synthetic-only"]
    rank = {m: i for i, m in enumerate(MODE_STYLE)}
    lines = sorted(set(zip(stats["mode"], stats["source"], strict=True)), key=lambda k: (rank.get(k[0], 99), k))
    # Nudge the lines apart on the log axis so their error bars do not hide one another.
    offsets = {k: 1.0 + 0.04 * (i - (len(lines) - 1) / 2) for i, k in enumerate(lines)}
    for mode, source in lines:
        rows = stats[(stats["mode"] == mode) & (stats["source"] == source)].sort_values("real_frac")
        style = MODE_STYLE.get(mode, {"label": f"{mode} ({{source}})", "color": None, "marker": "o"})
        color = (SOURCE_COLORS.get(source) if mode != "real" else None) or style["color"]
        ax.errorbar(
            rows["real_frac"] * offsets[mode, source],
            rows["mean"],
            yerr=rows["std"],
            label=style["label"].format(source=source),
            color=color,
            marker=style["marker"],
            linestyle=MODE_LINESTYLE.get(mode, "-"),
            capsize=3,
            linewidth=1.5,
        )
    ax.set_xscale("log")
    fracs = sorted(stats["real_frac"].unique())
    ax.set_xticks(fracs)
    ax.set_xticklabels([f"{f:g}" for f in fracs])
    ax.set_xlabel("fraction of the real training split (log scale)")
    ax.set_ylabel("test mAUC (mean ± std over seeds)")
    seeds = int(stats["count"].max()) if len(stats) else 0
    ax.set_title(title or f"mAUC vs real fraction ({seeds} seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)
