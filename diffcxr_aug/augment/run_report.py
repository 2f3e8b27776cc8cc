"""``report.md`` of a recipe run: one page a newcomer reads, built from the files the steps wrote.

Sections: what ran and for how long; what LNFS found (with the most-flagged images); generated images beside
their reports and the real images; the evaluation table; the classifier table and figure; and what the numbers
mean, in three sentences computed from them. A section whose step did not run (or has not finished) says so.
Image links are relative to the report, so the output folder can be moved or zipped as it is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import pandas as pd

from diffcxr_aug.augment.layout import run_order
from diffcxr_aug.augment.results import RESULTS_NAME, read_results, scored_view
from diffcxr_aug.augment.statistics import CELL, paired_gains, summarize
from diffcxr_aug.augment.steps import StepLedger
from diffcxr_aug.augment.sweep import FIGURE_NAME
from diffcxr_aug.config import RESOLVED_RECIPE_NAME, Recipe
from diffcxr_aug.evaluation.markdown import format_number
from diffcxr_aug.io import atomic_write_text
from diffcxr_aug.runtime import resolve_device

logger = logging.getLogger(__name__)

REPORT_NAME = "report.md"
STEP_WHAT = {
    "prepare": "index the dataset into manifest.csv",
    "train-vae": "train the KL-VAE: the latent space of filter and generator",
    "filter": "LNFS: flag noisy images in the VAE's latent space",
    "train-generator": "Diff-CXR stage 1 (LDM + AVA-TLS), then stage 2 (the DKIM adapter) with generator.dkim",
    "synthesize": "generate labelled images from training reports",
    "train-classifier": "timm classifiers: real fractions x modes x sources x seeds",
    "evaluate": "FID/KID, precision/recall, faithfulness, privacy",
}


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _link(path: Path, root: Path) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _minutes(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds / 60:.1f} min"


def machine_line(device: str) -> str:
    """``Linux x86_64, 2 CPU cores, torch 2.x (device cpu)``: where the run ran."""
    import torch

    resolved = resolve_device(device)
    where = torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else f"{os.cpu_count()} CPU cores"
    return f"{platform.system()} {platform.machine()}, {where}, torch {torch.__version__} (device {resolved})"


def _steps_section(recipe: Recipe, ledger: StepLedger, happened: list[dict[str, Any]]) -> list[str]:
    this_run = {h["step"]: h for h in happened}
    lines = [
        "## What ran",
        "",
        "| step | what | this run | wall time (all runs) |",
        "|---|---|---|---:|",
    ]
    total = 0.0
    for name in run_order(recipe):  # train-vae too where an older steps list leaves it out
        record = ledger.records.get(name)
        if record is None:
            lines.append(f"| {name} | {STEP_WHAT.get(name, '')} | not run | |")
            continue
        seconds = float(record.get("seconds", 0.0))
        total += seconds
        action = this_run.get(name, {}).get("action", "not run")
        lines.append(f"| {name} | {STEP_WHAT.get(name, '')} | {action} | {_minutes(seconds)} |")
    lines += [f"| **total** | | | **{_minutes(total)}** |", ""]
    lines.append(
        f"`steps.json` holds each step's settings; rerunning `diffcxr-aug run` skips what finished with the same "
        f"settings. The resolved recipe is `{RESOLVED_RECIPE_NAME}`."
    )
    return lines + [""]


def _filter_section(root: Path, paths: dict[str, Path]) -> tuple[list[str], dict[str, Any] | None]:
    report = _read_json(paths["filtered"] / "filter_report.json")
    lines = ["## LNFS: the training images it filtered out", ""]
    if report is None:
        return lines + ["The filter did not run.", ""], None
    lines.append(
        f"LNFS scored {report['images']} images and flagged {report['flagged']} as noisy "
        f"({report['flagged'] / max(report['images'], 1):.1%}); the generator trained on the {report['kept']} kept."
    )
    evaluation = report.get("evaluation")
    if evaluation and evaluation.get("roc_auc"):
        auc = evaluation["roc_auc"]
        lines.append(
            f"Against the world's truth (the `noise` column): ROC AUC {auc['final']:.3f} (K-means "
            f"{auc['kmeans']:.3f}, manifold {auc['manifold']:.3f}, discriminator {auc['discriminator']:.3f}); "
            f"recall of noisy images {evaluation['recall']:.3f}, clean images removed "
            f"{evaluation['clean_removed_share']:.2%}."
        )
    vae = report.get("vae", {})
    if "psnr" in vae:
        lines.append(
            f"The KL-VAE (train-vae) reconstructs validation images at {vae['psnr']:.2f} dB PSNR "
            f"(SSIM {vae['ssim']:.3f})."
        )
    montage = paths["filtered"] / "montage_flagged.png"
    if montage.is_file():
        lines += ["", f"![the most-flagged images]({_link(montage, root)})"]
    return lines + [""], report


def _generated_section(root: Path, paths: dict[str, Path]) -> list[str]:
    """One paragraph (and the preview) per image set synthesize wrote: the plain set, one per generator seed, DKIM's
    and the held-out notes' sets."""
    lines = ["## Generated images", ""]
    sets = [(key, paths[key]) for key in paths if key.startswith("synthetic")]
    jobs = [(key, folder, _read_json(folder / "synthesis.json")) for key, folder in sets]
    jobs = [(key, folder, job) for key, folder, job in jobs if job is not None]
    if not jobs:
        return lines + ["The synthesize step did not run.", ""]
    for key, folder, job in jobs:
        rate = job.get("images_per_second")
        name = f"`{folder.name}/`: " if len(jobs) > 1 else ""
        lines.append(
            f"{name}{job.get('n')} images, {job.get('steps')} sampler steps, guidance {job.get('guidance')}"
            + (f", {rate:.2f} images/s on {job.get('device')}" if rate else "")
            + "."
        )
        preview = folder / "preview.png"
        if preview.is_file():
            lines += ["", f"![{key}: generated images beside their reports and real images]({_link(preview, root)})"]
        lines.append("")
    lines.append(
        "Each preview row: the report (left), the real image it was written for (middle), the generated image (right)."
    )
    return lines + [""]


