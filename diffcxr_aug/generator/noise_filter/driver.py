"""The file-level LNFS driver behind ``diffcxr-aug filter``: :func:`run_filter`.

It reads a manifest, gets a VAE (given, loaded, or trained on the data), reads every image's latents from the
manifest's latent store (:mod:`~diffcxr_aug.generator.latent_store`, encoding them there when missing), fits a
:class:`~diffcxr_aug.generator.noise_filter.estimator.LatentNoiseFilter` on them and writes ``scores.csv``, the kept
``manifest.csv`` with the kept rows' latent store beside it, ``filter_report.json`` and two montages.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from diffcxr_aug.data.dataset import equalize
from diffcxr_aug.errors import InputError, MissingInputError
from diffcxr_aug.figures import save_figure
from diffcxr_aug.generator.latent_store import derive_latent_store, open_latent_store
from diffcxr_aug.generator.noise_filter.estimator import LatentNoiseFilter
from diffcxr_aug.generator.noise_filter.scoring import evaluate_scores
from diffcxr_aug.generator.settings import FilterSettings
from diffcxr_aug.io import atomic_path, atomic_write_json

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    from diffcxr_aug.data.manifest import Manifest
    from diffcxr_aug.generator.vae import VAEPlan

logger = logging.getLogger(__name__)

SCORES_NAME = "scores.csv"
REPORT_NAME = "filter_report.json"
MONTAGE_FLAGGED_NAME = "montage_flagged.png"
MONTAGE_BORDERLINE_NAME = "montage_borderline.png"


def _read_known_noisy(path: Path, manifest: Manifest) -> tuple[np.ndarray, list[Path]]:
    """Rows of ``manifest`` the user marks noisy, and noisy image files outside it.

    A path in the CSV's ``image_path`` column matches a manifest row when it is spelled as in the
    manifest, or when it resolves (absolute, or relative to the CSV's folder) to the same file. A path
    that matches no row but names an existing image is used as an extra noisy example.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"known_noisy: no such file {path}; give a CSV with an image_path column")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "image_path" not in frame.columns:
        raise InputError(f"{path}: no image_path column (found {list(frame.columns)}); list the noisy images there")
    spelled = {p: i for i, p in enumerate(manifest.frame["image_path"])}
    resolved = {os.path.realpath(p): i for i, p in enumerate(manifest.image_paths())}
    mask = np.zeros(len(manifest), dtype=bool)
    extra: list[Path] = []
    for line, value in enumerate(frame["image_path"].str.strip(), start=2):
        if not value:
            raise InputError(f"{path}, row {line}: empty image_path")
        if value in spelled:
            mask[spelled[value]] = True
            continue
        candidate = Path(value) if Path(value).is_absolute() else path.parent / value
        row = resolved.get(os.path.realpath(candidate))
        if row is not None:
            mask[row] = True
        elif candidate.is_file():
            extra.append(candidate)
        else:
            raise MissingInputError(
                f"{path}, row {line}: {value!r} is neither an image_path of {manifest.source} nor an existing file "
                f"(relative paths are read from {path.parent})"
            )
    return mask, extra


def _load_images(paths: list[Path], size: int) -> torch.Tensor:
    from diffcxr_aug.data.images import load_image, to_uint8_square

    arrays = [to_uint8_square(load_image(p), size) for p in paths]
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0).unsqueeze(1)


def default_vae_plan() -> VAEPlan:
    """The latent space of a recipe that says nothing about it (the default generator config's VAE)."""
    from diffcxr_aug.generator.configs import resolve_config
    from diffcxr_aug.generator.settings import GeneratorSettings, VAESettings
    from diffcxr_aug.generator.vae import plan_vae

    return plan_vae(VAESettings(), resolve_config(GeneratorSettings()))


