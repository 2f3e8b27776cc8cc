"""How long each step of a recipe should take on a CPU, for the progress line ``[3/6] train-generator ...``.

Costs per unit of work (an image, a training step, a sampler pass), measured on the 2-core AMD EPYC machine this
project is developed and tested on (AVX512-BF16), at the precision each step picks there, calibrated on the
quickstart's timed run of 2026-12-02 (README). They give the order of
magnitude a person plans by, not a promise: another CPU, or a busy one, differs. On a GPU no estimate is printed.
"""

from __future__ import annotations

from diffcxr_aug.augment.layout import recipe_vae_plan, sampled_sets
from diffcxr_aug.config import Recipe

# Seconds per pixel of a prepared phantom image (drawing, caching, two worker processes).
PREPARE_PHANTOM_S_PER_PIXEL = 4.0e-6
# Seconds per pixel of a KL-VAE training step (batch x crop^2), kl-f4 on 32 px crops under bf16 autocast.
VAE_STEP_S_PER_PIXEL = {"kl-f4": 4.5e-6, "tiny": 2.0e-7}
# LNFS after the VAE: encoding, K-means, manifold, discriminator (seconds per image, plus fixed).
FILTER_S_PER_IMAGE, FILTER_FIXED_S = 0.002, 10.0
# Seconds per training image of the generator's step (UNet forward + backward + AVA-TLS) under bf16 autocast with
# the math attention backend (auto on this CPU): phantom-128 from the recipe's hour of 2026-12-03 (5,834 steps of 32
# in 47.06 min), phantom-64 from the quickstart's fp32 figure (0.021) times bench/perf.py's bf16 / fp32 step ratio.
GENERATOR_S_PER_IMAGE = {"tiny": 0.002, "phantom-64": 0.014, "phantom-128": 0.015}
GENERATOR_FIXED_S = 40.0  # text encoder load, latent and text caches, grids, saving
# Seconds per image per sampler step (both halves of classifier-free guidance).
SAMPLE_S_PER_IMAGE_STEP = {"tiny": 0.0005, "phantom-64": 0.014, "phantom-128": 0.05}
# Seconds per training image of a timm classifier epoch at 64 px (scaled by the pixel count).
CLASSIFIER_S_PER_IMAGE_64 = {"test_resnet": 0.0033, "resnet10t": 0.006, "resnet18": 0.02}


def _generator_images(recipe: Recipe) -> float:
    g = recipe.generator
    return g.max_steps * g.batch_size * g.gradient_accumulation_steps


def _classifier_seconds(recipe: Recipe) -> float | None:
    c = recipe.classifier
    models = c.model if isinstance(c.model, list) else [c.model]
    known = [CLASSIFIER_S_PER_IMAGE_64.get(model) for model in models]
    if None in known:
        return None
    per_image = sum(known)  # every cell runs once per model
    size = c.image_size or recipe.data.size
    per_image *= (size / 64) ** 2
    train = recipe.data.n * recipe.data.split_fractions[0]
    choices = c.synthetic if isinstance(c.synthetic, list) else [c.synthetic]
    sources = sum(1 for s in choices if s != "none")
    n_synthetic = c.n_synthetic or (recipe.synthesize.n if "generated" in choices else train)
    total = 0.0
    generators = len(recipe.generator.seeds or [None])
    for frac in c.real_fracs:
        real = max(1.0, frac * train)
        for mode in c.modes:
            runs = 1 if mode == "real" else sources + (generators - 1) * ("generated" in choices)
            if c.samples_per_epoch == "matched":
                images = train
            elif c.samples_per_epoch == "one-pass":
                images = real if mode == "real" else real + n_synthetic
            else:
                images = c.samples_per_epoch
            total += runs * c.epochs * images
    # Validation and test passes each epoch, about a third of the training images' cost.
    evaluation = len(c.seeds) * len(c.real_fracs) * len(c.modes) * c.epochs * recipe.data.n * 0.3 / 3
    return len(c.seeds) * total * per_image + evaluation * per_image


def estimate_seconds(step: str, recipe: Recipe) -> float | None:
    """The expected wall time of ``step`` on a 2-core CPU, or ``None`` when there is no basis for one."""
    import torch

    if recipe.device == "cuda" or (recipe.device == "auto" and torch.cuda.is_available()):
        return None
    d = recipe.data
    pixels = d.size * d.size
    if step == "prepare":
        return d.n * pixels * PREPARE_PHANTOM_S_PER_PIXEL if d.dataset == "phantom" else None
    if step == "train-vae":
        plan = recipe_vae_plan(recipe)
        per_pixel = VAE_STEP_S_PER_PIXEL.get(plan.config)
        if per_pixel is None:
            return None
        crop = plan.crop_size or plan.size
        return plan.steps * plan.batch_size * crop * crop * per_pixel
    if step == "filter":
        return d.n * FILTER_S_PER_IMAGE + FILTER_FIXED_S
    if step == "train-generator":
        per_image = GENERATOR_S_PER_IMAGE.get(recipe.generator.config)
        if per_image is None:
            return None
        return len(recipe.generator.seeds or [None]) * (_generator_images(recipe) * per_image + GENERATOR_FIXED_S)
    if step == "synthesize":
        per = SAMPLE_S_PER_IMAGE_STEP.get(recipe.generator.config)
        sets = len(sampled_sets(recipe))
        return None if per is None else sets * recipe.synthesize.n * recipe.synthesize.steps * per
    if step == "train-classifier":
        return _classifier_seconds(recipe)
    if step == "evaluate":
        per_image = CLASSIFIER_S_PER_IMAGE_64.get(recipe.evaluate.model)
        if per_image is None:
            return None
        size = recipe.evaluate.image_size or d.size
        return recipe.evaluate.epochs * d.n * 0.7 * per_image * (size / 64) ** 2 + 0.01 * d.n
    return None