def _evaluation_section(root: Path, paths: dict[str, Path]) -> tuple[list[str], dict[str, Any] | None]:
    lines = ["## Evaluation", ""]
    results = _read_json(paths["evaluation"] / "report.json")
    if results is None:
        return lines + ["The evaluate step did not run.", ""], None
    floor, real_auc = results["real_test"]["floor"], results["real_test"]["faithfulness"]["mauc"]
    judge = results.get("judge") or {"better_than_chance": True}
    if not judge["better_than_chance"]:
        return lines + [
            f"The reference classifier reads the real test films at mAUC {real_auc:.3f}: no better than chance "
            f"({judge['reason']}), so the numbers in its feature space and faithfulness are withheld; what remains "
            f"is in [`{_link(paths['evaluation'] / 'report.md', root)}`]"
            f"({_link(paths['evaluation'] / 'report.md', root)}).",
            "",
        ], results
    lines += [
        f"In the feature space of {results['feature_space']}; the full report is "
        f"[`{_link(paths['evaluation'] / 'report.md', root)}`]({_link(paths['evaluation'] / 'report.md', root)}).",
        "",
        "| set | images | FID | KID (x1000) | precision | recall | faithfulness mAUC [95% CI] |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| real val vs real test (floor) | {floor['n_synthetic']} | {format_number(floor['fid'], 2)} | "
        f"{format_number(floor['kid'], 2, 1000)} | {format_number(floor.get('precision'))} | "
        f"{format_number(floor.get('recall'))} | "
        f"{real_auc:.3f} (real test) |",
    ]
    for name, entry in results["synthetic"].items():
        fid, faith = entry["fidelity"], entry["faithfulness"]
        ci = faith.get("mauc_ci95")
        lines.append(
            f"| {name} | {entry['n_images']} | {format_number(fid['fid'], 2)} | "
            f"{format_number(fid['kid'], 2, 1000)} | "
            f"{format_number(fid.get('precision'))} | {format_number(fid.get('recall'))} | {faith['mauc']:.3f}"
            + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
            + " |"
        )
    return lines + [""], results


