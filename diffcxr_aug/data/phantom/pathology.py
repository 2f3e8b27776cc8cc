"""Findings and support devices, drawn as radiologists see them.

Each finding changes the chest in one of a few ways, collected in :class:`Effects`:

* ``fill``: the share of lung air displaced by fluid or tissue (consolidation, effusion, edema,
  atelectasis, masses); where it reaches 1 the lung is as dense as soft tissue, so borders it touches
  (heart, diaphragm) disappear, the silhouette sign;
* ``extra_air`` and ``vessel_mask``: a pneumothorax adds air and has no lung markings;
* ``density``: extra density on top (pleural line, Kerley lines, nodules, plaques);
* shape changes of the pose (cardiomegaly, mediastinal widening, volume loss) and broken ribs or
  clavicles, applied when the anatomy is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from diffcxr_aug.data.phantom.anatomy import SIDES, Chest, Pose, ramp, smoothstep, texture
from diffcxr_aug.data.phantom.findings import THORAX_CM, Finding, StudyTruth, lesion_radius

SIDE_OF = {"right": (-1,), "left": (1,), "bilateral": (-1, 1), None: (-1, 1)}


@dataclass
class Effects:
    fill: np.ndarray
    extra_air: np.ndarray
    vessel_mask: np.ndarray
    density: np.ndarray
    vessel_blur: float = 0.0
    rib_fractures: dict[int, tuple[int, int, float]] = field(default_factory=dict)
    clavicle_fracture: tuple[int | None, float] = (None, 0.0)

    @classmethod
    def empty(cls, res: int) -> Effects:
        zeros = np.zeros((res, res), dtype=np.float32)
        return cls(zeros.copy(), zeros.copy(), np.ones_like(zeros), zeros.copy())


AP_MAGNIFICATION = 0.025  # how much an AP film adds to the apparent cardiothoracic ratio


def cardiothoracic_ratio(truth: StudyTruth) -> float:
    """The cardiothoracic ratio drawn for a frontal study (the manifest's ``meta_ctr``).

    Healthy hearts reach 0.49; cardiomegaly runs from 0.49 (mildest) to 0.72 (severe); AP films magnify.
    """
    if "cardiomegaly" in truth.findings:
        ctr = 0.49 + 0.23 * (truth.findings["cardiomegaly"].severity - 0.2) / 0.8
    else:
        ctr = truth.body.ctr
    return ctr + (AP_MAGNIFICATION if truth.view == "AP" else 0.0)


def shape_changes(pose: Pose, truth: StudyTruth) -> Pose:
    """Findings that change the shape of the chest itself, applied before it is drawn."""
    f = truth.findings
    changes: dict = {"ctr": cardiothoracic_ratio(truth)}
    if "enlarged_cardiomediastinum" in f:
        sev = f["enlarged_cardiomediastinum"].severity
        changes["widening"] = 0.045 + 0.12 * (sev - 0.2) / 0.8
        changes["knob"] = pose.knob + 0.025 * sev
    shift = 0.0
    dome = list(pose.dome_shift)
    if "atelectasis" in f and f["atelectasis"].kind == "lobar":
        side = SIDE_OF[f["atelectasis"].side][0]
        sev = f["atelectasis"].severity
        dome[0 if side < 0 else 1] += 0.06 + 0.1 * sev
        shift += side * 0.04 * sev  # volume loss pulls the mediastinum towards the collapse
    if "pleural_effusion" in f and f["pleural_effusion"].side != "bilateral" and f["pleural_effusion"].severity > 0.75:
        shift -= SIDE_OF[f["pleural_effusion"].side][0] * 0.05 * (f["pleural_effusion"].severity - 0.6)
    if "pneumothorax" in f and f["pneumothorax"].severity > 0.8:
        shift -= SIDE_OF[f["pneumothorax"].side][0] * 0.04
    changes["shift"] = shift
    changes["dome_shift"] = tuple(dome)
    return replace(pose, **changes)


def _zone_bounds(chest: Chest, side: int, zone: str | None) -> tuple[float, float]:
    hy = chest.hilum[side][1]
    dome = chest.dome[0 if side < 0 else 1]
    if zone == "upper":
        return chest.apex + 0.06, hy - 0.02
    if zone == "middle":
        return hy - 0.04, hy + 0.22
    return hy + 0.12, dome - 0.03


def _blob(chest: Chest, rng, cx, cy, radius, roughness, softness) -> np.ndarray:
    """A soft irregular blob: a disc whose edge is pushed in and out by smooth noise."""
    r = np.hypot(chest.xb - cx, (chest.yb - cy) * 1.15) / radius
    field = 1.0 - r + roughness * texture(rng, chest.res, 0.035 * chest.res)
    return smoothstep(field, softness)


def _point_in_zone(chest: Chest, rng, side: int, zone: str | None, across=None, down=None) -> tuple[float, float]:
    y0, y1 = _zone_bounds(chest, side, zone)
    y = y0 + (rng.uniform(0.2, 0.8) if down is None else down) * (y1 - y0)
    med, lat = float(chest.medial(side, np.float32(y))), float(chest.lateral(side, np.float32(y)))
    a = rng.uniform(0.35, 0.7) if across is None else across
    return side * (med + 0.03 + a * (lat - med - 0.06)), y


def draw_findings(chest: Chest, truth: StudyTruth, rng: np.random.Generator, fx: Effects) -> None:
    """Draw every present finding of ``truth`` into the effect layers ``fx``."""
    # In this order: each finding draws from the study's random stream, and later layers add to earlier ones.
    drawers = (
        ("pleural_effusion", _draw_pleural_effusion),
        ("pneumothorax", _draw_pneumothorax),
        ("consolidation", _draw_consolidation),
        ("pneumonia", _draw_pneumonia),
        ("opacity", _draw_opacity),
        ("edema", _draw_edema),
        ("atelectasis", _draw_atelectasis),
        ("lung_lesion", _draw_lung_lesion),
        ("pleural_other", _draw_pleural_other),
        ("fracture", _draw_fracture),
    )
    for name, draw in drawers:
        if name in truth.findings:
            draw(chest, truth.findings[name], rng, fx)


def _draw_pleural_effusion(chest: Chest, fd: Finding, rng: np.random.Generator, fx: Effects) -> None:
    """Pleural fluid at the lung base, its meniscus climbing the lateral chest wall."""
    for side in SIDE_OF[fd.side]:
        sev = fd.severity * (rng.uniform(0.55, 1.0) if fd.side == "bilateral" else 1.0)
        lung = chest.lung(side)
        u = side * chest.xb
        cp = chest.cp[0 if side < 0 else 1]
        height = 0.05 + 0.5 * sev**1.3
        frac = np.clip(u / chest.W, 0.0, 1.2)
        # Meniscus: the fluid surface climbs the lateral chest wall and is lower medially.
        top = cp - height * (0.45 + 0.55 * frac**2) - 0.06 * np.exp(-np.clip(chest.W - u, 0, None) / 0.04)
        fluid = smoothstep(chest.yb - top, 0.03 + 0.06 * sev) * lung
        fx.fill += fluid
        fx.density += 0.04 * fluid


def _draw_pneumothorax(chest: Chest, fd: Finding, rng: np.random.Generator, fx: Effects) -> None:
    """A collapsed lung edge: the visceral pleural line, with air and no vessels beyond it."""
    e = chest.edge
    side = SIDE_OF[fd.side][0]
    lung = chest.lung(side)
    collapse = 0.12 + 0.5 * fd.severity
    u, y = side * chest.xb, chest.yb
    t = chest.lung_t(side, y)
    med, lat = chest.medial(side, y), chest.lateral(side, y)
    edge_u = med + (lat - med) * (1.0 - collapse * (1.0 - 0.55 * t**2))
    apex_c = chest.apex + collapse * 0.45
    # The visceral pleural line: a thin bright edge, with air and no markings beyond it.
    collapsed = ramp(edge_u - u, 1.5 * e) * ramp(y - apex_c - 0.04 * np.abs(u - 0.4 * chest.W), 1.5 * e)
    gap = lung * (1.0 - collapsed)
    fx.vessel_mask *= 1.0 - gap
    fx.extra_air += 0.09 * gap
    fx.fill += 0.2 * collapse * collapsed * lung
    line = 4.0 * collapsed * (1.0 - collapsed) * lung
    fx.density += 0.2 * line


def _draw_consolidation(chest: Chest, fd: Finding, rng: np.random.Generator, fx: Effects) -> None:
    """Dense consolidation with air bronchograms (a sharp lower border at the right horizontal fissure)."""
    e = chest.edge
    for side in SIDE_OF[fd.side]:
        lung = chest.lung(side)
        cx, cy = _point_in_zone(chest, rng, side, fd.zone, down=0.5)
        radius = 0.14 + 0.14 * fd.severity
        mask = _blob(chest, rng, cx, cy, radius, 0.25, 0.32)
        if fd.zone == "upper" and side < 0:
            # Right upper lobe: sharp lower border at the horizontal fissure.
            mask *= ramp(chest.hilum[side][1] - chest.yb, e)
        dense = 0.75 + 0.2 * fd.severity
        bronchi = _air_bronchograms(chest, rng, side, cx, cy, radius)
        patchy = 1.0 + 0.1 * texture(rng, chest.res, 0.012 * chest.res)
        fx.fill += dense * mask * lung * (1.0 - 0.5 * bronchi) * patchy


def _draw_pneumonia(chest: Chest, fd: Finding, rng: np.random.Generator, fx: Effects) -> None:
    """Two or three patchy airspace opacities, mostly in the finding's zone."""
    for side in SIDE_OF[fd.side]:
        lung = chest.lung(side)
        for _ in range(int(rng.integers(2, 4))):
            cx, cy = _point_in_zone(chest, rng, side, fd.zone if rng.random() < 0.7 else "lower")
            radius = 0.07 + 0.08 * fd.severity
            mask = _blob(chest, rng, cx, cy, radius, 0.45, 0.5)
            patchy = 1.0 + 0.2 * texture(rng, chest.res, 0.01 * chest.res)
            fx.fill += (0.5 + 0.35 * fd.severity) * mask * lung * patchy


def _draw_opacity(chest: Chest, fd: Finding, rng: np.random.Generator, fx: Effects) -> None:
    """A soft, ill-defined opacity."""
    for side in SIDE_OF[fd.side]:
        lung = chest.lung(side)
        cx, cy = _point_in_zone(chest, rng, side, fd.zone)
        radius = 0.16 + 0.12 * fd.severity
        mask = _blob(chest, rng, cx, cy, radius, 0.35, 0.7)
        fx.fill += (0.3 + 0.3 * fd.severity) * mask * lung


def _draw_edema(chest: Chest, fd: Finding, rng: np.random.Generator, fx: Effects) -> None:
    """Perihilar haze (confluent "bat wings" when severe), blurred vessels and Kerley B lines."""
    sev = fd.severity
    fx.vessel_blur = 1.2 + 2.5 * sev
    lines, draw = chest.canvas()
    for side in SIDES:
        lung = chest.lung(side)
        hx, hy = chest.hilum[side]
        r = np.hypot((chest.xb - hx) / 0.36, (chest.yb - hy - 0.05) / 0.42)
        haze = np.exp(-(r**2)) * (0.25 + 0.45 * sev)
        if sev > 0.6:  # alveolar edema: confluent perihilar and basal opacity, "bat wings"
            haze += (sev - 0.5) * 1.2 * _blob(chest, rng, hx + side * 0.1, hy + 0.12, 0.33, 0.3, 0.4)
        fx.fill += haze * lung
        # Kerley B lines: short horizontal lines reaching the lateral pleura at the bases.
        cp = chest.cp[0 if side < 0 else 1]
        for _ in range(int(5 + 10 * sev)):
            y = cp - rng.uniform(0.04, 0.3)
            lat = float(chest.lateral(side, np.float32(y)))
            length = rng.uniform(0.035, 0.07)
            chest.polyline(draw, [side * lat, side * (lat - length)], [y, y + rng.normal(0, 0.004)], 0.007, 1.0)
    fx.density += 0.13 * chest.blur(lines, 0.003) * chest.lungs


def _draw_atelectasis(chest: Chest, fd: Finding, rng: np.random.Generator, fx: Effects) -> None:
    """Lobar collapse (a dense triangle against the heart border) or plate-like bands above the dome."""
    bands, draw = chest.canvas()
    for side in SIDE_OF[fd.side]:
        dome = chest.dome[0 if side < 0 else 1]
        if fd.kind == "lobar":
            # Lower lobe collapse: a dense triangle against the heart border down to the medial diaphragm
            # (behind the heart on the left: the retrocardiac "sail"), plus the volume loss set in the pose.
            hx, hy = chest.hilum[side]
            w = 0.2 + 0.15 * fd.severity
            chest.polygon(draw, [hx, side * 0.04, side * (0.06 + w)], [hy + 0.05, dome + 0.04, dome + 0.06], 0.9)
        n_plates = int(rng.integers(1, 3)) if fd.kind == "plate" else 1
        for _ in range(n_plates):
            y = dome - rng.uniform(0.08, 0.22)
            med = float(chest.medial(side, np.float32(y)))
            lat = float(chest.lateral(side, np.float32(y)))
            a = med + rng.uniform(0.05, 0.25) * (lat - med)
            b = min(lat - 0.03, a + rng.uniform(0.18, 0.32))
            tilt = rng.normal(0.02, 0.02)
            thick = 0.014 + 0.02 * fd.severity
            chest.polyline(draw, [side * a, side * b], [y, y + tilt], thick, 1.0)
    bands = chest.blur(bands, 0.008)
    fx.fill += 0.95 * bands * chest.lungs
    fx.density += 0.06 * bands


def _draw_lung_lesion(chest: Chest, fd: Finding, rng: np.random.Generator, fx: Effects) -> None:
    """A nodule or a mass: a lobulated sphere of soft tissue density."""
    e = chest.edge
    side = SIDE_OF[fd.side][0]
    across, down = fd.loc if fd.loc is not None else (None, None)
    cx, cy = _point_in_zone(chest, rng, side, fd.zone, across=across, down=down)
    radius = lesion_radius(fd)
    lobes = 0.12 if fd.kind == "mass" else 0.04
    theta = np.arctan2(chest.yb - cy, chest.xb - cx)
    phase = rng.uniform(0, 2 * np.pi, 2)
    rim = radius * (1.0 + lobes * np.sin(3 * theta + phase[0]) + 0.6 * lobes * np.sin(5 * theta + phase[1]))
    d = np.hypot(chest.xb - cx, chest.yb - cy)
    sphere = np.sqrt(np.clip(1.0 - (d / rim) ** 2, 0.0, 1.0))
    body = ramp(rim - d, 1.5 * e)
    # A lesion displaces only its own thickness of the air the beam crosses: a nodule is a moderate
    # density, a mass a dense one.
    fx.fill += (0.6 + 2.5 * radius) * np.maximum(sphere, 0.5 * body) * chest.lungs
    fx.density += 0.05 * body


def _draw_pleural_other(chest: Chest, fd: Finding, rng: np.random.Generator, fx: Effects) -> None:
    """Pleural thickening: an apical cap or a lateral band."""
    e = chest.edge
    for side in SIDE_OF[fd.side]:
        lung = chest.lung(side)
        u, y = side * chest.xb, chest.yb
        thick = 0.03 + 0.04 * fd.severity
        if fd.kind == "apical":
            band = ramp(chest.apex + 0.02 + 2.2 * thick - y, 2 * e)
        else:
            lat = chest.lateral(side, y)
            y0 = chest.hilum[side][1] - 0.1
            y1 = chest.cp[0 if side < 0 else 1] - 0.05
            span = np.clip((y - y0) / (y1 - y0), 0.0, 1.0)
            profile = thick * np.sqrt(np.clip(np.sin(np.pi * span), 0.0, None)) * (1.0 + 0.25 * np.sin(13 * span))
            band = ramp(u - (lat - profile), 1.5 * e) * (profile > 0.004)
        fx.fill += band * lung
        fx.density += 0.07 * band * lung


def _draw_fracture(chest: Chest, fd: Finding, rng: np.random.Generator, fx: Effects) -> None:
    """A displaced clavicle or rib fracture, drawn later with the bones (recorded in ``fx`` here)."""
    side = SIDE_OF[fd.side][0]
    displacement = 0.035 + 0.04 * fd.severity
    if fd.kind == "clavicle":
        fx.clavicle_fracture = (side, displacement + 0.01)
    else:
        fx.rib_fractures[side] = (fd.items[0], len(fd.items), displacement)


def _air_bronchograms(chest: Chest, rng, side, cx, cy, radius) -> np.ndarray:
    """Dark branching bronchi made visible by the air-filled spaces around them becoming dense."""
    img, draw = chest.canvas()
    hx, hy = chest.hilum[side]
    for _ in range(3):
        xs = [cx - side * radius * 0.6 + rng.normal(0, 0.02)]
        ys = [cy + rng.normal(0, 0.05)]
        angle = np.arctan2(cy - hy, side * (cx - hx)) + rng.normal(0, 0.4)
        for _ in range(4):
            angle += rng.normal(0, 0.25)
            xs.append(xs[-1] + side * np.cos(angle) * radius * 0.3)
            ys.append(ys[-1] + np.sin(angle) * radius * 0.3)
        chest.polyline(draw, xs, ys, 0.012, 1.0)
    return chest.blur(img, 0.004)


def draw_devices(chest: Chest, truth: StudyTruth, rng: np.random.Generator, dens: np.ndarray) -> None:
    """Add radiopaque support devices (tubes, lines, pacemaker) to the density map in place."""
    if "support_devices" not in truth.findings:
        return
    img, draw = chest.canvas()
    W, apex = chest.W, chest.apex
    heart_top, dome_l = chest.heart_top, chest.dome[1]
    cx, cy = chest.carina
    sd = truth.findings["support_devices"]
    per_cm = 2.0 * (W + 0.03) / THORAX_CM
    for device in sd.items:
        if device == "ett":
            tip = cy - sd.extra.get("ett_cm", 4.0) * per_cm
            xs, ys = [cx + 0.004, cx + 0.002, cx], [-1.1, -0.6, tip]
            chest.polyline(draw, [x - 0.014 for x in xs], ys, 0.006, 0.35)
            chest.polyline(draw, [x + 0.014 for x in xs], ys, 0.006, 0.35)
            chest.polyline(draw, [x + 0.009 for x in xs], ys, 0.009, 0.9)
        elif device == "enteric_tube":
            stomach_x = 0.45 * W
            xs = [0.02, 0.03, 0.04, 0.06, 0.15, stomach_x, stomach_x - 0.05]
            ys = [-1.1, -0.5, 0.0, dome_l + 0.06, dome_l + 0.12, dome_l + 0.18, dome_l + 0.24]
            chest.polyline(draw, xs, ys, 0.012, 0.8)
        elif device in ("cvc_rij", "cvc_lsc"):
            tip_y = heart_top + rng.uniform(-0.05, 0.06)
            if device == "cvc_rij":  # right internal jugular
                xs, ys = [-0.24, -0.15, -0.09, -0.065, -0.06], [-1.1, -0.8, -0.55, -0.35, tip_y]
            else:  # left subclavian
                xs = [0.75, 0.45, 0.2, 0.05, -0.05, -0.06]
                ys = [apex - 0.02, apex + 0.07, apex + 0.15, -0.45, -0.3, tip_y]
            chest.polyline(draw, xs, ys, 0.012, 0.85)
        elif device == "picc":
            tip_y = heart_top + rng.uniform(-0.04, 0.06)
            xs = [-1.2, -0.8, -0.45, -0.18, -0.075, -0.065]
            ys = [apex + 0.02, apex + 0.0, apex + 0.07, apex + 0.15, -0.4, tip_y]
            chest.polyline(draw, xs, ys, 0.009, 0.75)
        elif device == "pacemaker":
            gx, gy = 0.52 * W, apex + 0.2
            chest.ellipse(draw, gx, gy, 0.085, 0.06, 1.6)
            chest.ellipse(draw, gx - 0.02, gy - 0.01, 0.045, 0.03, 2.2)
            ra_y = heart_top + 0.12
            lead1 = (
                [gx - 0.06, 0.25, 0.06, -0.05, -0.09, 0.0, 0.6 * chest.heart_ext[1]],
                [gy + 0.01, apex + 0.14, -0.5, heart_top, ra_y, dome_l - 0.1, dome_l - 0.02],
            )
            lead2 = (
                [gx - 0.06, 0.24, 0.05, -0.055, -0.1, -0.13, -0.09],
                [gy + 0.03, apex + 0.16, -0.48, heart_top, ra_y, ra_y - 0.06, ra_y - 0.1],
            )
            for xs, ys in (lead1, lead2):
                chest.polyline(draw, xs, ys, 0.012, 1.0)
        elif device == "chest_tube":
            f = truth.findings
            side_name = (
                (f.get("pneumothorax") or f.get("pleural_effusion")).side
                if ("pneumothorax" in f or "pleural_effusion" in f)
                else "right"
            )
            side = -1 if side_name in ("right", "bilateral") else 1
            cp = chest.cp[0 if side < 0 else 1]
            xs = [side * (W + 0.3), side * (W - 0.02), side * 0.7 * W, side * 0.45 * W, side * 0.33 * W]
            ys = [cp - 0.05, cp - 0.15, cp - 0.4, apex + 0.35, apex + 0.12]
            chest.polyline(draw, [x - 0.012 for x in xs], ys, 0.007, 0.45)
            chest.polyline(draw, [x + 0.012 for x in xs], ys, 0.007, 0.45)
            chest.polyline(draw, xs, ys, 0.01, 1.0)
        else:
            raise ValueError(f"Unknown device {device!r}")
    dens += 0.42 * chest.blur(img, 0.003)
