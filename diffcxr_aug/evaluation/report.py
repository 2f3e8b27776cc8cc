"""``diffcxr-aug evaluate``: fidelity, faithfulness, privacy and compute of synthetic CXRs against real ones.

Everything is measured in one feature space, the penultimate layer of a *reference classifier*: a timm
model trained on the real train split (:func:`~diffcxr_aug.evaluation.faithfulness.reference_classifier`,
saved in ``OUT/reference_classifier`` and reused by later calls). Offline there is no Inception network,
and an ImageNet network is a poor judge of radiographs anyway; a CXR classifier's features are the ones
the project has, and they are the features that matter for downstream training.

* **Fidelity**: FID and KID (torchmetrics, fed those features) between each synthetic set and the real
  test split, improved precision (the share of synthetic images that fall among real ones: malformed
  images do not) and recall (the share of the real variety covered), density and coverage (the same on the
  real images' balls only), and per label FID/KID (positives against positives). All depend on the feature
  space and on the number of images, so the report also gives the *real-to-real floor*: the same measures
  between the real val and test splits, two samples of one distribution. A generator is as good as real data
  when it reaches that floor.
* **Faithfulness**: the reference classifier's mAUC on the synthetic images against their prompts'
  labels (the paper's measure), beside its mAUC on the real test split (the ceiling); and image-report
  alignment in the generator's own AVA-TLS towers (:mod:`.alignment`).
* **Privacy**: for every synthetic image, its similarity to the nearest real training image in the features and
  in pixel space (the best-aligned training film: mirror, zoom and shift tried). The yardstick is the same
  nearest-neighbour similarity of held-out real test images: a synthetic image closer to a training image than
  99.5% of real test images are, in either space, is
  flagged as a possible copy (``OUT/copies/SET.csv``), and the closest pairs are drawn side by side for a person
  to look at.
* **Compute**: what the generator's ``training_info.json`` and the job's ``synthesis.json`` recorded
  (training steps and time, GFLOPs per denoising step, sampler steps, images per second).

When the real manifest has a ``noise`` column (the phantom world), the fidelity reference is its clean
rows: a generator is judged against chest X-rays, not against the noise a filter should have removed.

The measures live in :mod:`.fidelity`, :mod:`.faithfulness`, :mod:`.alignment`, :mod:`.privacy` and
:mod:`.compute`; this module runs them on every set and writes the report.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffcxr_aug.classifiers.metrics import bootstrap_mauc_ci, paired_bootstrap_mauc_difference
from diffcxr_aug.classifiers.models import load_classifier
from diffcxr_aug.data.manifest import Manifest, read_manifest
from diffcxr_aug.errors import InputError
from diffcxr_aug.evaluation.alignment import AlignmentScorer, set_alignment
from diffcxr_aug.evaluation.compute import compute_summary
from diffcxr_aug.evaluation.faithfulness import (
    CLASSIFIER_DIR,
    REFERENCE_EPOCHS,
    REFERENCE_MODEL,
    judge_labels,
    masked_auc,
    reference_classifier,
)
from diffcxr_aug.evaluation.features import flat_metrics, space_fidelity
from diffcxr_aug.evaluation.fidelity import embed, feature_distances, per_label_fidelity
from diffcxr_aug.evaluation.judge import judge_verdict, mask_labels, thin_labels, withhold
from diffcxr_aug.evaluation.markdown import report_markdown
from diffcxr_aug.evaluation.privacy import (
    COPIES_DIR,
    aligned_similarity,
    pixel_images,
    pixel_privacy,
    plot_neighbours,
    privacy,
    write_copies,
)
from diffcxr_aug.figures import pyplot, save_figure
from diffcxr_aug.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
NEIGHBOURS_PNG = "nearest_neighbours.png"
PER_LABEL_PNG = "faithfulness_per_label.png"


def _ci(y: np.ndarray, s: np.ndarray, seed: int) -> dict[str, Any]:
    """95% bootstrap interval of a faithfulness mAUC over the images (None when it cannot be formed)."""
    try:
        low, high = bootstrap_mauc_ci(y, s, n_bootstrap=1000, rng=seed)
    except ValueError:
        return {"mauc_ci95": None}
    return {"mauc_ci95": [low, high]}


def same_prompts(a: Manifest, b: Manifest) -> bool:
    """Whether two synthetic sets were drawn from the same prompts with the same seeds, row for row."""
    columns = ("prompt", "seed")
    if len(a) != len(b) or any(c not in a.frame or c not in b.frame for c in columns):
        return False
    return all(a.frame[c].astype(str).tolist() == b.frame[c].astype(str).tolist() for c in columns)


def paired_faithfulness(
    manifests: Mapping[str, Manifest], scored: Mapping[str, tuple[np.ndarray, np.ndarray]], seed: int
) -> list[dict[str, Any]]:
    """mAUC differences, with paired bootstrap intervals, between sets made from the same prompts and seeds.

    Such sets differ only in the generator, so resampling images jointly cancels what the prompts share and
    gives the interval of the difference itself (e.g. AVA-TLS on minus off).
    """
    names, rows = list(manifests), []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if not same_prompts(manifests[a], manifests[b]):
                continue
            (s_a, y), (s_b, _) = scored[a], scored[b]
            try:
                diff, low, high = paired_bootstrap_mauc_difference(y, s_a, s_b, n_bootstrap=1000, rng=seed)
            except ValueError as error:
                logger.warning("No paired difference for %s vs %s: %s", a, b, error)
                rows.append({"a": a, "b": b, "mauc_difference": None, "ci95": None, "outside_zero": None})
                continue
            rows.append(
                {"a": a, "b": b, "mauc_difference": diff, "ci95": [low, high], "outside_zero": low > 0 or high < 0}
            )
    return rows


def _plot_per_label(results: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    sets = {"real test": results["real_test"]["faithfulness"]} | {
        name: entry["faithfulness"] for name, entry in results["synthetic"].items() if entry["faithfulness"]
    }
    labels = sorted({label for entry in sets.values() for label in entry["per_label"]})
    height = 0.8 / len(sets)
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(labels) * max(1, len(sets) / 2) + 1.8))
    for k, (name, entry) in enumerate(sets.items()):
        values = [entry["per_label"].get(label, np.nan) for label in labels]
        ax.barh(np.arange(len(labels)) + k * height, values, height=height, label=f"{name} (mAUC {entry['mauc']:.3f})")
    ax.axvline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_yticks(np.arange(len(labels)) + height * (len(sets) - 1) / 2, labels, fontsize=8)
    ax.set_xlim(0.3, 1.0)
    ax.set_xlabel("ROC AUC of the reference classifier against the prompt labels")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.6 / fig.get_figheight()), ncol=2, frameon=False)
    ax.invert_yaxis()
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def _synthetic_sets(synthetic: str | os.PathLike | Mapping[str, str | os.PathLike]) -> dict[str, Path]:
    if isinstance(synthetic, Mapping):
        sets = {str(name): Path(folder) for name, folder in synthetic.items()}
    else:
        sets = {Path(synthetic).name or "synthetic": Path(synthetic)}
    if not sets:
        raise InputError("no synthetic set given; pass --synthetic DIR (or NAME=DIR, repeated)")
    return sets


def evaluate(
    real: str | os.PathLike,
    synthetic: str | os.PathLike | Mapping[str, str | os.PathLike],
    out: str | os.PathLike,
    device: str = "auto",
    seed: int = 0,
    size: int | None = None,
    classifier: str | os.PathLike | None = None,
    model_name: str = REFERENCE_MODEL,
    epochs: int = REFERENCE_EPOCHS,
    max_train_images: int = 20000,
    features: Sequence[str] = ("reference",),
    inception_weights: str | os.PathLike | None = None,
    xrv_weights: str | None = None,
    mixed_precision: str = "auto",
    min_label_support: int = 1,
) -> Path:
    """Write ``OUT/report.json``, ``OUT/report.md`` and figures for one or more synthetic sets.

    Longer than most functions here (its measures live in their own modules): it is the one place that reads the
    sets, runs each measure on each in order and assembles the record, and #19 reshapes it around feature spaces.

    Args:
        real: the real manifest folder or CSV. Its train split trains the reference classifier (and is the
            privacy reference), its val and test splits give the real-to-real floor and the fidelity
            reference.
        synthetic: a synthetic manifest folder (``synthesize --out``), or name -> folder for several sets
            scored by the same classifier (e.g. AVA-TLS on/off, filtered/unfiltered).
        out: output folder; ``reference_classifier/`` inside it is reused by later calls.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        seed: reference classifier training and KID subsets.
        size: image side the reference classifier sees; default: the side of the first synthetic image.
        classifier: a reference classifier folder to reuse instead of training one in ``OUT``.
        model_name, epochs: the reference classifier trained when none is given or cached.
        max_train_images: privacy compares against at most this many training images (a seeded sample).
        features: the feature spaces of the fidelity table: ``reference`` (the classifier's, always computed),
            ``inception``, ``xrv``, ``open_clip:NAME_OR_DIR`` (:mod:`.features`); one that cannot be built here
            is listed with the reason.
        inception_weights, xrv_weights: the weights of those spaces (:func:`~.features.build_extractor`).
        mixed_precision: the autocast of every network run here (the reference classifier's training and
            predictions, the feature spaces): ``auto`` (bf16 on a GPU that has it, fp16 on one that has not, fp32 on
            a CPU, so CPU numbers stay those of the fp32 records), ``no``, ``bf16`` or ``fp16``; the report records
            the precision used.
        min_label_support: a label is scored (the judge's real-test mAUC, every set's faithfulness) only with this
            many positives and negatives among the real test films; the report names the labels left out. When
            the judge reads the real test films no better than chance (:mod:`.judge`), every number that depends on
            it is withheld and the report says so.

    Returns:
        The path of ``report.json``.
    """
    from PIL import Image

    from diffcxr_aug.runtime import resolve_device, resolve_mixed_precision

    out = Path(out)
    sets = _synthetic_sets(synthetic)
    real_manifest = read_manifest(real)
    synthetic_manifests = {name: read_manifest(folder) for name, folder in sets.items()}
    for name, manifest in synthetic_manifests.items():
        if len(manifest) < 2:
            raise InputError(f"{manifest.source}: synthetic set {name!r} has {len(manifest)} image(s); need 2 or more")
    splits = {split: real_manifest.split(split) for split in ("train", "val", "test")}
    for split, part in splits.items():
        if len(part) < 2:
            raise InputError(f"{real_manifest.source}: the {split} split has {len(part)} row(s); evaluate needs 2+")
    if size is None:
        first = next(iter(synthetic_manifests.values()))
        with Image.open(first.image_paths()[0]) as image:
            size = int(image.size[0])
    dev = resolve_device(device)
    precision = resolve_mixed_precision(mixed_precision, dev)

    labels = judge_labels(real_manifest)
    if classifier is not None:
        model, config = load_classifier(classifier, dev)
        model.eval()
        labels = config.label_names
    for name, manifest in synthetic_manifests.items():
        missing = [label for label in labels if label not in manifest.label_names]
        if missing:
            raise InputError(
                f"{manifest.source}: synthetic set {name!r} lacks label columns {missing}; faithfulness scores each "
                "image against its prompt's labels (the manifest synthesize writes has them)"
            )
    if classifier is None:
        model, config = reference_classifier(
            real_manifest,
            out / CLASSIFIER_DIR,
            size,
            labels,
            model_name=model_name,
            epochs=epochs,
            device=dev,
            seed=seed,
            mixed_precision=precision,
        )

    out.mkdir(parents=True, exist_ok=True)
    clean_note = None
    reference = dict(splits)
    if "noise" in real_manifest.frame.columns:
        for split in ("val", "test"):
            clean = splits[split].clean()
            if len(clean) >= 2:
                reference[split] = clean
        clean_note = "the real manifest has a noise column: val/test references are its clean rows"
    train = splits["train"]
    if len(train) > max_train_images:
        keep = np.random.default_rng(seed).choice(len(train), max_train_images, replace=False)
        train = train.subset(np.isin(np.arange(len(train)), keep))

    feats = {}
    for key, manifest in (("train", train), ("val", reference["val"]), ("test", reference["test"])):
        feats[key] = embed(model, config, manifest, dev, desc=f"features: real {key}", mixed_precision=precision)
    pixels = {
        key: pixel_images(m, config.image_size).to(dev) for key, m in (("train", train), ("test", reference["test"]))
    }
    held_out_pixels = aligned_similarity(pixels["test"], pixels["train"])[0]  # the pixel copy threshold's yardstick
    names = config.label_names
    thin = thin_labels(feats["test"][2], names, min_label_support)
    y_test = mask_labels(feats["test"][2], names, thin)
    test_auc = masked_auc(y_test, feats["test"][1], names) | _ci(y_test, feats["test"][1], seed)
    verdict = judge_verdict(test_auc, min_label_support, thin)
    if not verdict["better_than_chance"]:
        logger.warning(
            "The reference classifier is no better than chance: %s; its numbers are withheld", verdict["reason"]
        )
    # One FID sample size for the floor and every set (FID's bias depends on it).
    fid_images = min([len(feats["val"][0])] + [len(m) for m in synthetic_manifests.values()])
    results: dict[str, Any] = {
        "real": str(real_manifest.source),
        "classifier": {"model": config.model, "size": config.image_size, "labels": config.label_names},
        "feature_space": f"{config.model} penultimate layer ({feats['test'][0].shape[1]} features)",
        "reference_note": clean_note,
        "mixed_precision": precision,
        "judge": verdict,
        "real_test": {
            "n_images": len(reference["test"]),
            "faithfulness": test_auc,
            "floor": feature_distances(feats["test"][0], feats["val"][0], seed, fid_images),
        },
        "synthetic": {},
    }
    pairs, scored = [], {}
    aligners: dict[Path, tuple[AlignmentScorer, dict[str, Any]]] = {}
    for name, manifest in synthetic_manifests.items():
        f, s, y = embed(model, config, manifest, dev, desc=f"features: {name}", mixed_precision=precision)
        y = mask_labels(y, names, thin)
        scored[name] = (s, y)
        priv = privacy(f, feats["train"][0], feats["test"][0])
        pixel = pixel_privacy(pixel_images(manifest, config.image_size).to(dev), pixels["train"], held_out_pixels)
        write_copies(out / COPIES_DIR / f"{name}.csv", manifest, train, priv, pixel)
        priv["pixel"] = {k: v for k, v in pixel.items() if not k.startswith("_")}
        either = priv.pop("_flags") | pixel["_flags"]
        priv["flagged_either"], priv["flagged_either_share"] = int(either.sum()), float(either.mean())
        similarity, neighbour = priv.pop("_similarity"), priv.pop("_neighbour")
        for i in np.argsort(-similarity)[: max(2, 8 // len(synthetic_manifests))]:
            pairs.append((name, manifest, int(i), train, int(neighbour[i]), float(similarity[i])))
        entry = {
            "folder": str(sets[name]),
            "n_images": len(manifest),
            "fidelity": feature_distances(feats["test"][0], f, seed, fid_images),
            "fidelity_per_label": per_label_fidelity(
                (feats["test"][0], feats["test"][2]),
                (feats["val"][0], feats["val"][2]),
                (f, y),
                config.label_names,
                seed=seed,
            ),
            "faithfulness": masked_auc(y, s, config.label_names) | _ci(y, s, seed),
            "privacy": priv,
            "compute": compute_summary(sets[name]),
        }
        entry["alignment"] = set_alignment(sets[name], manifest, reference["test"], aligners, dev, seed)
        results["synthetic"][name] = entry
        if not verdict["better_than_chance"]:
            continue
        logger.info(
            "%s: FID %.2f (floor %.2f), KID %.4f, faithfulness mAUC %.3f (real test %.3f), %d possible copies",
            name,
            entry["fidelity"]["fid"],
            results["real_test"]["floor"]["fid"],
            entry["fidelity"]["kid"],
            entry["faithfulness"]["mauc"],
            test_auc["mauc"],
            priv["flagged"],
        )
    results["feature_spaces"] = {
        "reference": {
            "extractor": results["feature_space"],
            "floor": results["real_test"]["floor"],
            "synthetic": {name: entry["fidelity"] for name, entry in results["synthetic"].items()},
        }
    }
    for spec in dict.fromkeys(f for f in features if f != "reference"):
        results["feature_spaces"][spec] = space_fidelity(
            spec,
            reference,
            synthetic_manifests,
            config.image_size,
            fid_images,
            dev,
            seed,
            inception_weights,
            xrv_weights,
            precision,
        )
    results["paired"] = paired_faithfulness(synthetic_manifests, scored, seed)
    if not verdict["better_than_chance"]:
        results = withhold(results)
    results["metrics"] = flat_metrics(results["feature_spaces"])
    figures = {"faithfulness_per_label": str(_plot_per_label(results, out / PER_LABEL_PNG))}
    neighbours = plot_neighbours(pairs, out / NEIGHBOURS_PNG, config.image_size)
    if neighbours is not None:
        figures["nearest_neighbours"] = str(neighbours)
    results["figures"] = figures
    atomic_write_text(out / REPORT_MD, report_markdown(results))
    atomic_write_json(out / REPORT_JSON, results)
    return out / REPORT_JSON
