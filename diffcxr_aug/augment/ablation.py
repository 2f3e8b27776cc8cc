"""Ablations in the paper's table form: the recipe's loop once per arm, then one table.

A recipe with an ``ablation`` section (:class:`~diffcxr_aug.config.AblationSection`) names arms, each the recipe
with a few keys changed (``no-ava-tls: {generator.ava_tls: false}``). ``diffcxr-aug run`` then

1. prepares the data and trains the VAE once, in ``OUTPUT_DIR`` (every arm encodes in that one latent space: its
   recipe names that folder as ``vae.pretrained``);
2. runs each arm as its own recipe in ``OUTPUT_DIR/arms/NAME/`` (``data`` there links to the shared one): filter,
   train-generator, synthesize (the same prompts and seeds in every arm) and train-classifier, with its own
   ``steps.json``, so an arm that finished is skipped and one that was interrupted continues. The baseline
   runs first. An arm that only turns DKIM off (``generator.dkim: false``) of a baseline that trains it does not
   train again: its generator is the baseline's stage-1 model (``arms/NAME/generator`` links to it), so the DKIM
   row is paired with the very model DKIM was trained on;
3. trains one reference classifier and runs one ``evaluate`` over every finished arm (``OUTPUT_DIR/evaluation``;
   redone when an arm is added), so faithfulness differences against the baseline are paired image by image;
4. writes ``OUTPUT_DIR/ablation.md`` and ``ablation.json``: per arm, FID in each feature space, faithfulness mAUC
   with its interval and the paired difference, downstream mAUC (mean ± std over seeds, paired by seed against the
   baseline), GFLOPs per denoising step and wall time; the arms not run yet read "not run". ``ablation.records``
   copies the table and the small records into a folder (e.g. ``docs/results/ablation_phantom``).

``ablation.run`` picks the arms to run now, so the table can fill in over several days.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from diffcxr_aug.augment.layout import experiment_paths, final_generator, recipe_vae_plan, trains_dkim
from diffcxr_aug.augment.plan import _dump, plan_steps, run_loop
from diffcxr_aug.augment.results import RESULTS_NAME
from diffcxr_aug.augment.steps import Step, StepLedger, run_steps
from diffcxr_aug.classifiers.train import HISTORY_NAME
from diffcxr_aug.config import Recipe, RecipeError, _format_validation_error, apply_overrides, write_resolved_recipe
from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.manifest import read_manifest
from diffcxr_aug.errors import InputError
from diffcxr_aug.evaluation.faithfulness import reference_classifier
from diffcxr_aug.evaluation.report import evaluate
from diffcxr_aug.io import atomic_write_json, atomic_write_text
from diffcxr_aug.runtime import resolve_device

logger = logging.getLogger(__name__)

ARMS_DIR = "arms"
TABLE_MD = "ablation.md"
TABLE_JSON = "ablation.json"
REFERENCE_DIR = "reference_classifier"
SHARED_STEPS = ("prepare", "train-vae")
ARM_STEPS = ("filter", "train-generator", "synthesize", "train-classifier")


def arm_order(recipe: Recipe) -> list[str]:
    """Every arm, the baseline first (an arm may reuse its stage-1 model)."""
    section = recipe.ablation
    return [section.baseline, *[name for name in section.arms if name != section.baseline]]


def reuses_baseline_stage1(recipe: Recipe, name: str) -> bool:
    """Whether arm ``name`` only turns DKIM off of a baseline that trains it: it samples the baseline's stage 1."""
    section = recipe.ablation
    changes = section.arms[name] or {}
    return name != section.baseline and changes == {"generator.dkim": False} and trains_dkim(recipe)


def arm_recipe(recipe: Recipe, name: str) -> Recipe:
    """The recipe of arm ``name`` in ``OUTPUT_DIR/arms/NAME``, without the
    shared steps and without its own ``evaluate`` (one evaluation scores every arm)."""
    section = recipe.ablation
    changes = section.arms[name] or {}
    data = recipe.model_dump(mode="json")
    data.pop("ablation")
    data["name"] = f"{recipe.name}-{name}"
    data["output_dir"] = str(Path(recipe.output_dir) / ARMS_DIR / name)
    data["steps"] = [s for s in recipe.steps if s in ARM_STEPS]
    data["evaluate"]["enabled"] = False
    plan = recipe_vae_plan(recipe)
    if plan.pretrained is None:  # the VAE the shared train-vae step trains: every arm loads it, none trains one
        data["vae"] = {"pretrained": str(experiment_paths(recipe)["vae"]), "size": plan.size}
    data = apply_overrides(data, [f"{key}={json.dumps(value)}" for key, value in changes.items()])
    try:
        arm = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_validation_error(err, f"ablation arm {name!r}")) from None
    if reuses_baseline_stage1(recipe, name):
        arm = arm.model_copy(update={"steps": [s for s in arm.steps if s in ("synthesize", "train-classifier")]})
    return arm


