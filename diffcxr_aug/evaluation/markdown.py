"""``report.md``: the evaluation record as tables a person reads (the numbers come from ``report.json``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from diffcxr_aug.evaluation.fidelity import PER_LABEL_MIN_IMAGES
from diffcxr_aug.evaluation.judge import independent_spaces
from diffcxr_aug.evaluation.privacy import COPIES_DIR


def _per_label_fid_lines(results: dict[str, Any]) -> list[str]:
    """The conditional FID table: per label and set, FID of its positives against the real test positives, the
    real-to-real floor on as many images, and the counts."""
    sets = {name: entry.get("fidelity_per_label", {}) for name, entry in results["synthetic"].items()}
    labels = sorted({label for entry in sets.values() for label in entry})
    if not labels:
        return []
    lines = [
        "",
        f"## FID per label (positives only; a label needs {PER_LABEL_MIN_IMAGES}+ images a side)",
        "",
        "Each cell: FID of the set's images whose prompt states the label against the real test images that show "
        "it, then the floor (real val against real test positives, same number of images), then the counts "
        "(synthetic / real test).",
        "",
        "| label | " + " | ".join(sets) + " |",
        "|---|" + "---|" * len(sets),
    ]
    for label in labels:
        cells = []
        for entry in sets.values():
            cell = entry.get(label, {})
            counts = f"n {cell.get('n_synthetic', 0)} / {cell.get('n_real', 0)}"
            cells.append(
                f"{cell['fid']:.2f} (floor {cell['floor']['fid']:.2f}; {counts})" if "fid" in cell else f"- ({counts})"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _feature_space_lines(results: dict[str, Any]) -> list[str]:
    """The lead table: every set in every feature space, by every fidelity metric (each number names its space)."""
    spaces = results.get("feature_spaces", {})
    if not spaces:
        return []
    lines = [
        "",
        "## Fidelity in every feature space",
        "",
        "| set | feature space | FID | KID (x1000) | precision | recall | density | coverage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for space, entry in spaces.items():
        if "floor" not in entry:
            lines.append(f"| (all) | {space} | {entry.get('note', 'not computed')} | | | | | |")
            continue
        for name, v in {"real val vs real test (floor)": entry["floor"], **entry["synthetic"]}.items():
            lines.append(
                f"| {name} | {space} | {v['fid']:.2f} | {1000 * v['kid']:.2f} | {_fmt(v.get('precision'))} "
                f"| {_fmt(v.get('recall'))} | {_fmt(v.get('density'))} | {_fmt(v.get('coverage'))} |"
            )
    lines += [
        "",
        "Feature spaces: " + "; ".join(f"{k}: {v.get('extractor', v.get('note'))}" for k, v in spaces.items()),
    ]
    return lines


def _alignment_lines(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Image-report alignment (the generator's AVA-TLS towers)",
        "",
        "Cosine similarity of each image to its own prompt (matched) and to another image's (shuffled); real test "
        "images with their own reports through the same towers are the reference.",
        "",
        "| set | matched | shuffled | difference | own prompt closer | real test: difference | own report closer |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["synthetic"].items():
        a = entry.get("alignment", {})
        if "synthetic" not in a:
            lines.append(f"| {name} | {a.get('note', 'not measured')} | | | | | |")
            continue
        syn, real = a["synthetic"], a["real_test"]
        lines.append(
            f"| {name} | {syn['matched']:.3f} | {syn['shuffled']:.3f} | {syn['difference']:+.3f} "
            f"| {syn['own_text_closer']:.1%} | {real['difference']:+.3f} | {real['own_text_closer']:.1%} |"
        )
    return lines


def format_number(value: Any, digits: int = 3, scale: float = 1.0) -> str:
    """A number for a table cell (times ``scale``, e.g. KID x 1000); blank when it could not be computed."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{scale * value:.{digits}f}" if isinstance(value, float) else str(value)


_fmt = format_number  # the short name the tables below use


def _ci_text(entry: dict[str, Any]) -> str:
    ci = entry["faithfulness"].get("mauc_ci95")
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _judge_lines(results: dict[str, Any]) -> list[str]:
    """What the reference classifier reads on the real test films, and, when that is chance, what is withheld."""
    judge = results.get("judge")
    if judge is None:  # a report written before the judge was checked
        return []
    ci = f" [{judge['ci95'][0]:.3f}, {judge['ci95'][1]:.3f}]" if judge["ci95"] else ""
    scored = ", ".join(judge["labels"]) or "none"
    lines = [
        "",
        f"Judge: the reference classifier reads the real test films at mAUC {judge['mauc']:.3f}{ci} over the labels "
        f"with {judge['min_label_support']}+ positives and negatives there ({scored})"
        + (f"; not scored: {', '.join(judge['not_scored'])}." if judge["not_scored"] else "."),
    ]
    if judge["better_than_chance"]:
        return lines
    spaces = independent_spaces(results)
    others = (
        f"The feature spaces that do not depend on it: {', '.join(spaces)} (below)."
        if spaces
        else "No feature space that does not depend on it was computed here (Inception and torchxrayvision need "
        "their weights: evaluate.features with evaluate.inception_weights / xrv_weights)."
    )
    return lines + [
        "",
        f"**It is no better than chance: {judge['reason']}.** FID, KID, precision, recall, density and coverage in "
        "its feature space, the per-label FIDs, faithfulness and the paired differences are withheld: in the "
        f"space of a judge that cannot tell the findings apart, every set looks alike. {others}",
    ]


