"""The normal chest of a phantom patient: body shape, geometry on the pixel grid, and its density layers.

Coordinates: the image spans ``[-1, 1]`` in both directions (x to the image right, y down). The body
has its own frame (``xb, yb``), shifted, scaled and slightly tilted against the image to mimic
positioning. Radiographs are displayed as usual: the patient's right is on the image left, dense
structures (bone, heart, fluid) are bright and air is dark. ``side = -1`` is the patient's right lung
(image left), ``side = +1`` the left.

Everything is drawn as a *density* map (bright = dense), at twice the output size, then mapped to grey
levels by the exposure model in :mod:`render`. Lines and filled shapes (ribs, vessels, devices) are
drawn with PIL on float canvases; smooth regions (lungs, heart, soft tissue) are closed-form functions
of the coordinates, evaluated vectorised with numpy.

This module runs past 500 lines because :class:`Chest` draws one normal chest layer by layer (soft tissue, lungs,
vessels, ribs, heart, mediastinum, diaphragm), each layer a method on the same body grid; split across files, a
reader would chase one radiograph through several of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SIDES = (-1, 1)
SIDE_NAME = {-1: "right", 1: "left"}


@dataclass(frozen=True)
class Body:
    """A patient's build, kept across all their studies (lengths in image half-widths)."""

    half_width: float  # lung half-width at the costophrenic angles
    apex_y: float  # top of the lung apices
    dome_y: float  # top of the right hemidiaphragm dome
    dome_left_drop: float  # the left dome sits this much lower
    cp_depth: float  # costophrenic angle below the dome
    ctr: float  # cardiothoracic ratio when healthy
    heart_left_share: float  # share of the heart's width left of the midline
    mediastinum: float  # upper mediastinal half-width
    knob: float  # aortic knob radius
    wall: float  # chest wall soft tissue outside the ribs
    shoulder_y: float
    breast: float  # 0 (none) to 1 (large breast shadows)
    rib_spacing: float
    bone: float  # bone density factor (lower in the elderly)
    sex: str = "M"


def sample_body(rng: np.random.Generator, sex: str, age: int) -> Body:
    female = sex == "F"
    return Body(
        half_width=float(rng.normal(0.71 if not female else 0.67, 0.035)),
        apex_y=float(rng.normal(-0.74, 0.035)),
        dome_y=float(rng.normal(0.36, 0.05)),
        dome_left_drop=float(rng.normal(0.04, 0.015)),
        cp_depth=float(rng.normal(0.13, 0.02)),
        # Normal hearts reach a cardiothoracic ratio of 0.49 and mild cardiomegaly starts there, so the
        # boundary is a continuum, as in real films, not a gap a classifier could read off for free.
        ctr=float(np.clip(rng.normal(0.44, 0.03), 0.36, 0.49)),
        heart_left_share=float(rng.uniform(0.6, 0.7)),
        mediastinum=float(rng.uniform(0.07, 0.105)),
        knob=float(rng.uniform(0.035, 0.05) + 0.0004 * max(age - 50, 0)),
        wall=float(rng.uniform(0.05, 0.13)),
        shoulder_y=float(rng.normal(-0.7, 0.04)),
        breast=float(rng.uniform(0.3, 1.0)) if female else 0.0,
        rib_spacing=float(rng.normal(0.1, 0.006)),
        bone=float(np.clip(1.15 - 0.006 * max(age - 40, 0) + rng.normal(0, 0.06), 0.6, 1.25)),
        sex=sex,
    )


@dataclass
class Pose:
    """How the body sits in this study's image, and what the view and the findings do to its shape."""

    cx: float = 0.0
    cy: float = 0.0
    scale: float = 1.0
    tilt: float = 0.0  # radians
    ap: bool = False
    ctr: float = 0.43
    mediastinum: float = 0.085
    knob: float = 0.045
    widening: float = 0.0  # convex widening of the upper mediastinum (mass, aneurysm, haemorrhage)
    dome_shift: tuple[float, float] = (0.0, 0.0)  # (right, left) upward shift of the domes (volume loss)
    shift: float = 0.0  # mediastinal shift towards the image right (+) or left (-)