def _link(link: Path, target: Path) -> None:
    """``link`` -> ``target`` as a relative symlink (kept when it already points there)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == relative:
        return
    if link.exists() or link.is_symlink():
        raise InputError(f"{link} exists and is not a link to {target}; move it away to run this ablation arm")
    link.symlink_to(relative, target_is_directory=True)


def _arm_done(arm: Recipe) -> bool:
    """Every step the arm's plan runs is done (not every name in its ``steps``: an arm with ``filter.enabled:
    false`` never runs its filter)."""
    ledger = StepLedger(arm.output_dir)
    return all(ledger.records.get(step.name, {}).get("status") == "done" for step in plan_steps(arm))


def _shared_steps(recipe: Recipe) -> list[Step]:
    """prepare and train-vae (when the VAE is trained) of the recipe, in ``OUTPUT_DIR``."""
    base = recipe.model_copy(update={"steps": ["prepare", "train-generator"], "ablation": None})
    return [step for step in plan_steps(base) if step.name in SHARED_STEPS]


def _reference_step(recipe: Recipe, upstream: dict[str, str]) -> Step:
    root, section = Path(recipe.output_dir), recipe.evaluate
    size = section.image_size or recipe.data.size

    def run() -> None:
        real = read_manifest(experiment_paths(recipe)["data"])
        labels = [name for name in CHEXPERT_LABELS if name in real.label_names] or real.label_names
        reference_classifier(
            real, root / REFERENCE_DIR, size, labels, section.model, section.epochs,
            device=resolve_device(recipe.device), seed=recipe.seed,
        )  # fmt: skip

    settings = {"evaluate": {k: v for k, v in _dump(section).items() if k in ("model", "epochs", "image_size")}}
    settings |= {"size": size, "seed": recipe.seed, "upstream": upstream}
    return Step("reference-classifier", settings, [root / REFERENCE_DIR], [root / REFERENCE_DIR / HISTORY_NAME], run)


def _evaluate_step(recipe: Recipe, finished: dict[str, Recipe], upstream: dict[str, str]) -> Step:
    root, section = Path(recipe.output_dir), recipe.evaluate
    sets = {name: experiment_paths(arm)["synthetic"] for name, arm in finished.items()}

    def run() -> None:
        evaluate(
            experiment_paths(recipe)["data"], sets, root / "evaluation", device=recipe.device, seed=recipe.seed,
            size=section.image_size or recipe.data.size, classifier=root / REFERENCE_DIR, features=section.features,
            inception_weights=section.inception_weights, xrv_weights=section.xrv_weights,
        )  # fmt: skip

    arms = {name: StepLedger(arm.output_dir).records["synthesize"]["fingerprint"] for name, arm in finished.items()}
    settings = {"evaluate": _dump(section), "seed": recipe.seed, "arms": arms, "upstream": upstream}
    return Step("evaluate-arms", settings, [root / "evaluation"], [root / "evaluation" / "report.json"], run)


def run_ablation(recipe: Recipe, echo: Callable[[str], None] | None = None) -> Path:
    """Run the shared steps, the arms asked for, the joint evaluation and the table; returns ``ablation.md``."""
    echo = echo or (lambda line: logger.info("%s", line))
    section, root = recipe.ablation, Path(recipe.output_dir)
    arms = {name: arm_recipe(recipe, name) for name in arm_order(recipe)}  # every arm validates before any work
    write_resolved_recipe(recipe)
    ledger = StepLedger(root)
    shared = _shared_steps(recipe)
    echo(f"ablation {recipe.name}: shared steps ({', '.join(s.name for s in shared)})")
    run_steps(shared, ledger, echo=echo)
    upstream = {step.name: step.fingerprint for step in shared}
    paths = experiment_paths(recipe)
    wanted = section.run if section.run is not None else list(section.arms)
    for name, arm in arms.items():
        if name not in wanted:
            echo(f"ablation arm {name}: not asked for (ablation.run); left as it is")
            continue
        arm_root = Path(arm.output_dir)
        _link(arm_root / "data", paths["data"])
        if reuses_baseline_stage1(recipe, name):
            _link(arm_root / "generator", experiment_paths(arms[section.baseline])["generator"])
        echo(f"ablation arm {name} ({_changes_text(section.arms[name])}) in {arm_root}")
        run_loop(arm, echo=lambda line, name=name: echo(f"  {name} {line}"))
    finished = {name: arm for name, arm in arms.items() if _arm_done(arm)}
    if finished:
        reference = _reference_step(recipe, upstream)
        steps = [reference, _evaluate_step(recipe, finished, {**upstream, reference.name: reference.fingerprint})]
        run_steps(steps, ledger, echo=echo)
    table = ablation_table(recipe, arms, finished)
    if section.records is not None:
        copy_records(recipe, arms, finished, Path(section.records))
    return table


def _changes_text(changes: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}: {json.dumps(v)}" for k, v in (changes or {}).items()) or "the recipe as it stands"


# --------------------------------------------------------------------------------------------------- the table
def _mean_std(values: list[float]) -> dict[str, float | int | None]:
    values = [float(v) for v in values if v is not None and not np.isnan(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}  # fmt: skip


def _downstream(arm: Recipe, metric: str) -> dict[str, Any]:
    """Per real fraction of the arm's synthetic modes: the metric by seed, with mean and std."""
    path = experiment_paths(arm)["classifiers"] / RESULTS_NAME
    if not path.is_file():
        return {}
    frame = pd.read_csv(path)
    column = "mauc_truth" if metric == "truth" and "mauc_truth" in frame else "mauc"
    out: dict[str, Any] = {}
    for (frac, mode), group in frame.groupby(["real_frac", "mode"]):
        by_seed = {int(s): float(v) for s, v in zip(group["seed"], group[column], strict=True)}
        out[f"{mode}@{frac:g}"] = {"metric": column, "by_seed": by_seed, **_mean_std(list(by_seed.values()))}
    return out


