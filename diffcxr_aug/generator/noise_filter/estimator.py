"""The LNFS estimator: :class:`LatentNoiseFilter` scores images for noise from their VAE latents.

It works on latents only (no files): ``fit(latents)`` runs the three stages described in
:mod:`diffcxr_aug.generator.noise_filter`, ``score`` / ``predict`` apply them to new latents, and
:func:`evaluate_scores` compares scores with a known noise truth. What the pooled latent features see:
noise in real collections is mostly about layout (laterals, rotated films, crops, scanned-film borders),
grey levels (inverted films, exposure) or local structure (burnt-in text, arrows, screenshots). The
features therefore keep a coarse spatial grid of each latent channel's mean *and* local standard
deviation, plus each channel's grey-level quantiles over the image; K-means works on those. The manifold
works on the full latent, where small burnt-in text still shows.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.special import expit
from sklearn.cluster import MiniBatchKMeans
from sklearn.model_selection import StratifiedKFold
from tqdm.auto import tqdm

from diffcxr_aug.errors import InputError
from diffcxr_aug.generator.noise_filter.scoring import estimate_contamination
from diffcxr_aug.generator.noise_filter.stages import (
    Discriminator,
    LatentManifold,
    Standardizer,
    latent_features,
    latent_rows,
    predict_logits,
    shuffled_batches,
)
from diffcxr_aug.generator.settings import FilterSettings
from diffcxr_aug.types import ThresholdRule

logger = logging.getLogger(__name__)

THRESHOLD_RULES: tuple[str, ...] = get_args(ThresholdRule)
_DEFAULTS = FilterSettings()
# The normal set is split in two; each half fits one manifold, which scores the other half.
_MANIFOLD_FOLDS = 2
# Latent rows a pass over the collection holds at a time (at 4 x 32 x 32: 32 MiB).
_CHUNK_ROWS = 2048


@dataclass
class FilterScores:
    """Per-image scores of one :meth:`LatentNoiseFilter.score` call (arrays of length N; higher = noisier).

    Attributes:
        kmeans: distance to the nearest typical cluster centre, in units of that cluster's median radius.
        manifold: reconstruction error of the normal-latent manifold, in units of its median on the normal set.
        discriminator_logit: the discriminator's log-odds that the image is noisy (``discriminator`` is its
            probability). Thresholds and rankings use the log-odds: in float64 every probability above
            1 - 1e-16 is exactly 1.0, and a quantile threshold among such ties would flag none of them.
        cluster: the K-means cluster of each image.
    """

    kmeans: np.ndarray
    manifold: np.ndarray
    discriminator_logit: np.ndarray
    cluster: np.ndarray

    @property
    def discriminator(self) -> np.ndarray:
        """The discriminator's probability that the image is noisy."""
        return expit(self.discriminator_logit)

    @property
    def final(self) -> np.ndarray:
        """The final noise score, a probability: the discriminator's (the fine stage decides)."""
        return self.discriminator

    @property
    def final_logit(self) -> np.ndarray:
        """The final score as log-odds: same order as :attr:`final`, without its ties at 1.0."""
        return self.discriminator_logit

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "score": self.final,
                "kmeans_score": self.kmeans,
                "manifold_score": self.manifold,
                "discriminator_score": self.discriminator,
                "score_logit": self.final_logit,
                "cluster": self.cluster,
            }
        )