def _classifier_tables(results: pd.DataFrame) -> list[str]:
    stats = summarize(results)
    gains = paired_gains(results).set_index(CELL)
    several = stats["model"].nunique() > 1
    lines = [
        ("| classifier " if several else "")
        + "| real fraction | mode | source | n real | n synthetic | runs | mAUC (mean ± std) | paired gain over real "
        "| gap to all real closed |",
        ("|---" if several else "") + "|---:|---|---|---:|---:|---:|---|---|---:|",
    ]
    for r in stats.itertuples():
        gain, closed = "", ""
        if (r.model, r.real_frac, r.mode, r.source) in gains.index:
            g = gains.loc[(r.model, r.real_frac, r.mode, r.source)]
            gain = f"{g.gain_mean:+.3f} ± {g.gain_std:.3f}"
            closed = "" if math.isnan(g.gap_closed) else f"{100 * g.gap_closed:.0f}%"
            closed = closed if g.gap_outside_spread or not closed else f"{closed} (gap within the spread)"
        lines.append(
            (f"| {r.model} " if several else "")
            + f"| {r.real_frac:g} | {r.mode} | {r.source} | {r.n_real:.0f} | {r.n_synthetic:.0f} | {r.runs} | "
            f"{r.mauc_mean:.3f} ± {r.mauc_std:.3f} | {gain} | {closed} |"
        )
    return lines


def _classifier_section(root: Path, paths: dict[str, Path], metric: str) -> tuple[list[str], pd.DataFrame | None]:
    lines = ["## Classifiers: real only, real + generated, real + ceiling", ""]
    path = paths["classifiers"] / RESULTS_NAME
    if not path.is_file():
        return lines + ["The train-classifier step did not run.", ""], None
    results = scored_view(read_results(path), metric)
    model = ", ".join(sorted(results["model"].astype(str).unique()))
    against = "the phantom world's truth" if metric == "truth" else "the labels of its reports"
    lines += [
        f"{model}, tested on the full real test split, scored against {against}. Sources: `generated` are this "
        "run's generated images, "
        "`ceiling` are perfect-generator images drawn from the phantom world's truth (the most images of this kind "
        "could add). Paired gain: mean ± std over seeds of the difference to real-only on the same real subset; "
        "gap closed: the share of the distance from real-only at that fraction to real-only with all real images.",
        "",
        *_classifier_tables(results),
    ]
    figure = paths["classifiers"] / FIGURE_NAME
    if figure.is_file():
        lines += ["", f"![mAUC against the real fraction]({_link(figure, root)})"]
    return lines + [""], results


def _meaning(filt: dict | None, evaluation: dict | None, results: pd.DataFrame | None) -> list[str]:
    """Three sentences: what the filter, the generator and the classifiers showed, from the numbers above."""
    sentences = []
    evaluation_auc = (filt or {}).get("evaluation", {}).get("roc_auc", {}) if filt else {}
    if evaluation_auc:
        e = filt["evaluation"]
        sentences.append(
            f"LNFS separated the planted noisy images from clean ones at ROC AUC {evaluation_auc['final']:.3f}, "
            f"catching {e['recall']:.0%} of them at the cost of {e['clean_removed_share']:.1%} of the clean images."
        )
    elif filt:
        sentences.append(f"LNFS removed {filt['flagged']} of {filt['images']} images; no noise truth to score it by.")
    if evaluation and evaluation["synthetic"]:
        sentences.append(_generator_sentence(evaluation))
    if results is not None and len(results):
        sentences.append(_classifier_sentence(summarize(results), paired_gains(results)))
    return ["## What it means", "", " ".join(s for s in sentences if s), ""]


