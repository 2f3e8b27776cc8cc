"""The sweep's ``summary.md``: the headline tables (the README's front page shows them as they are), every cell,
the paired gains with their verdicts, and per-label AUCs and gains. Written from ``results.csv`` alone, so a rerun
rewrites it identically."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd

from diffcxr_aug.augment.mixing import MODES
from diffcxr_aug.augment.results import NO_SOURCE, SYNTHETIC_ONLY, SYNTHETIC_ONLY_FRAC, with_source
from diffcxr_aug.augment.statistics import CELL, models_in_order, paired_gains, per_label_gains, summarize
from diffcxr_aug.io import atomic_write_text

SOURCE_ORDER = ("generated", "dkim", "dkim-balanced", "ceiling")  # the headline's columns, then any other source


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _mean_std(mean: float, std: float) -> str:
    return f"{_fmt(mean)} ± {_fmt(std)}"


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def _gap_closed_text(gap_closed: float, gap_closed_std: float, gap_outside_spread: bool = True) -> str:
    """``74% ± 8%`` (the share of the gap closed, ± its run-by-run std when known), marked when that gap itself lies
    inside the seed spread (so the share is noise); ``""`` when there is no gap."""
    if math.isnan(gap_closed):
        return ""
    text = _percent(gap_closed) + ("" if math.isnan(gap_closed_std) else f" ± {_percent(gap_closed_std)}")
    return text if gap_outside_spread else f"{text} (gap within the spread)"


def _spread_words(results: pd.DataFrame) -> str:
    """What the ± pools: classifier seeds, or generator trainings x classifier seeds."""
    return "over generator trainings x classifier seeds" if results["generator_seed"].notna().any() else "over seeds"


def headline_markdown(results: pd.DataFrame) -> str:
    """The two headline tables: test mAUC, and the paired gain over real-only with the share of the gap to all real
    it closes, one row per (classifier,) real fraction x synthetic mode (and the ``synthetic-only`` row), one column
    per synthetic source.

    Gains in **bold** lie outside the spread (the ± std bars of the mode and of real-only do not overlap);
    "(worse)" marks one outside the spread below real-only. ``synthetic-only`` trains on no real image and is
    compared with all real (its mAUC as a share of all real's follows its gain). Where several generators were
    trained, each cell adds the spread between them ("generators ± ...").
    """
    results = with_source(results).assign(model=lambda f: f["model"].astype(str))
    if not (results["mode"] != "real").any():
        return ""
    stats = summarize(results).set_index(CELL)
    gains = paired_gains(results).set_index(CELL)
    present = set(results.loc[results["mode"] != "real", "source"])
    sources = [s for s in SOURCE_ORDER if s in present] + sorted(present - set(SOURCE_ORDER))
    modes = [m for m in MODES if m not in ("real", SYNTHETIC_ONLY) and m in set(results["mode"])]
    models = models_in_order(results)
    several = len(models) > 1
    generators = results["generator_seed"].notna().any()

    def real_only(model: str, frac: float) -> str:
        key = (model, frac, "real", NO_SOURCE)
        return _mean_std(*stats.loc[key, ["mauc_mean", "mauc_std"]]) if key in stats.index else "n/a"

    def n_real(model: str, frac: float) -> str:
        key = (model, frac, "real", NO_SOURCE)
        return f"{stats.loc[key, 'n_real']:,.0f}" if key in stats.index else "0"

    def mauc_cell(key: tuple) -> str:
        if key not in stats.index:
            return "–"
        s = stats.loc[key]
        text = _mean_std(s.mauc_mean, s.mauc_std)
        if s.generators > 1:
            text += f" (generators ± {_fmt(s.mauc_between_generators)})"
        return text

    def gain_cell(key: tuple) -> str:
        if key not in gains.index:
            return "–"
        g = gains.loc[key]
        text = f"{g.gain_mean:+.3f} ± {g.gain_std:.3f}"
        closed = _gap_closed_text(g.gap_closed, g.gap_closed_std)
        if closed and not g.gap_outside_spread:  # a share of a gap inside the seed spread is noise
            text += ", no gap to all real beyond the spread"
        elif closed:
            text += f", {closed}"
        if key[2] == SYNTHETIC_ONLY:
            text += f", {_percent(g.share_of_all_real)} of all real"
        notes = ["worse"] if g.outside_spread == -1 else []
        if g.generators > 1:
            between = f"generators ± {g.gain_between_generators:.3f}"
            if not math.isnan(g.gap_closed_between_generators):
                between += f", ± {_percent(g.gap_closed_between_generators)}"
            notes.append(between)
        text = f"**{text}**" if g.outside_spread == 1 else text
        return text + (f" ({'; '.join(notes)})" if notes else "")

    lead_head = ("| classifier " if several else "") + "| real fraction | n real | mode |"
    lead_rule = ("|---" if several else "") + "|---:|---:|---|"
    columns, rule = " | ".join(sources) + " |", "---|" * len(sources)
    mauc = [f"{lead_head} real only | {columns}", f"{lead_rule}---|{rule}"]
    gain = [f"{lead_head} {columns}", f"{lead_rule}{rule}"]
    for model in models:
        at = results[results["model"] == model]
        fracs = sorted(at.loc[at["mode"] == "real", "real_frac"].unique())
        rows = [(f, m) for f in fracs for m in modes if ((at["mode"] == m) & (at["real_frac"] == f)).any()]
        if (at["mode"] == SYNTHETIC_ONLY).any():
            rows.append((SYNTHETIC_ONLY_FRAC, SYNTHETIC_ONLY))
        for frac, mode in rows:
            control = f"all real: {real_only(model, 1.0)}" if mode == SYNTHETIC_ONLY else real_only(model, frac)
            name = "synthetic only (no real image)" if mode == SYNTHETIC_ONLY else mode
            lead = ("| " + model + " " if several else "") + f"| {frac:g} | {n_real(model, frac)} | {name} |"
            mauc.append(f"{lead} {control} | " + " | ".join(mauc_cell((model, frac, mode, s)) for s in sources) + " |")
            gain.append(f"{lead} " + " | ".join(gain_cell((model, frac, mode, s)) for s in sources) + " |")
    spread = _spread_words(results)
    if generators:
        spread += ", with the spread between generator trainings (the std of the per-generator means) in brackets"
    lines = [
        f"Test mAUC, mean ± std {spread} (real only at the same fraction is the count-matched duplicate-real "
        "control):",
        "",
        *mauc,
        "",
        "Paired gain over real only at the same fraction (synthetic only: over all real, and its mAUC as a share of "
        f"all real's), mean ± std {spread}, and the share of the gap from real only to all real that it closes (± "
        "its run-by-run std); **bold**: outside the spread:",
        "",
        *gain,
    ]
    return "\n".join(lines) + "\n"


def summary_markdown(results: pd.DataFrame, title: str = "", scored: str = "") -> str:
    """The sweep's ``summary.md``: the headline tables, the mAUC table, paired gains over real-only and per-label
    AUCs.

    ``scored`` says what the labels were scored against when it is not the test reports (see
    :func:`~diffcxr_aug.augment.results.scored_view`).
    """
    results = with_source(results).assign(model=lambda f: f["model"].astype(str))
    stats = summarize(results)
    several = results["model"].nunique() > 1
    lead_head, lead_rule = ("| classifier ", "|---") if several else ("", "")

    def lead(model: str) -> str:
        return f"| {model} " if several else ""

    lines = [f"# Classifier sweep{': ' + title if title else ''}", ""]
    headline = headline_markdown(results)
    n_test = int(results["n_test"].iloc[0]) if "n_test" in results and len(results) else 0
    lines += [
        f"{len(results)} runs. Test: the full real test split ({n_test} images), "
        f"{scored or 'scored against the labels of the test reports'}. mAUC is the mean ROC AUC over the scored "
        "labels (both classes present, at "
        "least classifier.min_label_support of each; see the per-label table); ± is the standard deviation "
        f"{_spread_words(results)}; the CI is the 95% bootstrap interval over test images, averaged "
        "over runs. synthetic-only runs (real fraction 0) train on no real image.",
        "",
        *(["## Headline", "", headline.rstrip("\n"), "", "## Every cell", ""] if headline else []),
        f"{lead_head}| real fraction | mode | source | n real | n synthetic | runs | mAUC (mean ± std) | "
        "bootstrap 95% CI |",
        f"{lead_rule}|---:|---|---|---:|---:|---:|---|---|",
    ]
    for r in stats.itertuples():
        lines.append(
            f"{lead(r.model)}| {r.real_frac:g} | {r.mode} | {r.source} | {r.n_real:.0f} | {r.n_synthetic:.0f} | "
            f"{r.runs} | {_mean_std(r.mauc_mean, r.mauc_std)} | {_fmt(r.ci_low)}–{_fmt(r.ci_high)} |"
        )
    gains = paired_gains(results)
    if len(gains):
        verdict = {1: "yes, better", -1: "yes, worse", 0: "no (within spread)"}
        lines += [
            "",
            "## Synthetic modes against real-only (paired by seed: the same real subset)",
            "",
            "A gain is claimed only when it lies outside the spread (the ± std bars do not overlap). "
            "Gap closed: the share of the distance from real-only at this fraction to real-only at fraction 1.0 "
            "(synthetic-only: its mAUC as a share of all real's). "
            "Fine-tune kept pretrained: runs in which fine-tuning on the real subset never beat the synthetic-only "
            "model on validation, so the synthetic-only model was tested. pretrain-finetune trains in two stages "
            "and so may take up to twice the steps of the other modes.",
            "",
            f"{lead_head}| real fraction | mode | source | gain in mAUC (mean ± std of pairs) | outside spread | "
            "gap closed | fine-tune kept pretrained |",
            f"{lead_rule}|---:|---|---|---|---|---:|---:|",
        ]
        for r in gains.itertuples():
            if r.mode == SYNTHETIC_ONLY:
                closed = f"{_percent(r.share_of_all_real)} of all real"
            else:
                closed = _gap_closed_text(r.gap_closed, r.gap_closed_std, r.gap_outside_spread) or "n/a"
            kept = f"{r.kept_start}/{r.pairs}" if r.mode == "pretrain-finetune" else "–"
            pairs = f"{r.pairs} runs, {r.generators} generators" if r.generators > 1 else f"{r.pairs} seeds"
            gain = f"{r.gain_mean:+.3f} ± {r.gain_std:.3f} ({pairs})"
            if r.against != r.real_frac:
                gain += f", against real-only at {r.against:g}"
            lines.append(
                f"{lead(r.model)}| {r.real_frac:g} | {r.mode} | {r.source} | {gain} | {verdict[r.outside_spread]} | "
                f"{closed} | {kept} |"
            )
        for model in models_in_order(results):
            lines += _per_label_gain_lines(results, model, several)
    auc_columns = [c for c in results.columns if c.startswith("auc_")]
    for model in models_in_order(results) if auc_columns else []:
        at = results[results["model"] == model]
        per_label = at.groupby(["real_frac", "mode", "source"])[auc_columns].mean()
        cells = stats[stats["model"] == model]
        order = list(zip(cells["real_frac"], cells["mode"], cells["source"], strict=True))
        per_label = per_label.loc[order]
        header = [f"{f:g} {m}" if src == NO_SOURCE else f"{f:g} {m} {src}" for f, m, src in order]
        lines += [
            "",
            "## Per-label test AUC"
            + (f", {model}" if several else "")
            + " (mean over runs; n/a: not scored, too few of one class in the test split)",
            "",
            "| label | " + " | ".join(header) + " |",
            "|---|" + "---:|" * len(header),
        ]
        for column in auc_columns:
            values = [_fmt(float(v)) for v in per_label[column]]
            lines.append(f"| {column[4:]} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def _per_label_gain_lines(results: pd.DataFrame, model: str, several: bool) -> list[str]:
    """The per-label paired gains of one classifier at the smallest real fraction below 1, as a markdown table."""
    at = results[results["model"] == model]
    fractions = sorted(f for f in at["real_frac"].unique() if 0 < f < 1)
    if not fractions:
        return []
    gains = per_label_gains(results, fractions[0], model)
    pairs = list(dict.fromkeys((mode, source) for mode, source, _ in gains.columns))
    if not pairs:
        return []
    lines = [
        "",
        f"## Per-label gains at {fractions[0]:g} real" + (f", {model}" if several else "") + " (paired; mean ± std)",
        "",
        "+ helps / − hurts: the mean ± std excludes zero; blank: within the spread; n/a: not scored.",
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