class LatentNoiseFilter:
    """Coarse-to-fine noise filter on VAE latents: K-means, then a manifold of normal latents, then a discriminator.

    Used like a scikit-learn outlier detector: ``fit(latents)`` learns what normal images look like from
    the collection itself (no labels needed), ``score(latents)`` gives per-stage and final scores (higher =
    more likely noisy) of new latents, ``predict(latents)`` flags those above the fitted threshold. After
    ``fit``, ``train_scores_`` holds the scores of the fitted images and ``flagged_`` their flags. Both
    learned stages are cross-fitted: an image the manifold or a discriminator was fitted on is scored by
    the fold models that did not see it, so no image is judged by a model that memorised it.

    The latents may be a tensor, an array or the memory map of a latent store
    (:class:`~diffcxr_aug.generator.latent_store.LatentStore` ``.array``): they are read in chunks, and what is held
    whole is per image and small (the pooled features, the scores); only the manifold's fit rows (at most
    ``max_fit``) are held as full latents.

    Args:
        n_clusters: K-means clusters on the pooled latents.
        grid: side of the spatial grid the latents are pooled to (see :func:`latent_features`).
        min_cluster_share: a cluster holding at least this share of the images is typical; the confident
            normals are drawn only from typical clusters. Must be at most ``1 / n_clusters`` (so that the
            largest cluster always qualifies).
        normal_share: share of all images taken as confidently normal (those nearest a typical centre).
        manifold_components: principal components of the normal-latent manifold (capped at half the images
            each fold fits on).
        positive_share: share of all images, those with the highest manifold score, that the discriminator
            is told are noisy (images the user marks noisy are added to them).
        negative_share: share of all images, those with the lowest manifold score, that the discriminator is
            told are normal.
        discriminator_steps: optimisation steps of each cross-fitted discriminator.
        folds: cross-fitting folds of the discriminator.
        threshold: ``"contamination"`` flags the top ``contamination`` share of the final score;
            ``"quantile"`` flags images scoring above the ``quantile`` of the final score over the confident
            normal set, so the number flagged follows the data.
        contamination: expected share of noisy images (``threshold="contamination"``).
        quantile: quantile of the normal set's scores used as the threshold (``threshold="quantile"``).
        max_fit: at most this many images fit the manifold and the discriminators (a random subset); all
            images are scored. Keeps the fit in minutes on 100,000 images.
        seed: seed of every random choice (K-means, subsets, initialisation, batches).
        device: torch device of the discriminators.
        progress: show progress bars.
    """

    # The defaults are the recipe's (FilterSettings): one home for each setting.
    def __init__(
        self,
        n_clusters: int = _DEFAULTS.n_clusters,
        grid: int = _DEFAULTS.grid,
        min_cluster_share: float = _DEFAULTS.min_cluster_share,
        normal_share: float = _DEFAULTS.normal_share,
        manifold_components: int = _DEFAULTS.manifold_components,
        positive_share: float = _DEFAULTS.positive_share,
        negative_share: float = _DEFAULTS.negative_share,
        discriminator_steps: int = _DEFAULTS.discriminator_steps,
        folds: int = 5,
        threshold: ThresholdRule = _DEFAULTS.threshold,
        contamination: float = _DEFAULTS.contamination,
        quantile: float = _DEFAULTS.quantile,
        max_fit: int = _DEFAULTS.max_fit,
        seed: int = 0,
        device: str | torch.device = "cpu",
        progress: bool = True,
    ) -> None:
        if threshold not in THRESHOLD_RULES:
            raise InputError(f"Unknown threshold rule {threshold!r}; choose one of: {', '.join(THRESHOLD_RULES)}")
        if n_clusters < 2:
            raise InputError(f"n_clusters must be at least 2, got {n_clusters}")
        if not 0.0 < min_cluster_share <= 1.0 / n_clusters:
            raise InputError(
                f"min_cluster_share {min_cluster_share} must lie in (0, 1 / n_clusters = {1.0 / n_clusters:.4g}]: "
                "otherwise no cluster may qualify as typical; lower min_cluster_share or n_clusters"
            )
        for name, value in (("normal_share", normal_share), ("negative_share", negative_share)):
            if not 0.0 < value < 1.0:
                raise InputError(f"{name} must lie in (0, 1), got {value}")
        if not 0.0 < positive_share < 0.5:
            raise InputError(f"positive_share must lie in (0, 0.5), got {positive_share}")
        if positive_share + negative_share >= 1.0:
            raise InputError(
                f"positive_share ({positive_share}) + negative_share ({negative_share}) must stay below 1, so that "
                "no image is told to be both noisy and normal"
            )
        if not 0.0 < contamination < 0.5:
            raise InputError(f"contamination must lie in (0, 0.5), got {contamination}")
        if not 0.0 < quantile < 1.0:
            raise InputError(f"quantile must lie in (0, 1), got {quantile}")
        if folds < 2:
            raise InputError(f"folds must be at least 2, got {folds}")
        if manifold_components < 1:
            raise InputError(f"manifold_components must be at least 1, got {manifold_components}")
        self.n_clusters = n_clusters
        self.grid = grid
        self.min_cluster_share = min_cluster_share
        self.normal_share = normal_share
        self.manifold_components = manifold_components
        self.positive_share = positive_share
        self.negative_share = negative_share
        self.discriminator_steps = discriminator_steps
        self.folds = folds
        self.threshold = threshold
        self.contamination = contamination
        self.quantile = quantile
        self.max_fit = max_fit
        self.seed = seed
        self.device = torch.device(device)
        self.progress = progress

    @classmethod
    def from_section(cls, section: FilterSettings, **kwargs) -> LatentNoiseFilter:
        """The filter with a recipe's ``filter`` settings (those that are arguments here); ``kwargs`` add the rest
        (``seed``, ``device``, ``progress``, ``folds``)."""
        names = inspect.signature(cls.__init__).parameters.keys() & type(section).model_fields.keys()
        return cls(**{name: getattr(section, name) for name in names}, **kwargs)

    # ----------------------------------------------------------------------------------------------- fit
    def fit(
        self,
        latents: torch.Tensor | np.ndarray | Any,
        known_noisy: np.ndarray | None = None,
        extra_noisy: torch.Tensor | np.ndarray | None = None,
    ) -> LatentNoiseFilter:
        """Learn the filter from a collection's latents.

        Args:
            latents: ``(N, C, h, w)`` VAE latents of the collection: a tensor, an array, a memory map or a
                :class:`~diffcxr_aug.generator.latent_store.LatentRows` (read a chunk at a time).
            known_noisy: optional boolean mask (length N) of images the user knows are noisy. They are kept
                out of the normal set, join the discriminator's positives and are always flagged.
            extra_noisy: optional ``(M, C, h, w)`` latents of known noisy images outside the collection;
                they join the discriminator's positives.
        """
        latents, known, extra_noisy = self._check_fit_inputs(latents, known_noisy, extra_noisy)
        rng = np.random.default_rng(self.seed)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.latent_shape_ = tuple(latents.shape[1:])
        pooled = latent_features(latents, self.grid)
        self.standardizer_ = Standardizer().fit(pooled)
        x = self.standardizer_.transform(pooled)
        timings["features"] = time.perf_counter() - t0

        # 1. Coarse: K-means; the dense, typical clusters seed the confident normal set.
        t0 = time.perf_counter()
        kmeans_score, cluster = self._fit_kmeans(x)
        cut = np.quantile(kmeans_score[~known], self.normal_share)
        normal = ~known & (kmeans_score <= cut)
        self.normal_mask_ = normal
        timings["kmeans"] = time.perf_counter() - t0
        logger.info(
            "LNFS coarse: %d clusters (%d typical; shares %s); %d confident normals",
            self.n_clusters,
            len(self.typical_clusters_),
            np.round(np.sort(self.cluster_shares_)[::-1], 3).tolist(),
            int(normal.sum()),
        )

        # 2. Manifold of the normal latents, cross-fitted on two halves of the normal set.
        t0 = time.perf_counter()
        manifold_score, residual_grid = self._fit_manifolds(latents, normal, rng)
        timings["manifold"] = time.perf_counter() - t0

        # 3. Fine: a discriminator supervised by the confident ends of the manifold score, cross-fitted.
        t0 = time.perf_counter()
        positive, negative = self._pseudo_labels(manifold_score, known)
        disc_x = self._disc_input(residual_grid)
        extra_x = disc_x[:0]
        if extra_noisy is not None and len(extra_noisy):
            _, extra_grid = self._manifold_evidence(extra_noisy, np.full(len(extra_noisy), -1))
            extra_x = self._disc_input(extra_grid)
        discriminator_score = self._fit_discriminators(disc_x, positive, negative, extra_x, rng)
        timings["discriminator"] = time.perf_counter() - t0

        self.train_scores_ = FilterScores(kmeans_score, manifold_score, discriminator_score, cluster)
        self.flagged_ = self._fit_threshold(self.train_scores_.final_logit, normal) | known
        self.known_noisy_ = known
        self.timings_ = timings
        logger.info(
            "LNFS: threshold %.4g (%s) flags %d of %d images (%.1f%%)",
            self.threshold_,
            self.threshold,
            int(self.flagged_.sum()),
            len(latents),
            100.0 * self.flagged_.mean(),
        )
        return self

    def _check_fit_inputs(
        self,
        latents: torch.Tensor | np.ndarray | Any,
        known_noisy: np.ndarray | None,
        extra_noisy: torch.Tensor | np.ndarray | None,
    ) -> tuple[torch.Tensor | np.ndarray | Any, np.ndarray, torch.Tensor | None]:
        """The arguments of :meth:`fit` (the latents as they are, checked a chunk at a time) and a boolean mask,
        or an error naming what is wrong."""
        n = len(latents)
        min_images = max(20, 4 * self.folds)
        if len(latents.shape) != 4 or n < min_images:
            raise InputError(
                f"the filter needs (N, C, h, w) latents of at least {min_images} images, got {tuple(latents.shape)}"
            )
        for start in range(0, n, _CHUNK_ROWS):
            if not torch.isfinite(latent_rows(latents, slice(start, start + _CHUNK_ROWS))).all():
                raise InputError("latents hold NaN or infinite values; check the VAE and the images")
        known = np.zeros(n, dtype=bool) if known_noisy is None else np.asarray(known_noisy, dtype=bool)
        if known.shape != (n,):
            raise ValueError(f"known_noisy must be a boolean mask of length {n}, got shape {known.shape}")
        if extra_noisy is not None:
            extra_noisy = torch.as_tensor(extra_noisy).float()
            if tuple(extra_noisy.shape[1:]) != tuple(latents.shape[1:]):
                raise ValueError(
                    f"extra_noisy latents of shape {tuple(extra_noisy.shape[1:])} do not match the collection's "
                    f"{tuple(latents.shape[1:])}"
                )
        return latents, known, extra_noisy

    def _fit_kmeans(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stage 1 on the standardized pooled features: the K-means score and cluster of every image.

        Sets ``kmeans_``, ``cluster_shares_``, ``typical_clusters_`` and ``cluster_radius_``.
        """
        n = len(x)
        self.kmeans_ = MiniBatchKMeans(
            n_clusters=self.n_clusters, random_state=self.seed, batch_size=2048, n_init=3, max_iter=200
        ).fit(x)
        distances = self.kmeans_.transform(x)
        cluster = distances.argmin(axis=1)
        self.cluster_shares_ = np.bincount(cluster, minlength=self.n_clusters) / n
        self.typical_clusters_ = np.flatnonzero(self.cluster_shares_ >= self.min_cluster_share)
        own = distances[np.arange(n), cluster]
        self.cluster_radius_ = np.array(
            [
                max(float(np.median(own[cluster == k])), 1e-6) if (cluster == k).any() else 1.0
                for k in range(self.n_clusters)
            ]
        )
        return self._kmeans_score(distances), cluster

    def _fit_manifolds(
        self, latents: torch.Tensor | np.ndarray | Any, normal: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Stage 2: fit one manifold per half of (at most ``max_fit`` of) the normal set.

        Returns every image's manifold score and its residual energy grid, each image scored by the
        manifolds it was not fitted on. Sets ``manifolds_``, ``manifold_scale_`` and ``residual_scale_``.
        """
        fit_rows = rng.permutation(np.flatnonzero(normal))[: self.max_fit]
        halves = np.array_split(fit_rows, _MANIFOLD_FOLDS)
        self.manifolds_ = [
            LatentManifold(self.manifold_components, self.seed).fit(
                latent_rows(latents, np.sort(rows)).flatten(1).numpy()
            )
            for rows in tqdm(halves, desc="LNFS manifold", disable=not self.progress)
        ]
        member = np.full(len(latents), -1)
        for k, rows in enumerate(halves):
            member[rows] = k
        raw_error, residual_grid = self._manifold_evidence(latents, member)
        self.manifold_scale_ = float(np.median(raw_error[fit_rows]))
        self.residual_scale_ = np.median(residual_grid[fit_rows], axis=0)
        return raw_error / self.manifold_scale_, residual_grid

    def _pseudo_labels(self, manifold_score: np.ndarray, known: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The discriminator's supervision: the top ``positive_share`` of the manifold score plus the known noisy
        images are positives, the bottom ``negative_share`` (less any positive) negatives. Sets ``pseudo_label_``
        (1, 0, or -1 for unlabelled)."""
        n = len(manifold_score)
        order = np.argsort(manifold_score, kind="stable")
        n_pos = max(self.folds, int(round(self.positive_share * n)))
        n_neg = max(self.folds, int(round(self.negative_share * n)))
        positive = np.zeros(n, dtype=bool)
        positive[order[n - n_pos :]] = True
        positive |= known
        negative = np.zeros(n, dtype=bool)
        negative[order[:n_neg]] = True
        negative &= ~positive
        self.pseudo_label_ = np.where(positive, 1, np.where(negative, 0, -1)).astype(np.int8)
        return positive, negative

    def _kmeans_score(self, distances: np.ndarray) -> np.ndarray:
        typical = self.typical_clusters_
        return (distances[:, typical] / self.cluster_radius_[typical]).min(axis=1)

    def _manifold_evidence(
        self, latents: torch.Tensor | np.ndarray | Any, member: np.ndarray, batch_size: int = _CHUNK_ROWS
    ) -> tuple[np.ndarray, np.ndarray]:
        """Reconstruction error of every image, and its residual energy on the ``grid x grid`` layout.

        ``member[i]`` is the manifold fold image ``i`` was fitted on (-1: none); it is scored by the others.
        """
        n = len(latents)
        error = np.zeros(n)
        grid = np.zeros((n, self.grid * self.grid))
        count = np.zeros(n)
        for start in range(0, n, batch_size):
            chunk = latent_rows(latents, slice(start, start + batch_size))
            rows = slice(start, start + len(chunk))
            flat = chunk.flatten(1).numpy()
            for k, manifold in enumerate(self.manifolds_):
                use = member[rows] != k
                if not use.any():
                    continue
                residual = torch.from_numpy(manifold.residuals(flat[use])).view(-1, *chunk.shape[1:])
                energy = residual.pow(2).mean(dim=1, keepdim=True)
                error[rows][use] += energy.flatten(1).mean(dim=1).numpy()
                grid[rows][use] += F.adaptive_avg_pool2d(energy, self.grid).flatten(1).numpy()
                count[rows][use] += 1
        return error / count, grid / count[:, None]

    def _disc_input(self, residual_grid: np.ndarray) -> np.ndarray:
        """The discriminator sees where, and how much, the normal manifold fails to explain an image.

        It is not shown the pooled latents themselves: trained on the few kinds of noise that top the
        manifold score, a classifier on appearance learns those kinds and then scores other kinds (dark
        over-exposed films when the positives were bright inverted ones) as *more* normal than clean
        images. Residual energies grow for any departure from normal, so what it learns carries over.
        """
        cells = np.log((residual_grid + 1e-8) / (self.residual_scale_ + 1e-8))
        total = np.log(residual_grid.mean(axis=1, keepdims=True) / self.manifold_scale_ + 1e-8)
        return np.concatenate([cells, total], axis=1).astype(np.float32)

    def _fit_one_discriminator(self, x: np.ndarray, y: np.ndarray, seed: int) -> Discriminator:
        torch.manual_seed(seed)  # initialisation and dropout; batches come from the generator below
        model = Discriminator(x.shape[1], hidden=64).to(self.device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
        data = torch.from_numpy(x).to(self.device)
        target = torch.from_numpy(y.astype(np.float32)).to(self.device)
        # Balance the classes: the positives are a few percent of the images.
        pos_weight = torch.tensor(max(1.0, float((y == 0).sum()) / max(1, int((y == 1).sum())))).to(self.device)
        generator = torch.Generator().manual_seed(seed)
        batch_size = min(256, len(x))
        batches: list[torch.Tensor] = []
        for _ in range(self.discriminator_steps):
            if not batches:
                batches = shuffled_batches(len(x), batch_size, generator)
            idx = batches.pop().to(self.device)
            loss = F.binary_cross_entropy_with_logits(model(data[idx]), target[idx], pos_weight=pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return model.cpu().eval()

    def _fit_threshold(self, final_logit: np.ndarray, normal: np.ndarray) -> np.ndarray:
        """Set ``threshold_logit_`` (and ``threshold_``, its probability) by the rule; return the flags.

        On the log-odds, not the probabilities: far-off images saturate the probability at exactly 1.0, and a
        quantile falling among those ties would flag none of them.
        """
        if self.threshold == "contamination":
            self.threshold_logit_ = float(np.quantile(final_logit, 1.0 - self.contamination))
        elif self.threshold == "quantile":
            self.threshold_logit_ = float(np.quantile(final_logit[normal], self.quantile))
        else:  # guarded in __init__; kept so that a new rule cannot fall through silently
            raise ValueError(f"Unknown threshold rule {self.threshold!r}; choose one of: {', '.join(THRESHOLD_RULES)}")
        self.threshold_ = float(expit(self.threshold_logit_))  # on the scale of the `score` column
        self.estimated_contamination_ = estimate_contamination(final_logit, seed=self.seed)
        return final_logit > self.threshold_logit_

    def _fit_discriminators(
        self,
        x: np.ndarray,
        positive: np.ndarray,
        negative: np.ndarray,
        extra_x: np.ndarray,
        rng: np.random.Generator,
    ) -> np.ndarray:
        labelled = np.flatnonzero(positive | negative)
        if len(labelled) > self.max_fit:
            # Keep every positive; subsample the plentiful negatives.
            pos_rows = np.flatnonzero(positive)
            neg_rows = rng.choice(
                np.flatnonzero(negative), max(self.folds, self.max_fit - len(pos_rows)), replace=False
            )
            labelled = np.sort(np.concatenate([pos_rows, neg_rows]))
        y = positive[labelled].astype(np.int64)
        splitter = StratifiedKFold(n_splits=self.folds, shuffle=True, random_state=self.seed)
        logits = np.zeros(len(x), dtype=np.float64)
        counts = np.zeros(len(x), dtype=np.int64)
        self.discriminators_: list[Discriminator] = []
        folds = list(splitter.split(labelled, y))
        for k, (train_idx, _) in enumerate(tqdm(folds, desc="LNFS discriminator", disable=not self.progress)):
            rows = labelled[train_idx]
            xs = np.concatenate([x[rows], extra_x])
            ys = np.concatenate([y[train_idx], np.ones(len(extra_x), dtype=np.int64)])
            model = self._fit_one_discriminator(xs, ys, seed=self.seed + 1 + k)
            self.discriminators_.append(model)
            # Out of fold: an image is scored only by the models that did not train on it.
            unseen = np.ones(len(x), dtype=bool)
            unseen[rows] = False
            logits[unseen] += predict_logits(model, x[unseen])
            counts[unseen] += 1
        return logits / np.maximum(counts, 1)

    # --------------------------------------------------------------------------------------------- score
    def score(self, latents: torch.Tensor | np.ndarray | Any) -> FilterScores:
        """Per-stage and final scores of new latents (every fold model votes: none of them saw these images); a
        memory map is read a chunk at a time, as in :meth:`fit`."""
        if not hasattr(self, "threshold_"):
            raise RuntimeError("this LatentNoiseFilter is not fitted yet; call fit(latents) first")
        if len(latents.shape) != 4 or tuple(latents.shape[1:]) != self.latent_shape_:
            raise ValueError(
                f"latents of shape {tuple(latents.shape)} do not match the fitted (N, *{self.latent_shape_})"
            )
        x = self.standardizer_.transform(latent_features(latents, self.grid))
        distances = self.kmeans_.transform(x)
        raw_error, residual_grid = self._manifold_evidence(latents, np.full(len(latents), -1))
        disc_x = self._disc_input(residual_grid)
        logits = np.mean([predict_logits(model, disc_x) for model in self.discriminators_], axis=0)
        return FilterScores(
            self._kmeans_score(distances),
            raw_error / self.manifold_scale_,
            logits,
            distances.argmin(axis=1),
        )

    def predict(self, latents: torch.Tensor | np.ndarray | Any) -> np.ndarray:
        """Boolean flags (True = noisy) of new latents at the fitted threshold."""
        return self.score(latents).final_logit > self.threshold_logit_