def _generator_record(arm: Recipe) -> dict[str, Any]:
    info_path = final_generator(arm, experiment_paths(arm)) / "training_info.json"
    if not info_path.is_file():
        return {}
    info = json.loads(info_path.read_text())
    record = {"gflops_per_denoising_step": info.get("gflops_per_denoising_step"), "stage": info.get("stage", 1)}
    minutes = info.get("wall_minutes_total")
    if info.get("stage", 1) == 2:
        stage1 = json.loads((experiment_paths(arm)["generator"] / "training_info.json").read_text())
        minutes = (minutes or 0.0) + (stage1.get("wall_minutes_total") or 0.0)
        record["steps"] = {"stage1": stage1.get("steps"), "stage2": info.get("steps")}
    else:
        record["steps"] = {"stage1": info.get("steps")}
    record["generator_minutes"] = minutes
    return record


def ablation_table(recipe: Recipe, arms: dict[str, Recipe], finished: dict[str, Recipe]) -> Path:
    """``ablation.json`` and ``ablation.md`` from what the arms and the joint evaluation left on disk."""
    section, root = recipe.ablation, Path(recipe.output_dir)
    report_path = root / "evaluation" / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {"synthetic": {}, "paired": []}
    paired = {(p["a"], p["b"]): p for p in report.get("paired", [])}
    spaces = report.get("feature_spaces", {})
    rows = []
    for name, arm in arms.items():
        row: dict[str, Any] = {"arm": name, "changes": section.arms[name] or {}, "run": name in finished}
        if name in finished and name in report["synthetic"]:
            entry = report["synthetic"][name]
            row["fid"] = {
                space: (body.get("synthetic", {}).get(name) or {}).get("fid") if "synthetic" in body else None
                for space, body in spaces.items()
            }
            row["fid_notes"] = {space: body.get("note") for space, body in spaces.items() if "synthetic" not in body}
            faith = entry["faithfulness"] or {}  # None: withheld, the judge reads real films at chance
            row["faithfulness"] = {"mauc": faith.get("mauc"), "ci95": faith.get("mauc_ci95")}
            if name != section.baseline:
                p = paired.get((name, section.baseline)) or paired.get((section.baseline, name))
                if p is not None and p.get("mauc_difference") is not None:
                    sign = 1.0 if p["a"] == name else -1.0
                    low, high = (sign * v for v in p["ci95"])
                    row["faithfulness"]["paired_vs_baseline"] = {
                        "difference": sign * p["mauc_difference"], "ci95": sorted([low, high]),
                    }  # fmt: skip
            ledger = StepLedger(arm.output_dir)
            row["arm_minutes"] = round(sum(r.get("seconds", 0.0) for r in ledger.records.values()) / 60, 2)
        if name in finished:
            row["downstream"] = _downstream(arm, recipe.classifier.metric)
            row["generator"] = _generator_record(arm)
        rows.append(row)
    base = next((r for r in rows if r["arm"] == section.baseline), None)
    for row in rows:
        if row is base or base is None or "downstream" not in row or "downstream" not in base:
            continue
        for key, value in row["downstream"].items():
            other = base["downstream"].get(key)
            if other is None:
                continue
            seeds = sorted(set(value["by_seed"]) & set(other["by_seed"]))
            value["paired_vs_baseline"] = _mean_std([value["by_seed"][s] - other["by_seed"][s] for s in seeds])
    table = {"recipe": recipe.name, "baseline": section.baseline, "metric": recipe.classifier.metric, "arms": rows}
    atomic_write_json(root / TABLE_JSON, table)
    atomic_write_text(root / TABLE_MD, ablation_markdown(table))
    return root / TABLE_MD


