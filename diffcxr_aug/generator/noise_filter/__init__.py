"""Latent Noise Filtering (LNFS): find the noisy images of a training set in the VAE latent space.

Diff-CXR (Huang et al., arXiv 2410.20165) filters its training set coarse to fine before training the
latent diffusion model. The authors' released code reads pre-filtered lists, so this is an implementation
of the method as described:

1. **Coarse** (:class:`LatentNoiseFilter` stage ``kmeans``): K-means on pooled latents. Large clusters are
   typical; the images nearest their centres seed a set of confidently normal images.
2. **Manifold** (stage ``manifold``): a linear autoencoder (PCA of the flattened latents) fitted on that
   set models normal latents; its reconstruction error scores every image.
3. **Fine** (stage ``discriminator``): a classifier trained with explicit supervision from the confident
   ends of the manifold score (and from images the user marks as noisy) gives the final noise score. It
   reads where on the image the manifold fails, so it learns which failures mean noise. It is
   cross-fitted, so no image is scored by a model that was trained on its own pseudo-label.

The modules: ``estimator`` (:class:`LatentNoiseFilter`: latents in, scores
out, no files) and ``driver`` (:func:`run_filter`, the file-level entry point behind ``diffcxr-aug
filter``: manifest, the rows dropped by their view (``drop_views``, metadata before latents), VAE, encoding, and the
written scores, kept manifest, report and montages).

Example::

    from diffcxr_aug.generator.settings import FilterSettings
    from diffcxr_aug.generator.noise_filter import LatentNoiseFilter, run_filter

    flagged = LatentNoiseFilter().fit(latents).flagged_  # above the 99.5th percentile of the confident normals
    top_5pct = LatentNoiseFilter(threshold="contamination", contamination=0.05).fit(latents).flagged_
    kept_manifest = run_filter("data/phantom", "runs/filter", FilterSettings(drop_views=["LATERAL"]))
"""

from diffcxr_aug.generator.noise_filter.driver import (
    MONTAGE_BORDERLINE_NAME,
    MONTAGE_FLAGGED_NAME,
    REPORT_NAME,
    SCORES_NAME,
    run_filter,
)
from diffcxr_aug.generator.noise_filter.estimator import THRESHOLD_RULES, FilterScores, LatentNoiseFilter
from diffcxr_aug.generator.noise_filter.scoring import evaluate_scores
from diffcxr_aug.generator.noise_filter.stages import STAGES, latent_features

__all__ = [
    "MONTAGE_BORDERLINE_NAME",
    "MONTAGE_FLAGGED_NAME",
    "REPORT_NAME",
    "SCORES_NAME",
    "STAGES",
    "THRESHOLD_RULES",
    "FilterScores",
    "LatentNoiseFilter",
    "evaluate_scores",
    "latent_features",
    "run_filter",
]
