"""Drawing one study: the normal chest, its findings and devices, then exposure, blur, noise and resampling."""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from diffcxr_aug.data.phantom import pathology
from diffcxr_aug.data.phantom.anatomy import Chest, sample_pose, smoothstep, texture
from diffcxr_aug.data.phantom.findings import HEALING_BELOW, StudyTruth


def render_density(
    truth: StudyTruth, res: int, rng: np.random.Generator, finding_rng: np.random.Generator | None = None
) -> tuple[np.ndarray, Chest]:
    """The study's density map (bright = dense) at ``res`` px, before exposure.

    Args:
        rng: draws the normal anatomy (pose, ribs, vessels, textures), always in the same order.
        finding_rng: draws the findings' details; separate so that adding or removing a finding leaves
            the rest of the chest exactly as it was (defaults to ``rng``).
    """
    finding_rng = rng if finding_rng is None else finding_rng
    pose = sample_pose(rng, truth.body, truth.view)
    pose = pathology.shape_changes(pose, truth)
    chest = Chest(truth.body, pose, res)
    lungs = chest.lungs
    air = chest.air()
    fx = pathology.Effects.empty(res)
    pathology.draw_findings(chest, truth, finding_rng, fx)
    post, ant = chest.ribs(rng, fractures=fx.rib_fractures)
    fracture = truth.findings.get("fracture")
    if fracture is not None and fracture.kind == "rib" and fracture.severity < HEALING_BELOW:
        # Healing rib fractures: a fusiform callus bridges the break.
        for x, y in chest.fracture_sites:
            r = np.hypot((chest.xb - x) / 0.045, (chest.yb - y) / 0.032)
            post += 1.2 * smoothstep(1.0 - r, 0.6)
    clav = chest.clavicles(*fx.clavicle_fracture)
    bone = truth.body.bone
    opaque = np.clip(fx.fill, 0.0, 1.0)
    clear = 1.0 - opaque

    dens = chest.soft_tissue()
    # Lung parenchyma: air, darker where a pneumothorax adds air, with fine texture.
    tex = 0.015 * texture(rng, res, 1.5 * res / 256) + 0.03 * texture(rng, res, 8.0 * res / 256)
    dens -= (0.47 + tex) * air * clear + fx.extra_air
    dens -= 0.13 * chest.trachea() * (1.0 - 0.6 * lungs)
    vessels = chest.vessels(rng)
    if fx.vessel_blur > 0:
        vessels = ndimage.gaussian_filter(vessels, fx.vessel_blur * res / 256.0)
    dens += 0.26 * vessels * lungs * clear * fx.vessel_mask
    over_lung = (0.3 + 0.7 * lungs) * (1.0 - 0.75 * chest.below_diaphragm())
    dens += bone * (0.15 * post + 0.1 * ant) * over_lung
    dens += bone * 0.17 * clav
    dens += bone * 0.04 * chest.spine() * (1.0 - lungs) * (1.0 - 0.5 * chest.below_diaphragm())
    dens += bone * 0.1 * chest.shoulders()
    dens -= 0.22 * chest.stomach_bubble(rng) * chest.below_diaphragm()
    dens -= 0.12 * chest.bowel_gas(rng) * chest.below_diaphragm()
    dens += fx.density
    # Uneven soft tissue and the anode heel effect: broad, gentle variations over the whole film.
    dens *= 1.0 + 0.03 * texture(rng, res, res / 6) + rng.normal(0, 0.03) * chest.Y
    return dens, chest


def expose(dens: np.ndarray, rng: np.random.Generator, ap: bool) -> np.ndarray:
    """Map density to grey levels with this study's exposure (window, gamma) and detector blur and noise."""
    lo = rng.normal(0.02, 0.02)
    hi = rng.normal(0.9 if not ap else 0.86, 0.04)
    gamma = float(np.exp(rng.normal(0.0, 0.12)))
    img = np.clip((dens - lo) / (hi - lo), 0.0, 1.0) ** gamma
    img = ndimage.gaussian_filter(img, rng.uniform(0.5, 0.9))
    img += rng.normal(0.0, rng.uniform(0.008, 0.02), img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def resample(img: np.ndarray, size: int) -> np.ndarray:
    """Float image in [0, 1] to ``size`` x ``size`` uint8, antialiased."""
    u8 = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if u8.shape[0] != size:
        u8 = np.asarray(Image.fromarray(u8).resize((size, size), Image.Resampling.LANCZOS))
    return u8


def render_frontal(truth: StudyTruth, res: int, rng: np.random.Generator) -> np.ndarray:
    """A frontal (PA or AP) radiograph of the study as a float image at ``res`` px.

    Anatomy, findings and film get independent random streams, so the same study drawn with and without
    a finding differs only where the finding is (a counterfactual pair).
    """
    anatomy_rng, finding_rng, film_rng = rng.spawn(3)
    dens, chest = render_density(truth, res, anatomy_rng, finding_rng)
    pathology.draw_devices(chest, truth, finding_rng, dens)
    return expose(dens, film_rng, chest.pose.ap)