def _resolve_vae(
    vae: AutoencoderKL | str | os.PathLike | None,
    plan: VAEPlan,
    manifest: Manifest,
    out: Path,
    device: torch.device,
    seed: int,
    progress: bool,
) -> tuple[AutoencoderKL, dict]:
    """The VAE given (a model, or a folder / hub id to load), or else the planned one, trained here under ``vae/``
    (or loaded when it is pretrained)."""
    from diffusers import AutoencoderKL

    from diffcxr_aug.generator.vae import load_vae

    if isinstance(vae, AutoencoderKL):
        return vae, {"source": "given"}
    source = vae if vae is not None else plan.pretrained
    if source is not None:
        info: dict[str, Any] = {"source": str(source)}
        metrics = Path(source) / "metrics.json"
        if metrics.is_file():  # a KL-VAE trained by this project (the train-vae step): keep its record
            info.update(json.loads(metrics.read_text(encoding="utf-8")))
        return load_vae(source), info
    logger.info("No VAE given: training %s for %d steps on %s", plan.config, plan.steps, manifest.source)
    model, metrics = plan.train(manifest, out / "vae", device=str(device), seed=seed, progress=progress)
    return model, {"source": str(out / "vae"), "trained_here": True, **metrics}


def _draw_montage(
    images: np.ndarray, titles: list[str], flagged: list[bool], heading: str, path: Path, columns: int = 8
) -> None:
    """A grid of images with one caption each (red: flagged, blue: kept), written atomically."""
    from matplotlib.figure import Figure

    rows = max(1, math.ceil(len(images) / columns))
    fig = Figure(figsize=(1.6 * columns, 1.85 * rows + 0.4), dpi=100)
    fig.suptitle(heading, fontsize=10)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, title, is_flagged in zip(axes.ravel(), images, titles, flagged, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=7, color="crimson" if is_flagged else "navy", pad=2)
    fig.tight_layout()
    save_figure(fig, path)