def _fmt(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ms(entry: dict[str, Any] | None, digits: int = 3, signed: bool = False) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    sign = "+" if signed else ""
    return f"{entry['mean']:{sign}.{digits}f} ± {entry['std']:.{digits}f}"


def ablation_markdown(table: dict[str, Any]) -> str:
    rows = table["arms"]
    spaces = sorted({s for r in rows for s in r.get("fid", {})})
    downstream = sorted({k for r in rows for k in r.get("downstream", {})})
    head = ["arm", "changes", *[f"FID ({s})" for s in spaces], "faithfulness mAUC [95% CI]",
            f"vs {table['baseline']} (paired)"]  # fmt: skip
    for key in downstream:
        head += [f"downstream {key} (mean ± std)", f"vs {table['baseline']} (by seed)"]
    head += ["GFLOPs / denoising step", "generator min", "arm min"]
    lines = [
        f"# Ablation: {table['recipe']}",
        "",
        f"Each arm is the recipe with the keys under 'changes'; {table['baseline']} is the baseline. Faithfulness is "
        "scored by one reference classifier on images from the same prompts and seeds (paired bootstrap over "
        f"images); downstream is the classifiers' test mAUC ({table['metric']} labels), paired by seed.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["arm"], _changes_text(r["changes"])]
        if not r["run"]:
            lines.append("| " + " | ".join(cells + ["not run"] * (len(head) - 2)) + " |")
            continue
        cells += [_fmt(r.get("fid", {}).get(s), 2) for s in spaces]
        faith = r.get("faithfulness", {})
        ci = faith.get("ci95")
        withheld = not faith or faith.get("mauc") is None
        cells.append("–" if withheld else f"{faith['mauc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        p = faith.get("paired_vs_baseline")
        cells.append("–" if p is None else f"{p['difference']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]")
        for key in downstream:
            value = r.get("downstream", {}).get(key)
            cells += [_ms(value), _ms((value or {}).get("paired_vs_baseline"), signed=True)]
        gen = r.get("generator", {})
        cells += [_fmt(gen.get("gflops_per_denoising_step"), 3), _fmt(gen.get("generator_minutes"), 1),
                  _fmt(r.get("arm_minutes"), 1)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    notes = {space: note for r in rows for space, note in r.get("fid_notes", {}).items() if note}
    if notes:
        lines += ["", *[f"- FID ({space}) not computed: {note}" for space, note in notes.items()]]
    return "\n".join(lines) + "\n"


def copy_records(recipe: Recipe, arms: dict[str, Recipe], finished: dict[str, Recipe], dest: Path) -> None:
    """The table, the joint evaluation's report and each finished arm's small records, into ``dest``."""
    root = Path(recipe.output_dir)
    dest.mkdir(parents=True, exist_ok=True)
    for name in (TABLE_MD, TABLE_JSON, "recipe.resolved.yaml"):
        shutil.copy2(root / name, dest / name)
    for name in ("report.md", "report.json", "faithfulness_per_label.png"):
        if (root / "evaluation" / name).is_file():
            shutil.copy2(root / "evaluation" / name, dest / f"evaluation_{name}")
    for name, arm in finished.items():
        paths, target = experiment_paths(arm), dest / name
        target.mkdir(exist_ok=True)
        files = {
            "steps.json": Path(arm.output_dir) / "steps.json",
            "training_info.json": final_generator(arm, paths) / "training_info.json",
            "results.csv": paths["classifiers"] / RESULTS_NAME,
            "filter_report.json": paths["filtered"] / "filter_report.json",
        }
        for out_name, path in files.items():
            if path.is_file():
                shutil.copy2(path, target / out_name)