def _withheld_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "| set | images | possible copies (pixels) | GFLOPs / image |",
        "|---|---|---|---|",
    ]
    for name, entry in results["synthetic"].items():
        pixel = entry["privacy"]["pixel"]
        lines.append(
            f"| {name} | {entry['n_images']} | {pixel['flagged']} | "
            f"{_fmt(entry['compute'].get('gflops_per_image'), 1)} |"
        )
    return lines


def report_markdown(results: dict[str, Any]) -> str:
    """The human-readable report: one row per set, then the per-label faithfulness table."""
    floor = results["real_test"]["floor"]
    lines = [
        "# Synthetic CXR evaluation",
        "",
        f"Real data: `{results['real']}`. Feature space: {results['feature_space']}.",
    ]
    if results.get("reference_note"):
        lines.append(f"Note: {results['reference_note']}.")
    lines += _judge_lines(results)
    lines += _feature_space_lines(results)
    if floor is None:  # withheld: the judge is no better than chance
        lines += _withheld_table(results) + _faithfulness_per_label_lines(results) + _alignment_lines(results)
        return "\n".join(lines + _compute_lines(results))
    lines += [
        "",
        "| set | images | FID | KID (x1000) | precision | recall | density | coverage | faithfulness mAUC "
        "| possible copies | GFLOPs / image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| real val vs real test (floor) | {floor['n_synthetic']} | {floor['fid']:.2f} | "
        f"{1000 * floor['kid']:.2f} ± {1000 * floor['kid_std']:.2f} | {_fmt(floor.get('precision'))} | "
        f"{_fmt(floor.get('recall'))} | {_fmt(floor.get('density'))} | {_fmt(floor.get('coverage'))} | "
        f"{results['real_test']['faithfulness']['mauc']:.3f} (real test) | | |",
    ]
    for name, entry in results["synthetic"].items():
        fid, priv = entry["fidelity"], entry["privacy"]
        lines.append(
            f"| {name} | {entry['n_images']} | {fid['fid']:.2f} | "
            f"{1000 * fid['kid']:.2f} ± {1000 * fid['kid_std']:.2f} | {_fmt(fid.get('precision'))} | "
            f"{_fmt(fid.get('recall'))} | {_fmt(fid.get('density'))} | {_fmt(fid.get('coverage'))} | "
            f"{entry['faithfulness']['mauc']:.3f}"
            f"{_ci_text(entry)} | "
            f"{priv['flagged_either']} ({priv['flagged_either_share']:.1%}; features {priv['flagged']}, pixels "
            f"{priv['pixel']['flagged']}) | "
            f"{_fmt(entry['compute'].get('gflops_per_image'), 1)} |"
        )
    lines += [
        "",
        "FID and KID: against the real test split, in the reference classifier's feature space; the floor row "
        f"is two real samples of the same world. FID uses {floor.get('n_synthetic_fid', floor['n_synthetic'])} "
        "images of every set (its bias depends on the count), KID all of them. Precision: the share of a set's "
        "images inside the real test images' manifold (k = 3 nearest-neighbour balls, Kynkäänniemi et al. 2019): "
        "images that look like some real image; recall: the share of real test images inside the set's manifold "
        "(the real variety it covers). Density and coverage (Naeem et al. 2020) use the real balls only: density "
        "is about 1 for a set spread as real images are, coverage the share of real balls holding a set image. "
        "Faithfulness: the reference "
        "classifier's mAUC against each image's prompt labels. Possible copies: synthetic images closer to a "
        "training image than "
        f"{1 - next(iter(results['synthetic'].values()))['privacy']['expected_share_if_like_real']:.1%} "
        "of real test images are, in the classifier's features or in pixel space (the correlation with the best "
        "aligned training film: mirror, zoom to 80% and shift tried; a set like real data flags about "
        f"{next(iter(results['synthetic'].values()))['privacy']['expected_share_if_like_real']:.1%} in each); "
        f"`{COPIES_DIR}/SET.csv` lists every image's nearest training image. Brackets: 95% bootstrap intervals "
        "over the images.",
    ]
    if results.get("paired"):
        lines += [
            "",
            "## Paired faithfulness differences (same prompts and seeds)",
            "",
            "| a - b | mAUC difference | 95% paired bootstrap CI |",
            "|---|---|---|",
        ]
        for row in results["paired"]:
            if row["ci95"] is None:
                lines.append(f"| {row['a']} - {row['b']} | not computable | |")
                continue
            low, high = row["ci95"]
            lines.append(f"| {row['a']} - {row['b']} | {row['mauc_difference']:+.3f} | [{low:+.3f}, {high:+.3f}] |")
    lines += _faithfulness_per_label_lines(results)
    lines += _per_label_fid_lines(results) + _alignment_lines(results)
    return "\n".join(lines + _compute_lines(results))


def _faithfulness_per_label_lines(results: dict[str, Any]) -> list[str]:
    lines = ["", "## Faithfulness per label (ROC AUC)", ""]
    sets = {"real test": results["real_test"]["faithfulness"]} | {
        name: entry["faithfulness"] for name, entry in results["synthetic"].items() if entry["faithfulness"]
    }
    labels = sorted({label for entry in sets.values() for label in entry["per_label"]})
    lines.append("| label | " + " | ".join(sets) + " |")
    lines.append("|---|" + "---|" * len(sets))
    for label in labels:
        cells = [_fmt(entry["per_label"].get(label)) for entry in sets.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _compute_lines(results: dict[str, Any]) -> list[str]:
    lines = ["", "## Compute", ""]
    for name, entry in results["synthetic"].items():
        lines.append(f"- **{name}**: `{json.dumps(entry['compute'], default=str)}`")
    return lines + ["", "Figures: " + ", ".join(f"`{Path(p).name}`" for p in results["figures"].values()), ""]