def sample_pose(rng: np.random.Generator, body: Body, view: str) -> Pose:
    ap = view == "AP"
    # AP films are portable, often supine and at lower inspiration; the heart is magnified.
    return Pose(
        cx=float(rng.normal(0.0, 0.025)),
        cy=float(rng.normal(0.02 if ap else 0.0, 0.035)),
        scale=float(rng.normal(0.97 if ap else 1.0, 0.035)),
        tilt=float(rng.normal(0.0, 0.03)),
        ap=ap,
        ctr=body.ctr,  # set from the findings by pathology.shape_changes
        mediastinum=body.mediastinum * (1.08 if ap else 1.0),
        knob=body.knob,
        dome_shift=(0.05, 0.05) if ap else (0.0, 0.0),
    )


def texture(rng: np.random.Generator, res: int, scale_px: float) -> np.ndarray:
    """Smooth random field with unit standard deviation (band-limited noise at ``scale_px``).

    Broad fields are drawn on a coarser grid and interpolated up: the same look, a fraction of the cost.
    """
    factor = max(1, int(scale_px // 3))
    n = -(-res // factor)
    field = ndimage.gaussian_filter(rng.standard_normal((n, n)).astype(np.float32), scale_px / factor, mode="wrap")
    if factor > 1:
        field = _upsample(field, factor)[:res, :res]
    return field / (field.std() + 1e-6)


def _upsample(field: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear upsampling by an integer factor (PIL's float resize: much faster than ndimage.zoom)."""
    h, w = field.shape
    img = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32))
    return np.asarray(img.resize((w * factor, h * factor), Image.Resampling.BILINEAR), dtype=np.float32)


def smooth(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur for broad kernels, done on a coarser grid (the result is smooth anyway)."""
    factor = max(1, int(sigma_px // 3))
    if factor == 1:
        return ndimage.gaussian_filter(img, sigma_px, mode="nearest")
    coarse = ndimage.gaussian_filter(img[::factor, ::factor], sigma_px / factor, mode="nearest")
    return _upsample(coarse, factor)[: img.shape[0], : img.shape[1]]


def ramp(d: np.ndarray, width: float) -> np.ndarray:
    """Soft step: 0 for ``d < -width/2``, 1 for ``d > width/2``, linear between (an anti-aliased edge)."""
    return np.clip(0.5 + d / width, 0.0, 1.0)


def smoothstep(d: np.ndarray, width: float) -> np.ndarray:
    t = np.clip(0.5 + d / width, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class Chest:
    """One study's chest geometry evaluated on a ``res`` x ``res`` grid, with drawing helpers.

    Args:
        body: the patient's build.
        pose: this study's positioning, view and shape changes from findings.
        res: rendering resolution in pixels.
    """

    def __init__(self, body: Body, pose: Pose, res: int) -> None:
        self.body, self.pose, self.res = body, pose, res
        self.px = 2.0 / res  # one pixel in image units
        self.edge = 1.2 * self.px / pose.scale  # width of an anti-aliased edge in body units
        coords = (np.arange(res, dtype=np.float32) + 0.5) / res * 2.0 - 1.0
        X, Y = np.meshgrid(coords, coords)
        self.X, self.Y = X, Y
        c, s = math.cos(pose.tilt), math.sin(pose.tilt)
        dx, dy = (X - pose.cx) / pose.scale, (Y - pose.cy) / pose.scale
        self.xb = (c * dx + s * dy).astype(np.float32)
        self.yb = (-s * dx + c * dy).astype(np.float32)
        # Derived landmarks (body frame).
        b = body
        self.W = b.half_width
        self.dome = (b.dome_y - pose.dome_shift[0], b.dome_y + b.dome_left_drop - pose.dome_shift[1])
        self.cp = (self.dome[0] + b.cp_depth, self.dome[1] + b.cp_depth)
        self.apex = b.apex_y
        thorax = 2.0 * (self.W + 0.03)
        heart_w = pose.ctr * thorax
        # The heart: from the hila down onto the diaphragm; the right border (right atrium) is widest
        # half-way down, the left border (left ventricle) bulges lowest, at the apex. Its total width
        # gives the cardiothoracic ratio.
        share = b.heart_left_share
        self.heart_ext = {-1: heart_w * (1.0 - share) - pose.shift, 1: heart_w * share + pose.shift}
        self.heart_top = -0.1 - 0.45 * (pose.ctr - 0.43) + 0.5 * (self.dome[0] - 0.36)
        self.hilum = {
            -1: (-0.16 - 0.3 * pose.mediastinum + pose.shift, -0.1),
            1: (0.17 + 0.3 * pose.mediastinum + pose.shift, -0.15),
        }
        self.carina = (pose.shift * 0.5, -0.3)
        self._lung: dict[int, np.ndarray] = {}
        self._below: np.ndarray | None = None
        # Body frame -> pixel (column, row), as one affine map: x_px = a*xb + b*yb + c0, y_px = d*xb + e*yb + f0.
        k = pose.scale * res / 2.0
        self._affine = (
            k * c,
            -k * s,
            (pose.cx + 1.0) / 2.0 * res - 0.5,
            k * s,
            k * c,
            (pose.cy + 1.0) / 2.0 * res - 0.5,
        )

    # -- coordinate helpers -------------------------------------------------------------------------
    def points(self, xb, yb) -> list[tuple[float, float]]:
        """Body-frame points to a list of pixel (column, row) pairs for PIL, without numpy overhead."""
        if isinstance(xb, np.ndarray):
            xb = xb.tolist()
        if isinstance(yb, np.ndarray):
            yb = yb.tolist()
        a, b, c0, d, e, f0 = self._affine
        return [(a * x + b * y + c0, d * x + e * y + f0) for x, y in zip(xb, yb, strict=True)]

    def to_pixels(self, xb, yb) -> tuple[np.ndarray, np.ndarray]:
        """Body-frame points to pixel coordinates (column, row) for PIL drawing."""
        xb, yb = np.asarray(xb, dtype=float), np.asarray(yb, dtype=float)
        c, s = math.cos(self.pose.tilt), math.sin(self.pose.tilt)
        X = self.pose.cx + self.pose.scale * (c * xb - s * yb)
        Y = self.pose.cy + self.pose.scale * (s * xb + c * yb)
        return (X + 1.0) / 2.0 * self.res - 0.5, (Y + 1.0) / 2.0 * self.res - 0.5

    def canvas(self) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        img = Image.new("F", (self.res, self.res), 0.0)
        return img, ImageDraw.Draw(img)

    def polyline(self, draw, xb, yb, width: float, fill: float) -> None:
        """Draw a polyline given in body units; ``width`` in body units too."""
        w = max(1, int(round(width * self.pose.scale / self.px)))
        draw.line(self.points(xb, yb), fill=float(fill), width=w, joint="curve")

    def polygon(self, draw, xb, yb, fill: float) -> None:
        draw.polygon(self.points(xb, yb), fill=float(fill))

    def ellipse(self, draw, x, y, rx, ry, fill: float) -> None:
        (x0, y0), (x1, y1) = self.points([x - rx, x + rx], [y - ry, y + ry])
        draw.ellipse([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=float(fill))

    def blur(self, img: Image.Image | np.ndarray, sigma_units: float) -> np.ndarray:
        arr = np.array(img, dtype=np.float32)  # a writable copy, even of a PIL image
        sigma = sigma_units * self.pose.scale / self.px
        return ndimage.gaussian_filter(arr, sigma, mode="nearest") if sigma > 0.3 else arr

    # -- the lung outline, per side -----------------------------------------------------------------
    def lung_t(self, side: int, y) -> np.ndarray:
        """Height within the lung, 0 at the apex and 1 at the costophrenic angle."""
        cp = self.cp[0 if side < 0 else 1]
        return np.clip((y - self.apex) / (cp - self.apex), 0.0, 1.0)

    def lateral(self, side: int, y) -> np.ndarray:
        """Distance from the midline to the lung's lateral edge (the inner chest wall) at height ``y``."""
        t = self.lung_t(side, y)
        top = 0.38 * self.W
        return top + (self.W - top) * np.sqrt(1.0 - (1.0 - t) ** 3.5) + side * self.pose.shift * 0.3

    def medial(self, side: int, y) -> np.ndarray:
        """Distance from the midline to the lung's medial edge: mediastinum, heart and aortic knob."""
        y = np.asarray(y, dtype=np.float32)
        t = self.lung_t(side, y)
        top = 0.38 * self.W
        m = self.pose.mediastinum + side * self.pose.shift
        if self.pose.widening > 0:
            # A widened mediastinum bulges convexly between the thoracic inlet and the heart.
            span = np.clip((y - self.apex - 0.05) / (self.heart_top + 0.05 - self.apex), 0.0, 1.0)
            bulge = np.clip(np.sin(np.pi * span), 0.0, None) ** 0.6
            m = m + self.pose.widening * bulge * (1.1 if side < 0 else 0.9)
        apex_round = top - (top - m) * np.sqrt(np.clip(t / 0.12, 0.0, 1.0))
        out = np.maximum(apex_round, m)
        out = np.maximum(out, self.heart_profile(side, y))
        if side > 0:
            knob_y = self.heart_top - 0.2
            ky = np.clip(1.0 - ((y - knob_y) / (self.pose.knob * 1.6)) ** 2, 0.0, 1.0)
            out = np.maximum(out, m + self.pose.knob * np.sqrt(ky))
            # Pulmonary trunk: a gentle convexity between knob and heart.
            py = np.clip(1.0 - ((y - (self.heart_top - 0.05)) / 0.07) ** 2, 0.0, 1.0)
            out = np.maximum(out, m + 0.4 * self.pose.knob * np.sqrt(py) + 0.02)
        return out

    def heart_profile(self, side: int, y) -> np.ndarray:
        """Distance from the midline to the heart border on one side at height ``y`` (0 above the heart)."""
        bottom = self.dome[0 if side < 0 else 1] + 0.03
        t = (np.asarray(y, dtype=np.float32) - self.heart_top) / (bottom - self.heart_top)
        peak = 0.55 if side < 0 else 0.85
        rise = np.sin(0.5 * np.pi * np.clip(t / peak, 0.0, 1.0))
        shape = np.sqrt(rise) if side < 0 else rise**0.65
        if side < 0:  # the right border curves gently back in towards the cardiophrenic angle
            shape = shape * (1.0 - 0.12 * np.clip((t - peak) / (1.0 - peak), 0.0, 1.0) ** 2)
        return np.where(t > 0, self.heart_ext[side] * shape, 0.0).astype(np.float32)

    def diaphragm(self, side: int, u) -> np.ndarray:
        """Height of the hemidiaphragm at distance ``u`` from the midline (dome, then down to the angle)."""
        k = 0 if side < 0 else 1
        dome, depth = self.dome[k], self.cp[k] - self.dome[k]
        u_top = 0.45 * self.W
        lateral = dome + depth * (np.clip(u - u_top, 0.0, None) / (self.W - u_top)) ** 2
        medial = dome + 0.3 * depth * (np.clip(u_top - u, 0.0, None) / u_top) ** 2
        return np.where(u > u_top, lateral, medial)

    def lung(self, side: int) -> np.ndarray:
        """Soft mask of one lung field (1 inside, anti-aliased edge)."""
        if side not in self._lung:
            u, y, e = side * self.xb, self.yb, self.edge
            mask = ramp(self.lateral(side, y) - u, e) * ramp(u - self.medial(side, y), e)
            mask *= ramp(self.diaphragm(side, u) - y, e) * ramp(y - self.apex, e)
            self._lung[side] = mask.astype(np.float32)
        return self._lung[side]

    @property
    def lungs(self) -> np.ndarray:
        return self.lung(-1) + self.lung(1)

    def below_diaphragm(self) -> np.ndarray:
        """Soft mask of the abdomen below the hemidiaphragms (computed once per study)."""
        if self._below is None:
            u = np.abs(self.xb)
            dia = np.where(self.xb < 0, self.diaphragm(-1, u), self.diaphragm(1, u))
            self._below = smoothstep(self.yb - dia, 2.5 * self.edge)
        return self._below

    def body_halfwidth(self) -> np.ndarray:
        y = self.yb
        # The chest wall is narrowest at the axillae and widest at the lower ribs; the waist narrows again.
        chest = (self.W + 0.05 + self.body.wall) * (0.95 + 0.05 * np.sin(np.pi * np.clip((y + 0.5) / 1.3, 0.0, 1.0)))
        chest = chest - 0.12 * np.clip(y - 0.75, 0.0, None)
        shoulders = 1.45
        s = 1.0 / (1.0 + np.exp(-(self.body.shoulder_y - y) / 0.09))
        return chest + (shoulders - chest) * s

    # -- density layers of the normal chest ---------------------------------------------------------
    def soft_tissue(self) -> np.ndarray:
        """Soft tissue density: thickest in the midline (mediastinum, spine), thin at the chest wall."""
        bw = self.body_halfwidth()
        t = np.sqrt(np.clip(1.0 - (self.xb / bw) ** 2, 0.0, 1.0))
        body = ramp(bw - np.abs(self.xb), 2.0 * self.edge)
        # Above the shoulders only the neck: the trapezius slopes from the neck out to the shoulder tips,
        # leaving air in the upper corners.
        ax = np.abs(self.xb)
        slope_top = self.body.shoulder_y - 0.12 - 0.3 * np.clip((0.95 - ax) / 0.6, 0.0, 1.0) ** 1.5
        body = body * smoothstep(self.yb - slope_top, 0.05)
        # The neck and shoulders are thinner front to back than the chest.
        neck = 0.72 + 0.28 / (1.0 + np.exp(-(self.yb - self.apex - 0.05) / 0.08))
        dens = body * (0.3 + 0.32 * t) * neck
        # Spine and mediastinum: a dense column; the abdomen below the domes is as dense as the heart.
        dens += 0.035 * np.exp(-((self.xb / 0.08) ** 4)) * body
        heart = self.heart()
        # Heart and liver are equally dense, so the heart merges with the diaphragm below it; the heart
        # is thickest in its middle.
        heart = np.clip(heart * (0.8 + 0.35 * smooth(heart, 0.06 / self.px)), 0.0, 1.0)
        dens += 0.13 * np.maximum(self.below_diaphragm(), heart) * body
        if self.body.breast > 0:
            dens += self.breasts()
        return dens.astype(np.float32)

    def heart(self) -> np.ndarray:
        """Soft mask of the heart shadow (it merges with the diaphragm below)."""
        u, y = np.abs(self.xb), self.yb
        ext = np.where(self.xb < 0, self.heart_profile(-1, y), self.heart_profile(1, y))
        return smoothstep(ext - u, 4.0 * self.edge) * (ext > 0)

    def breasts(self) -> np.ndarray:
        out = np.zeros_like(self.xb)
        for side in SIDES:
            cx, cy = side * 0.55 * self.W, self.dome[0] - 0.02
            r = np.hypot((self.xb - cx) / (0.42 * self.W + 0.1), (self.yb - cy) / 0.28)
            out += 0.07 * self.body.breast * smoothstep(1.0 - r, 0.12) * smoothstep(self.yb - (cy - 0.22), 0.3)
        return out

    def air(self) -> np.ndarray:
        """How much air the x-ray crosses in the lungs: most in the mid and lower zones, least at the edges."""
        lungs = self.lungs
        inside = ndimage.distance_transform_edt(lungs > 0.5) * self.px / self.pose.scale
        depth = np.clip(inside / 0.09, 0.0, 1.0) ** 0.55
        apex_fade = 0.78 + 0.22 * np.clip((self.yb - self.apex) / 0.45, 0.0, 1.0)
        # Less air crossed near the hila and mediastinum (more tissue in the beam) than laterally.
        lateral = np.clip(np.abs(self.xb) / self.W, 0.0, 1.0)
        return (lungs * (0.35 + 0.65 * depth) * apex_fade * (0.82 + 0.18 * lateral)).astype(np.float32)

    def trachea(self) -> np.ndarray:
        img, draw = self.canvas()
        cx, cy = self.carina
        self.polyline(draw, [cx, cx, cx], [-1.05, -0.7, cy], 0.05, 1.0)
        self.polyline(draw, [cx, cx - 0.07, self.hilum[-1][0] + 0.04], [cy, cy + 0.05, cy + 0.12], 0.035, 0.8)
        self.polyline(draw, [cx, cx + 0.08, self.hilum[1][0] - 0.03], [cy, cy + 0.07, cy + 0.11], 0.03, 0.8)
        return self.blur(img, 0.008)

    def ribs(self, rng: np.random.Generator, fractures: dict[int, tuple[int, float, float]] | None = None):
        """Posterior and anterior ribs, both sides, with cortical margins.

        Args:
            fractures: ``{side: (first_rib, count, displacement)}``: ribs broken laterally with a gap and a
                step-off.

        Returns:
            (posterior, anterior) density layers.
        """
        fractures = fractures or {}
        self.fracture_sites: list[tuple[float, float]] = []
        post, draw_p = self.canvas()
        ant, draw_a = self.canvas()
        spacing = self.body.rib_spacing * (0.93 if self.pose.ap else 1.0)
        for side in SIDES:
            broken = fractures.get(side)
            for k in range(1, 12):
                y0 = self.apex - 0.07 + spacing * (k - 1) * (1.0 + 0.03 * (k - 1)) + rng.normal(0, 0.004)
                if y0 > self.cp[0] + 0.1:
                    break
                # Posterior rib: an arc of an ellipse, rising gently from the spine, then turning down along
                # the lateral chest wall.
                ry = 0.1 + 0.015 * min(k, 7)
                reach = float(self.lateral(side, np.float32(y0 + ry))) + 0.04 if k > 1 else 0.45 * self.W
                phi = np.linspace(-2.0, 0.55 if k > 1 else -0.1, 30)
                rx = (reach - 0.04) / (1.0 - math.cos(2.0))
                uc = 0.04 - rx * math.cos(2.0)
                u = uc + rx * np.cos(phi)
                y = y0 + ry + ry * np.sin(phi) + 0.14 * (u - 0.04)
                thick = 0.028 + 0.0015 * k
                xs = side * u
                # Posterior ribs fade towards the spine, where the mediastinum overlaps them.
                fill = 0.45 + 0.55 * np.clip(np.linspace(0.0, 1.6, len(u)), 0.0, 1.0)
                pieces = [(xs, y, fill)]
                if broken is not None and broken[0] <= k < broken[0] + broken[1]:
                    # Break the rib laterally: a gap and the distal piece displaced (step-off).
                    cut = int(14 + (k % 3))
                    gap, disp = 2, broken[2] * (1 if k % 2 else -0.8)
                    pieces = [
                        (xs[:cut], y[:cut], fill[:cut]),
                        (xs[cut + gap :], y[cut + gap :] + disp, fill[cut + gap :]),
                    ]
                    self.fracture_sites.append((float(xs[cut]), float(y[cut] + 0.5 * disp)))
                for px, py, pf in pieces:
                    for j in range(0, len(px) - 1, 6):
                        seg = slice(j, j + 7)
                        self.polyline(draw_p, px[seg], py[seg], thick * (0.9 + 0.2 * pf[j]), float(pf[j]))
                        self.polyline(draw_p, px[seg], py[seg], thick * 0.5, 0.72 * float(pf[j]))
                # Anterior rib: from the lateral end, obliquely down and medial; cartilage invisible medially.
                ue, ye = u[-1], y[-1]
                if k <= 9:
                    ua = np.linspace(ue, 0.22 + 0.012 * k, 16)
                    ya = ye - 0.02 + (ue - ua) * (0.38 + 0.02 * k) - 0.04 * np.sin(np.linspace(0, np.pi, 16))
                    for j in range(0, 15, 5):
                        self.polyline(draw_a, side * ua[j : j + 6], ya[j : j + 6], thick * 0.85, 1.0 - 0.25 * j / 5)
                        self.polyline(draw_a, side * ua[j : j + 6], ya[j : j + 6], thick * 0.4, 0.5 - 0.1 * j / 5)
        return self.blur(post, 0.004), self.blur(ant, 0.006)

    def clavicles(self, fracture_side: int | None = None, displacement: float = 0.0) -> np.ndarray:
        img, draw = self.canvas()
        lift = -0.06 if self.pose.ap else 0.0
        for side in SIDES:
            s = np.linspace(0.0, 1.0, 24)
            u = 0.06 + 0.55 * s + 0.05 * s**2
            y_med, y_lat = self.apex + 0.2 + lift, self.apex + 0.03 + lift * 0.3
            y = y_med + (y_lat - y_med) * s + 0.025 * np.sin(2 * np.pi * s)
            pieces = [(side * u, y)]
            if fracture_side == side:
                # Mid-shaft fracture: the lateral fragment drops (the arm's weight) and angulates.
                cut = 12
                drop = displacement * (1.0 + 1.5 * s[cut + 1 :] - 1.5 * s[cut + 1])
                pieces = [(side * u[:cut], y[:cut]), (side * u[cut + 1 :], y[cut + 1 :] + drop)]
            for xs, ys in pieces:
                self.polyline(draw, xs, ys, 0.05, 1.0)
                self.polyline(draw, xs, ys, 0.03, 0.6)
            # Medial (sternal) end flares.
            self.ellipse(draw, side * 0.075, y_med + 0.01, 0.03, 0.025, 1.0)
        return self.blur(img, 0.005)

    def spine(self) -> np.ndarray:
        img, draw = self.canvas()
        y = -1.1
        k = 0
        while y < 1.1:
            h = 0.07 + 0.0025 * k
            x0 = 0.055 + 0.0015 * k
            self.polygon(draw, [-x0, x0, x0, -x0], [y, y, y + h, y + h], 0.45)
            for side in SIDES:  # pedicles
                self.ellipse(draw, side * (x0 - 0.012), y + 0.02, 0.012, 0.016, 1.0)
                self.ellipse(draw, side * (x0 - 0.012), y + 0.02, 0.006, 0.009, 0.45)
            self.ellipse(draw, 0.0, y + h * 0.6, 0.01, 0.02, 0.8)  # spinous process
            y += h + 0.02
            k += 1
        return self.blur(img, 0.006)

    def shoulders(self) -> np.ndarray:
        img, draw = self.canvas()
        for side in SIDES:
            hx = side * (self.W + self.body.wall + 0.22)
            hy = self.body.shoulder_y - 0.12
            self.ellipse(draw, hx + side * 0.05, hy - 0.03, 0.17, 0.17, 0.45)
            self.ellipse(draw, hx + side * 0.05, hy - 0.03, 0.15, 0.15, 0.3)
            # Scapula: lateral border and body, overlapping the lung on AP films.
            inward = 0.1 if self.pose.ap else 0.0
            sx = side * (self.W + self.body.wall - 0.02 - inward)
            self.polygon(
                draw,
                [sx + side * 0.12, sx - side * (0.1 + inward), sx - side * 0.02, sx + side * 0.12],
                [hy + 0.02, hy + 0.06, hy + 0.55, hy + 0.2],
                0.22,
            )
        return self.blur(img, 0.01)

    def vessels(self, rng: np.random.Generator, lines: int = 11) -> np.ndarray:
        """Pulmonary vessels: trees branching from each hilum, tapering towards the periphery."""
        img, draw = self.canvas()
        for side in SIDES:
            hx, hy = self.hilum[side]
            for i in range(lines):
                # Spread of trunk directions: up, out and down from the hilum (angles from the lateral).
                angle = -1.45 + 2.9 * (i + rng.uniform(0.2, 0.8)) / lines
                self._branch(draw, rng, side, hx, hy, angle, 0.1 + rng.uniform(0, 0.04), 0.017, 0, 0.8)
            # Hilar vessels: a lumpy dense knot.
            for _ in range(4):
                self.ellipse(
                    draw, hx + side * rng.uniform(-0.02, 0.05), hy + rng.uniform(-0.07, 0.07), 0.03, 0.04, 0.6
                )
        return self.blur(img, 0.008)

    def _branch(self, draw, rng, side, x, y, angle, length, width, depth, fill) -> None:
        if depth > 3:
            return
        bends = rng.normal(0, 0.12, 4)
        spreads = rng.uniform(0.25, 0.55, 2)
        shrink = rng.uniform(0.6, 0.78, 2)
        xs, ys = [x], [y]
        a = angle
        step = length / 4
        for bend in bends.tolist():
            a += bend
            x = x + side * math.cos(a) * step
            y = y + math.sin(a) * step
            xs.append(x)
            ys.append(y)
        self.polyline(draw, xs, ys, width, fill)
        for c in range(2 if depth < 3 else 1):
            spread = float(spreads[c]) * (1 if c == 0 else -1)
            self._branch(draw, rng, side, x, y, a + spread, length * shrink[c], width * 0.72, depth + 1, fill * 0.72)

    def bowel_gas(self, rng: np.random.Generator) -> np.ndarray:
        """A few pockets of colonic gas in the upper abdomen, at the bottom of the film."""
        img, draw = self.canvas()
        for _ in range(int(rng.integers(0, 4))):
            x = rng.uniform(-0.8, 0.8) * self.W
            y = max(self.cp[0], self.cp[1]) + rng.uniform(0.15, 0.5)
            self.ellipse(draw, x, y, rng.uniform(0.03, 0.07), rng.uniform(0.025, 0.045), rng.uniform(0.3, 0.8))
        return self.blur(img, 0.015)

    def stomach_bubble(self, rng: np.random.Generator) -> np.ndarray:
        img, draw = self.canvas()
        if rng.random() < 0.8:
            cx = 0.5 * self.W + rng.normal(0, 0.04)
            top = self.diaphragm(1, np.array(cx)) + 0.05
            rx, ry = rng.uniform(0.06, 0.1), rng.uniform(0.04, 0.07)
            self.ellipse(draw, cx, float(top) + ry, rx, ry, 1.0)
            # Fluid level: flat lower half on upright films.
            if not self.pose.ap:
                self.polygon(
                    draw, [cx - rx, cx + rx, cx + rx, cx - rx], [top + ry, top + ry, top + 2 * ry, top + 2 * ry], 0.0
                )
        return self.blur(img, 0.012)


def with_shape_changes(pose: Pose, **changes) -> Pose:
    return replace(pose, **changes)