def _write_montages(
    manifest: Manifest, scores: pd.DataFrame, threshold: float, size: int, out: Path, n: int = 32
) -> list[Path]:
    from diffcxr_aug.data.cache import open_cache

    images = open_cache(manifest.full, size, progress=False)
    file_rows = manifest.frame.index.to_numpy()  # the cache holds the whole file; ``manifest`` may be a subset
    has_noise = "noise" in scores.columns

    def caption(i: int) -> str:
        text = f"{scores['score'].iat[i]:.3f}"
        if has_noise:
            text += "\n" + (scores["noise"].iat[i] or "clean")
        return text

    order = np.argsort(-scores["score_logit"].to_numpy(), kind="stable")  # the log-odds: no ties at 1.0
    flagged = scores["flagged"].to_numpy(dtype=bool)
    top = order[:n]
    # Borderline: the images on either side of the threshold, half flagged and half kept.
    n_flagged = int(flagged.sum())
    start = max(0, min(n_flagged - n // 2, len(order) - n))
    border = order[start : start + n]
    written = []
    for rows, name, heading in (
        (top, MONTAGE_FLAGGED_NAME, f"LNFS: the {len(top)} highest noise scores"),
        (border, MONTAGE_BORDERLINE_NAME, f"LNFS: borderline images around the threshold {threshold:.3g}"),
    ):
        path = out / name
        _draw_montage(
            np.asarray(images[file_rows[rows]]),
            [caption(i) for i in rows],
            [bool(flagged[i]) for i in rows],
            heading,
            path,
        )
        written.append(path)
    return written


def _label_prevalence(manifest: Manifest, flagged: np.ndarray) -> dict[str, dict[str, float | None]]:
    """Share of images marked positive (``1``) per label, among flagged and among kept images.

    Does the filter remove pathology? A filter that prefers to drop, say, films with support devices would
    teach the generator that they are rarer than they are.
    """
    positive = manifest.labels() == 1  # NaN (unknown) compares False
    out: dict[str, dict[str, float | None]] = {}
    for j, name in enumerate(manifest.label_names):
        out[name] = {
            group: float(positive[rows, j].mean()) if rows.any() else None
            for group, rows in (("flagged", flagged), ("kept", ~flagged))
        }
    return out


def _relative_to(paths: list[Path], folder: Path) -> list[str]:
    """Paths as seen from ``folder`` (relative when possible, so a moved run folder keeps working)."""
    folder = folder.resolve()
    out = []
    for p in paths:
        try:
            out.append(os.path.relpath(p.resolve(), folder))
        except ValueError:  # another drive on Windows
            out.append(str(p.resolve()))
    return out


def run_filter(
    data: str | os.PathLike,
    out: str | os.PathLike,
    section: FilterSettings,
    vae: AutoencoderKL | str | os.PathLike | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    size: int | None = None,
    vae_plan: VAEPlan | None = None,
) -> Path:
    """Score every image of a manifest for noise with LNFS and write the kept manifest.

    The rows whose ``view`` is in ``section.drop_views`` are dropped first, by their metadata: LNFS never sees
    them. Writes into ``out``: ``scores.csv`` (every input row, in order: ``image_path, score, flagged, reason``
    (``lnfs``, ``known noisy``, ``view LATERAL``, or empty when kept), then the per-stage scores, the K-means
    cluster, the split and, when known, the ``noise`` truth; a row dropped by its view has no scores),
    ``manifest.csv`` (the kept rows, image paths rewritten to resolve from ``out``), ``montage_flagged.png``,
    ``montage_borderline.png``, ``filter_report.json`` (threshold, share flagged, estimated contamination, rows
    dropped by view, counts, timings and, when the manifest has a ``noise`` column, ROC AUC of each stage, the
    share of clean images removed and the recall per noise kind) and, when no VAE is given, the VAE trained here
    under ``vae/``.

    The latents come from the latent store of the scored rows beside the data's image cache, the one a generator
    trained on the same manifest with the same VAE and size reads (``normalize: equalize`` encodes other latents,
    into a store of their own). With ``normalize: none`` the kept rows' latents are copied into the store of the
    kept manifest (``out/cache/``), so a generator trained on it encodes nothing either.

    Args:
        data: a folder holding ``manifest.csv`` (or the file itself).
        out: output folder; must differ from the data folder.
        section: the recipe's ``filter`` section.
        vae: an ``AutoencoderKL``, or a folder (the ``train-vae`` step's output) or hub id to load. Without it,
            ``vae_plan`` is trained on the data's train split first (or loaded, when it names a pretrained VAE).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        seed: seed of the VAE training and of the filter.
        progress: show progress bars.
        size: the image side the images are encoded at; ``None``: ``vae_plan``'s.
        vae_plan: the latent space (:func:`~diffcxr_aug.generator.vae.plan_vae`); ``None``: the default recipe's
            (the ``phantom-64`` generator config's kl-f4 VAE at 64 px).

    Returns:
        The path of the kept manifest.
    """
    from diffcxr_aug.data.manifest import read_manifest, write_manifest
    from diffcxr_aug.generator.vae import latent_shape
    from diffcxr_aug.runtime import resolve_device

    # 1. Check inputs (before any expensive work)
    everything = read_manifest(data)
    out = Path(out)
    if out.resolve() == everything.root.resolve():
        raise InputError(f"--out {out} is the data folder; the kept manifest would overwrite {everything.source}")
    dev = resolve_device(device)
    # Metadata first: the rows whose view or modality says they do not belong never reach the latents.
    reasons = _metadata_reasons(everything, section)
    dropped = reasons != ""
    if dropped.all():
        raise InputError(
            f"{everything.source}: every row is dropped by its metadata (drop_views {section.drop_views}, "
            f"drop_modalities {section.drop_modalities}); nothing is left to filter"
        )
    manifest = everything.subset(~dropped) if dropped.any() else everything
    if dropped.any():
        counts = pd.Series(reasons[dropped]).value_counts().to_dict()
        logger.info("LNFS: %d rows dropped by their metadata before scoring (%s)", int(dropped.sum()), counts)
    known = np.zeros(len(manifest), dtype=bool)
    extra_paths: list[Path] = []
    if section.known_noisy is not None:
        known, extra_paths = _read_known_noisy(section.known_noisy, manifest)
    filt = LatentNoiseFilter.from_section(section, seed=seed, device=dev, progress=progress)
    plan = vae_plan if vae_plan is not None else default_vae_plan()
    size = size or plan.size
    out.mkdir(parents=True, exist_ok=True)

    # 2. Latent space
    started = time.perf_counter()
    model, vae_info = _resolve_vae(vae, plan, manifest, out, dev, seed, progress)
    latent_shape(model, size)  # fails early on a size the VAE cannot encode
    vae_seconds = time.perf_counter() - started

    # 3. Every row's latents (all splits: noisy images are removed wherever they are), from the store of the scored
    # rows: the whole manifest unless views were dropped, so that a generator on this manifest finds it finished
    started = time.perf_counter()
    store = open_latent_store(manifest, model, size, transform=section.normalize, device=dev, progress=progress)
    transform = equalize if section.normalize == "equalize" else None
    extra = _encode_files(model, extra_paths, size, dev, transform) if extra_paths else None
    encode_seconds = time.perf_counter() - started

    # 4. Filter (on the memory map: the filter reads it a chunk at a time)
    filt.fit(store.array, known_noisy=known, extra_noisy=extra)

    # 5. Write scores, kept manifest, montages and report
    scores = _scores(filt, manifest, _relative_to(manifest.image_paths(), out), known)
    _write_scores(scores, everything, reasons, out, out / SCORES_NAME)
    kept = manifest.frame.assign(image_path=scores["image_path"].to_numpy()).loc[~filt.flagged_]
    manifest_path = write_manifest(kept, out / "manifest.csv")
    if section.normalize == "none":  # the generator encodes the images as they are: these are its latents
        derive_latent_store(store, np.flatnonzero(~filt.flagged_), read_manifest(manifest_path))
    montages = _write_montages(manifest, scores, filt.threshold_, size, out)
    report = _filter_report(filt, section, manifest, scores, known, len(extra_paths), vae_info, size, seed)
    report["dropped_by_view"] = _dropped_by_view(everything, reasons, section)
    if section.drop_modalities:
        report["dropped_by_modality"] = {
            "modalities": list(section.drop_modalities),
            "rows": int(pd.Series(reasons).str.startswith("modality ").sum()),
        }
    report["seconds"] = {"vae": vae_seconds, "encode": encode_seconds, **filt.timings_}
    report["files"] = [SCORES_NAME, "manifest.csv", *(p.name for p in montages), REPORT_NAME]
    atomic_write_json(out / REPORT_NAME, report)
    logger.info("LNFS kept %d of %d images; wrote %s", report["kept"], report["images"], out)
    return manifest_path


def _encode_files(
    model: AutoencoderKL,
    paths: list[Path],
    size: int,
    device: torch.device,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Latents of image files outside the manifest (the known noisy extras), on the CPU, each image through
    ``transform`` first as the manifest's are."""
    from diffcxr_aug.generator.vae import encode

    images = _load_images(paths, size)
    if transform is not None:
        images = torch.stack([transform(image) for image in images])
    with torch.no_grad():
        return encode(model.to(device).eval(), images.to(device)).float().cpu()


def _scores(filt: LatentNoiseFilter, manifest: Manifest, paths: list[str], known: np.ndarray) -> pd.DataFrame:
    """One row per scored manifest row: the scores and flags of the fitted ``filt``, and why a row is flagged."""
    scores = filt.train_scores_.frame()
    scores.insert(0, "image_path", paths)
    scores.insert(2, "flagged", filt.flagged_.astype(int))
    scores.insert(3, "reason", np.where(known, "known noisy", np.where(filt.flagged_, "lnfs", "")))
    scores["confident_normal"] = filt.normal_mask_.astype(int)
    scores["pseudo_label"] = filt.pseudo_label_
    scores["known_noisy"] = known.astype(int)
    scores["split"] = manifest.frame["split"].to_numpy()
    if "noise" in manifest.frame.columns:
        scores["noise"] = manifest.frame["noise"].to_numpy()
    return scores


def _metadata_reasons(everything: Manifest, section: FilterSettings) -> np.ndarray:
    """Per row, why its metadata drops it before LNFS (``view LATERAL``, ``modality CT``), or ``""``."""
    frame = everything.frame
    views = frame["view"].astype(str)
    reasons = np.where(views.isin(section.drop_views or ()), "view " + views, "")
    if section.drop_modalities:
        if "meta_modality" not in frame.columns:
            raise InputError(
                f"{everything.source}: filter.drop_modalities {section.drop_modalities} reads the meta_modality "
                "column, which this manifest does not have; remove drop_modalities"
            )
        modality = frame["meta_modality"].fillna("").astype(str).str.strip()
        by_modality = modality.str.upper().isin(section.drop_modalities).to_numpy()
        reasons = np.where((reasons == "") & by_modality, "modality " + modality, reasons)
    return np.asarray(reasons, dtype=object)


def _write_scores(scores: pd.DataFrame, everything: Manifest, reasons: np.ndarray, out: Path, path: Path) -> None:
    """Write ``scores.csv`` for every row of the input manifest, in its order: the LNFS rows' ``scores``, and the
    rows dropped by their metadata, flagged with the reason (``view LATERAL``, ``modality CT``; no score: LNFS never
    saw them)."""
    dropped = reasons != ""
    if dropped.any():
        rows = everything.subset(dropped)
        extra = pd.DataFrame(
            {
                "image_path": _relative_to(rows.image_paths(), out),
                "flagged": 1,
                "reason": reasons[dropped],
                "known_noisy": 0,
                "split": rows.frame["split"].to_numpy(),
            }
        )
        if "noise" in scores.columns:
            extra["noise"] = rows.frame["noise"].to_numpy()
        order = np.argsort(np.r_[np.flatnonzero(~dropped), np.flatnonzero(dropped)], kind="stable")
        scores = pd.concat([scores, extra[[c for c in scores.columns if c in extra.columns]]], ignore_index=True)
        scores = scores.iloc[order].reset_index(drop=True)
    with atomic_path(path) as tmp:
        scores.to_csv(tmp, index=False, encoding="utf-8", float_format="%.6g")


def _dropped_by_view(everything: Manifest, reasons: np.ndarray, section: FilterSettings) -> dict:
    """What ``drop_views`` removed before LNFS, and (with a ``noise`` column) how much of the noise that was."""
    dropped = pd.Series(reasons).str.startswith("view ").to_numpy()
    views = everything.frame["view"].astype(str)
    record: dict[str, Any] = {
        "views": list(section.drop_views or []),
        "rows": int(dropped.sum()),
        "by_view": views[dropped].value_counts().astype(int).to_dict(),
    }
    if "noise" in everything.frame.columns:
        noise = everything.frame["noise"].fillna("").astype(str).to_numpy()
        record["noisy_rows"] = int((dropped & (noise != "")).sum())
        record["clean_rows"] = int((dropped & (noise == "")).sum())
    return record


def _filter_report(
    filt: LatentNoiseFilter,
    section: FilterSettings,
    manifest: Manifest,
    scores: pd.DataFrame,
    known: np.ndarray,
    n_extra: int,
    vae_info: dict,
    size: int,
    seed: int,
) -> dict:
    """The content of ``filter_report.json`` but its ``seconds`` and ``files`` (the caller adds those).

    With a ``noise`` column in the manifest, adds the ``evaluation`` against that truth and logs its AUCs.
    """
    report = {
        "data": manifest.source,
        "images": len(manifest),
        "flagged": int(filt.flagged_.sum()),
        "kept": int((~filt.flagged_).sum()),
        "flagged_by_split": scores.groupby("split")["flagged"].sum().astype(int).to_dict(),
        "threshold": {
            "rule": section.threshold,
            "value": filt.threshold_,
            "flagged_share": float(filt.flagged_.mean()),
            "estimated_contamination": filt.estimated_contamination_,
            "contamination": section.contamination,
            "quantile": section.quantile,
        },
        "known_noisy": {"in_manifest": int(known.sum()), "extra_images": n_extra},
        "stages": {
            "kmeans": {
                "n_clusters": section.n_clusters,
                "cluster_shares": np.round(filt.cluster_shares_, 4).tolist(),
                "typical_clusters": filt.typical_clusters_.tolist(),
                "confident_normals": int(filt.normal_mask_.sum()),
            },
            "manifold": {
                "components": [m.pca_.n_components_ for m in filt.manifolds_],
                "explained_variance": [float(m.pca_.explained_variance_ratio_.sum()) for m in filt.manifolds_],
            },
            "discriminator": {
                "positives": int((filt.pseudo_label_ == 1).sum()),
                "negatives": int((filt.pseudo_label_ == 0).sum()),
                "folds": filt.folds,
                "steps": section.discriminator_steps,
            },
        },
        "vae": vae_info,
        "image_size": size,
        "normalize": section.normalize,
        "latent_shape": list(filt.latent_shape_),
        # Filled in by run_filter; placed here so that the report keeps its key order.
        "seconds": {},
        "files": [],
        "section": section.model_dump(mode="json"),
        "seed": seed,
        "label_prevalence": _label_prevalence(manifest, filt.flagged_),
    }
    if "noise" in manifest.frame.columns:
        report["evaluation"] = evaluate_scores(scores, manifest.frame["noise"])
        auc = report["evaluation"].get("roc_auc", {})
        if auc:
            logger.info(
                "LNFS vs the noise column: ROC AUC final %.4f (kmeans %.4f, manifold %.4f, discriminator %.4f); "
                "%.2f%% of clean images removed, recall %.3f",
                auc["final"],
                auc["kmeans"],
                auc["manifold"],
                auc["discriminator"],
                100 * report["evaluation"]["clean_removed_share"],
                report["evaluation"]["recall"],
            )
    return report