def _generator_sentence(evaluation: dict[str, Any]) -> str:
    name, entry = next(iter(evaluation["synthetic"].items()))
    if entry["faithfulness"] is None:  # withheld: the judge reads real films no better than chance
        return (
            f"The evaluation cannot say how faithful or how realistic the {name} images are: its reference "
            "classifier reads the real test films no better than chance."
        )
    real_auc, floor = evaluation["real_test"]["faithfulness"]["mauc"], evaluation["real_test"]["floor"]
    faith, fid = entry["faithfulness"]["mauc"], entry["fidelity"]
    ci = entry["faithfulness"].get("mauc_ci95")
    if not ci:  # too few images of a class to bootstrap: no comparison the numbers support
        findings = f"with no interval to compare it to real test images' {real_auc:.3f}"
    elif ci[0] <= real_auc <= ci[1]:
        findings = "as well as in real test images (whose mAUC lies inside the interval)"
    else:
        findings = f"{'less' if faith < real_auc else 'more'} clearly than in real test images ({real_auc:.3f})"
    sentence = (
        f"The reference classifier reads the reported findings in the {name} images at mAUC {faith:.3f}, {findings}"
    )
    if fid["fid"] is None or floor["fid"] is None:
        return sentence + "; too few images for FID."
    sentence += f"; their FID is {fid['fid']:.1f} against a real-to-real floor of {floor['fid']:.1f}"
    recall, floor_recall = fid.get("recall"), floor.get("recall")
    if recall is None or floor_recall is None:  # too few images for the nearest-neighbour balls
        return sentence + "."
    return (
        f"{sentence}, and they cover {recall:.0%} of the real images' variety (recall; two real samples: "
        f"{floor_recall:.0%})."
    )


def _classifier_sentence(stats: pd.DataFrame, gains: pd.DataFrame) -> str:
    fracs = sorted(f for f in stats["real_frac"].unique() if f < 1.0)
    if not fracs or not len(gains):
        return "The sweep ran no synthetic mode below all real data, so it says nothing yet about augmentation."
    frac = fracs[0]
    parts = []
    for r in gains[(gains["real_frac"] == frac) & (gains["mode"] == "mix")].itertuples():
        verdict = {1: "outside", -1: "below, outside", 0: "within"}[r.outside_spread]
        closed = "" if math.isnan(r.gap_closed) else f", {100 * r.gap_closed:.0f}% of the gap to all real"
        if closed and not r.gap_outside_spread:  # a share of a gap inside the seed spread is noise
            closed = ", all real itself not beyond the spread of real only"
        gain = f"{r.gain_mean:+.3f} ± {r.gain_std:.3f}"
        who = f"{r.source} images ({r.model})" if gains["model"].nunique() > 1 else f"{r.source} images"
        parts.append(f"{who} change mAUC by {gain} ({verdict} the seed spread{closed})")
    if not parts:
        return f"No mix-mode run at {frac:g} real to compare."
    return f"With {frac:g} of the real training images, mixed-in " + "; ".join(parts) + "."


def write_run_report(
    recipe: Recipe, paths: dict[str, Path], ledger: StepLedger, happened: list[dict[str, Any]]
) -> Path:
    """Write ``OUTPUT_DIR/report.md`` from what the run's steps left on disk; returns its path."""
    root = Path(recipe.output_dir)
    filter_lines, filt = _filter_section(root, paths)
    evaluation_lines, evaluation = _evaluation_section(root, paths)
    classifier_lines, results = _classifier_section(root, paths, recipe.classifier.metric)
    lines = [
        f"# diffcxr-aug run: {recipe.name}",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M')} on {machine_line(recipe.device)}; dataset "
        f"`{recipe.data.dataset}`, seed {recipe.seed}.",
        "",
        *_steps_section(recipe, ledger, happened),
        *_meaning(filt, evaluation, results),
        *filter_lines,
        *_generated_section(root, paths),
        *evaluation_lines,
        *classifier_lines,
    ]
    path = root / REPORT_NAME
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    logger.info("Run report: %s", path)
    return path
