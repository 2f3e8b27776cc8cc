"""What is true in the phantom world: patients, studies and their findings, before anything is drawn or written.

The generating truth of every study is a :class:`StudyTruth`: the patient's body, the view, and for each
finding that is present a :class:`Finding` with severity, laterality, zone and kind. The image renderer
draws exactly this truth and the report writer describes it, so the labels (which come from the truth)
agree with the picture.

Prevalence and co-occurrence come from the CheXpert training labels (frontal images, as summarised in
``shared/label_stats``; the numbers are copied below so the installed package needs nothing else). The
joint distribution is a Gaussian copula: each finding is present when a latent normal variable passes a
threshold, and the latent correlations are fitted so that pairs of findings co-occur as they do in
CheXpert. The marginals are then **rebalanced** towards a learnable world: rare findings (pleural other,
fracture, lung lesion, pneumonia) are made several times more common than in CheXpert's inpatient
population, and very common ones (effusion, support devices, opacity) less so, so that a few hundred
images hold positives of every label and about a quarter of studies are normal. The co-occurrence
*structure* (effusion with atelectasis and edema, cardiomegaly with edema, pneumonia with opacity,
devices everywhere) is kept through the fitted correlations.

Several studies per patient share the patient's body and a persistent part of the latent findings
(chronic findings such as cardiomegaly, a nodule or an old fracture persist; acute ones come and go).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtr, ndtri

from diffcxr_aug.data.phantom.anatomy import Body, sample_body

# The findings the world draws. ``opacity`` is a stand-alone ill-defined lung opacity; the CheXpert label
# "Lung Opacity" is true when it, consolidation or pneumonia is present.
FINDINGS: tuple[str, ...] = (
    "enlarged_cardiomediastinum",
    "cardiomegaly",
    "opacity",
    "lung_lesion",
    "edema",
    "consolidation",
    "pneumonia",
    "atelectasis",
    "pneumothorax",
    "pleural_effusion",
    "pleural_other",
    "fracture",
    "support_devices",
)

# Finding -> the CheXpert label whose real statistics it borrows.
FINDING_TO_LABEL: dict[str, str] = {
    "enlarged_cardiomediastinum": "Enlarged Cardiomediastinum",
    "cardiomegaly": "Cardiomegaly",
    "opacity": "Lung Opacity",
    "lung_lesion": "Lung Lesion",
    "edema": "Edema",
    "consolidation": "Consolidation",
    "pneumonia": "Pneumonia",
    "atelectasis": "Atelectasis",
    "pneumothorax": "Pneumothorax",
    "pleural_effusion": "Pleural Effusion",
    "pleural_other": "Pleural Other",
    "fracture": "Fracture",
    "support_devices": "Support Devices",
}

# The findings that make the CheXpert label "Lung Opacity" true.
LUNG_OPACITY_FINDINGS = frozenset({"opacity", "consolidation", "pneumonia"})


def findings_in(description: str) -> set[str]:
    """The finding names in a ``meta_findings`` text (:meth:`StudyTruth.describe`); empty for a normal study.

    Raises:
        ValueError: a name that is not one of :data:`FINDINGS`.
    """
    names = {part.split(":", 1)[0] for part in str(description).split(";") if part.strip()}
    unknown = sorted(names - set(FINDINGS))
    if unknown:
        raise ValueError(f"unknown finding(s) {unknown} in {description!r}; known: {', '.join(FINDINGS)}")
    return names


def truth_labels(present: set[str]) -> dict[str, int]:
    """Every CheXpert label's truth (1 present, 0 absent) for a study with the findings ``present``.

    Unlike a report's labels, nothing is unknown or uncertain: the world knows each finding. "Lung Opacity" is
    true with any of :data:`LUNG_OPACITY_FINDINGS`, "No Finding" when no pathology is present (devices allowed),
    as the report writer decides them.
    """
    labels = {FINDING_TO_LABEL[name]: int(name in present) for name in FINDINGS}
    labels["Lung Opacity"] = int(bool(LUNG_OPACITY_FINDINGS & present))
    labels["No Finding"] = int(not (present - {"support_devices"}))
    return labels


# CheXpert frontal training images: share labelled positive (shared/label_stats/prevalence.csv).
CHEXPERT_POSITIVE: dict[str, float] = {
    "No Finding": 0.0889,
    "Enlarged Cardiomediastinum": 0.0481,
    "Cardiomegaly": 0.1224,
    "Lung Opacity": 0.4932,
    "Lung Lesion": 0.0369,
    "Edema": 0.26,
    "Consolidation": 0.068,
    "Pneumonia": 0.0245,
    "Atelectasis": 0.1556,
    "Pneumothorax": 0.0926,
    "Pleural Effusion": 0.4026,
    "Pleural Other": 0.0131,
    "Fracture": 0.0389,
    "Support Devices": 0.561,
}

# P(column positive | row positive) among CheXpert frontal images (shared/label_stats/cooccurrence.csv),
# rows and columns in FINDINGS order (No Finding left out: here it is derived, not sampled).
CHEXPERT_COOCCURRENCE = np.array(
    [
        [1.0, 0.172, 0.492, 0.041, 0.22, 0.056, 0.013, 0.142, 0.076, 0.376, 0.015, 0.061, 0.555],
        [0.068, 1.0, 0.5, 0.02, 0.462, 0.053, 0.017, 0.145, 0.03, 0.449, 0.01, 0.027, 0.608],
        [0.048, 0.124, 1.0, 0.044, 0.279, 0.052, 0.034, 0.134, 0.089, 0.507, 0.015, 0.033, 0.618],
        [0.054, 0.065, 0.586, 1.0, 0.11, 0.084, 0.045, 0.119, 0.11, 0.361, 0.03, 0.035, 0.388],
        [0.041, 0.217, 0.529, 0.016, 1.0, 0.061, 0.022, 0.173, 0.029, 0.509, 0.005, 0.019, 0.658],
        [0.039, 0.096, 0.377, 0.046, 0.234, 1.0, 0.061, 0.138, 0.053, 0.511, 0.017, 0.026, 0.565],
        [0.027, 0.083, 0.688, 0.067, 0.233, 0.169, 1.0, 0.107, 0.027, 0.299, 0.018, 0.023, 0.339],
        [0.044, 0.114, 0.425, 0.028, 0.288, 0.06, 0.017, 1.0, 0.096, 0.491, 0.01, 0.036, 0.636],
        [0.04, 0.04, 0.476, 0.044, 0.081, 0.039, 0.007, 0.161, 1.0, 0.337, 0.011, 0.055, 0.619],
        [0.045, 0.137, 0.621, 0.033, 0.329, 0.086, 0.018, 0.19, 0.078, 1.0, 0.009, 0.028, 0.649],
        [0.055, 0.09, 0.551, 0.085, 0.107, 0.089, 0.034, 0.113, 0.08, 0.277, 1.0, 0.085, 0.428],
        [0.075, 0.086, 0.418, 0.033, 0.125, 0.045, 0.015, 0.145, 0.13, 0.287, 0.029, 1.0, 0.434],
        [0.048, 0.133, 0.543, 0.026, 0.305, 0.068, 0.015, 0.176, 0.102, 0.466, 0.01, 0.03, 1.0],
    ]
)

# Share of studies in which each finding is present in the phantom world (rebalanced, see module doc).
PHANTOM_PREVALENCE: dict[str, float] = {
    "enlarged_cardiomediastinum": 0.08,
    "cardiomegaly": 0.17,
    "opacity": 0.13,
    "lung_lesion": 0.08,
    "edema": 0.13,
    "consolidation": 0.09,
    "pneumonia": 0.08,
    "atelectasis": 0.14,
    "pneumothorax": 0.08,
    "pleural_effusion": 0.19,
    "pleural_other": 0.07,
    "fracture": 0.07,
    "support_devices": 0.28,
}

# How much of a finding's latent variable a patient keeps from one study to the next (0 = independent
# studies, 1 = identical): chronic findings persist, acute ones come and go.
PERSISTENCE: dict[str, float] = {
    "enlarged_cardiomediastinum": 0.85,
    "cardiomegaly": 0.92,
    "opacity": 0.5,
    "lung_lesion": 0.97,
    "edema": 0.6,
    "consolidation": 0.5,
    "pneumonia": 0.5,
    "atelectasis": 0.5,
    "pneumothorax": 0.5,
    "pleural_effusion": 0.7,
    "pleural_other": 0.97,
    "fracture": 0.9,
    "support_devices": 0.75,
}

# Studies per patient: 1 to 5, most patients with one or two (as in MIMIC-CXR, with a shorter tail).
STUDIES_PER_PATIENT_P = np.array([0.45, 0.25, 0.15, 0.1, 0.05])

NOISE_KINDS: tuple[str, ...] = (
    "lateral",
    "inverted",
    "rotated",
    "cropped",
    "collimated",
    "overexposed",
    "underexposed",
    "burnt_text",
    "not_cxr",
)
# Relative frequency of each kind among noisy images; laterals are the commonest stray view in frontal sets.
NOISE_WEIGHTS = np.array([0.2, 0.09, 0.1, 0.1, 0.1, 0.09, 0.09, 0.12, 0.11])

DEVICES: tuple[str, ...] = ("ett", "enteric_tube", "cvc_rij", "cvc_lsc", "picc", "pacemaker", "chest_tube")

# Rib fractures milder than this are drawn (and reported) as healing, with callus around the break.
HEALING_BELOW = 0.45

THORAX_CM = 30.0  # the inner width of the thorax in cm, to turn drawing units into the sizes reports quote

Side = str  # "right" | "left" | "bilateral" (patient's side: patient right is image left)


@dataclass
class Finding:
    """One present finding.

    Attributes:
        name: one of :data:`FINDINGS`.
        severity: in (0, 1]; 0.2 is subtle, 1 florid.
        side: ``right``, ``left`` or ``bilateral`` (patient's side) where laterality applies, else None.
        zone: ``upper``, ``middle`` or ``lower`` lung zone where location applies, else None.
        kind: sub-type where one applies (``nodule``/``mass``, ``plate``/``lobar``, ``rib``/``clavicle``,
            ``lateral``/``apical``, ``lobar``/``patchy``).
        loc: a position inside the lung as fractions (across from the mediastinum, down from the apex).
        items: devices present (support devices) or fractured ribs (fracture).
    """

    name: str
    severity: float
    side: Side | None = None
    zone: str | None = None
    kind: str | None = None
    loc: tuple[float, float] | None = None
    items: tuple = ()
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        """Compact, parseable text for the manifest's ``meta_findings`` column."""
        parts = [self.name, f"{self.severity:.2f}"]
        for value in (self.side, self.zone, self.kind):
            if value:
                parts.append(value)
        if self.items:
            parts.append("+".join(str(i) for i in self.items))
        return ":".join(parts)


def lesion_radius(finding: Finding) -> float:
    """Radius of a lung lesion in drawing units: nodules up to about 2.5 cm across, masses 3 to 6 cm."""
    if finding.kind == "mass":
        return 0.07 + 0.07 * finding.severity
    return 0.032 + 0.022 * finding.severity


@dataclass
class StudyTruth:
    """Everything true about one image of the phantom world."""

    index: int
    patient_id: str
    study_id: str
    study_index: int
    age: int
    sex: str
    view: str
    body: Body
    findings: dict[str, Finding] = field(default_factory=dict)
    noise: str = ""
    prior: StudyTruth | None = None

    def has(self, name: str) -> bool:
        return name in self.findings

    @property
    def lung_opacity(self) -> bool:
        """The CheXpert 'Lung Opacity' truth: any parenchymal opacity the report calls an opacity."""
        return bool(LUNG_OPACITY_FINDINGS & set(self.findings))

    @property
    def no_finding(self) -> bool:
        """No pathology (support devices allowed), as CheXpert defines 'No Finding'."""
        return not any(n != "support_devices" for n in self.findings)

    def describe(self) -> str:
        return ";".join(f.describe() for f in self.findings.values())


def _bivariate_upper(t_i: float, t_j: float, rhos: np.ndarray) -> np.ndarray:
    """P(z_i > t_i, z_j > t_j) for standard normals with correlation ``rho``, for many rhos at once."""
    x = np.linspace(t_i, 8.0, 1200)
    dens = np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi)
    s = np.sqrt(1.0 - rhos[:, None] ** 2)
    cond = ndtr((rhos[:, None] * x[None, :] - t_j) / s)
    return np.trapezoid(dens[None, :] * cond, x, axis=1)


@functools.lru_cache(maxsize=1)
def latent_correlation() -> np.ndarray:
    """The copula's correlation matrix, fitted to CheXpert pairwise co-occurrence (tetrachoric correlations).

    For each pair, the correlation is the one under which a bivariate normal thresholded at CheXpert's
    positive rates gives CheXpert's joint positive rate. The matrix is then projected to the nearest
    positive-definite one.
    """
    p = np.array([CHEXPERT_POSITIVE[FINDING_TO_LABEL[f]] for f in FINDINGS])
    t = ndtri(1.0 - p)
    k = len(FINDINGS)
    rhos = np.linspace(-0.95, 0.95, 381)
    corr = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            # Average the two conditional directions, which differ a little by rounding in the source table.
            joint = 0.5 * (CHEXPERT_COOCCURRENCE[i, j] * p[i] + CHEXPERT_COOCCURRENCE[j, i] * p[j])
            curve = _bivariate_upper(t[i], t[j], rhos)  # increasing in rho
            corr[i, j] = corr[j, i] = float(np.interp(joint, curve, rhos))
    values, vectors = np.linalg.eigh(corr)
    corr = vectors @ np.diag(np.clip(values, 0.05, None)) @ vectors.T
    d = np.sqrt(np.diag(corr))
    return corr / d[:, None] / d[None, :]


def _choice(rng: np.random.Generator, options: tuple, weights: tuple) -> str:
    w = np.asarray(weights, dtype=float)
    return options[int(rng.choice(len(options), p=w / w.sum()))]


@dataclass
class _PatientTraits:
    """What a patient keeps across studies: body, demographics, and where each finding would sit."""

    age: int
    sex: str
    body: Body
    latent: np.ndarray
    layout: dict[str, dict]


def _sample_patient(rng: np.random.Generator, chol: np.ndarray) -> _PatientTraits:
    sex = "M" if rng.random() < 0.594 else "F"
    age = int(np.clip(rng.normal(60.4, 16.5), 18, 95))
    body = sample_body(rng, sex=sex, age=age)
    latent = chol @ rng.standard_normal(len(FINDINGS))
    side2 = ("right", "left")
    layout = {
        "pleural_effusion": {"side": _choice(rng, ("right", "left", "bilateral"), (0.4, 0.28, 0.32))},
        "pneumothorax": {"side": _choice(rng, side2, (0.55, 0.45))},
        "consolidation": {
            "side": _choice(rng, ("right", "left", "bilateral"), (0.55, 0.37, 0.08)),
            "zone": _choice(rng, ("lower", "middle", "upper"), (0.55, 0.2, 0.25)),
        },
        "pneumonia": {
            "side": _choice(rng, ("right", "left", "bilateral"), (0.45, 0.3, 0.25)),
            "zone": _choice(rng, ("lower", "middle", "upper"), (0.6, 0.2, 0.2)),
        },
        "opacity": {
            "side": _choice(rng, ("right", "left", "bilateral"), (0.4, 0.35, 0.25)),
            "zone": _choice(rng, ("lower", "middle", "upper"), (0.5, 0.3, 0.2)),
        },
        "atelectasis": {"side": _choice(rng, ("right", "left", "bilateral"), (0.3, 0.4, 0.3))},
        "lung_lesion": {
            "side": _choice(rng, side2, (0.55, 0.45)),
            "zone": _choice(rng, ("upper", "middle", "lower"), (0.45, 0.3, 0.25)),
            "kind": _choice(rng, ("nodule", "mass"), (0.55, 0.45)),
            "loc": (float(rng.uniform(0.3, 0.8)), float(rng.uniform(0.0, 1.0))),
        },
        "pleural_other": {
            "side": _choice(rng, ("right", "left", "bilateral"), (0.4, 0.4, 0.2)),
            "kind": _choice(rng, ("lateral", "apical"), (0.6, 0.4)),
        },
        "fracture": {
            "side": _choice(rng, side2, (0.5, 0.5)),
            "kind": _choice(rng, ("rib", "clavicle"), (0.72, 0.28)),
            "first_rib": int(rng.integers(4, 8)),
            "count": int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2])),
        },
        "support_devices": {
            "pacemaker": bool(rng.random() < 0.3),
            "picc": bool(rng.random() < 0.25),
        },
    }
    return _PatientTraits(age=age, sex=sex, body=body, latent=latent, layout=layout)


def _devices(rng: np.random.Generator, traits: _PatientTraits, findings: dict[str, Finding], view: str) -> tuple:
    layout = traits.layout["support_devices"]
    devices: list[str] = []
    if layout["pacemaker"]:
        devices.append("pacemaker")
    icu = view == "AP" and rng.random() < 0.7
    if icu and rng.random() < 0.6:
        devices.append("ett")
        if rng.random() < 0.8:
            devices.append("enteric_tube")
    if layout["picc"]:
        devices.append("picc")
    elif icu or rng.random() < 0.3:
        devices.append("cvc_rij" if rng.random() < 0.65 else "cvc_lsc")
    if ("pneumothorax" in findings or "pleural_effusion" in findings) and rng.random() < 0.35:
        devices.append("chest_tube")
    if not devices:
        devices.append(_choice(rng, ("cvc_rij", "pacemaker", "enteric_tube"), (0.5, 0.3, 0.2)))
    return tuple(d for d in DEVICES if d in devices)


def _study_findings(
    rng: np.random.Generator, traits: _PatientTraits, latent: np.ndarray, view: str
) -> dict[str, Finding]:
    findings: dict[str, Finding] = {}
    for k, name in enumerate(FINDINGS):
        p = PHANTOM_PREVALENCE[name]
        u = float(ndtr(latent[k]))
        if u <= 1.0 - p:
            continue
        # Severity grows with how far the latent passes the threshold, so it drifts smoothly between a
        # patient's studies; mapped to [0.2, 1] so that even mild findings stay visible at 64 px.
        severity = round(0.2 + 0.8 * (u - (1.0 - p)) / p, 3)
        layout = traits.layout.get(name, {})
        finding = Finding(name=name, severity=severity, side=layout.get("side"), zone=layout.get("zone"))
        if name == "lung_lesion":
            finding.kind, finding.loc = layout["kind"], layout["loc"]
        elif name == "atelectasis":
            finding.kind = "lobar" if severity > 0.62 else "plate"
            if finding.kind == "lobar" and finding.side == "bilateral":
                finding.side = "left"
        elif name in ("consolidation", "pneumonia"):
            finding.kind = "lobar" if name == "consolidation" else "patchy"
        elif name == "pleural_other":
            finding.kind = layout["kind"]
        elif name == "fracture":
            finding.kind = layout["kind"]
            if finding.kind == "rib":
                finding.items = tuple(range(layout["first_rib"], layout["first_rib"] + layout["count"]))
        findings[name] = finding
    if "support_devices" in findings:
        findings["support_devices"].items = _devices(rng, traits, findings, view)
        findings["support_devices"].extra["ett_cm"] = round(float(rng.uniform(2.5, 6.0)), 1)
    if "edema" in findings:
        findings["edema"].side = "bilateral"
    return findings


def sample_world(n: int, seed: int = 0, noise_rate: float = 0.05) -> list[StudyTruth]:
    """Draw the truth of ``n`` images: patients with one or more studies, one frontal image per study.

    Every random draw comes from a generator seeded by ``(seed, patient)`` or ``(seed, image)``, so the
    first images of a large world are the images of a small one with the same seed.
    """
    corr = latent_correlation()
    chol = np.linalg.cholesky(corr)
    keep = np.sqrt(np.array([PERSISTENCE[f] for f in FINDINGS]))
    studies: list[StudyTruth] = []
    patient = 0
    while len(studies) < n:
        rng_p = np.random.default_rng([seed, 1, patient])
        n_studies = int(rng_p.choice(len(STUDIES_PER_PATIENT_P), p=STUDIES_PER_PATIENT_P)) + 1
        traits = _sample_patient(rng_p, chol)
        patient_id = f"phantom-s{seed}-p{patient:05d}"
        prior = None
        for j in range(n_studies):
            if len(studies) >= n:
                break
            index = len(studies)
            rng = np.random.default_rng([seed, 2, index])
            latent = keep * traits.latent + np.sqrt(1.0 - keep**2) * (chol @ rng.standard_normal(len(FINDINGS)))
            # Sicker patients are imaged portable (AP) more often.
            sick = float(np.mean(ndtr(latent) > 1.0 - np.array([PHANTOM_PREVALENCE[f] for f in FINDINGS])))
            view = "AP" if rng.random() < 0.3 + 1.5 * sick else "PA"
            findings = _study_findings(rng, traits, latent, view)
            if "support_devices" in findings and any(d in findings["support_devices"].items for d in ("ett",)):
                view = "AP"
            noise = ""
            if rng.random() < noise_rate:
                noise = NOISE_KINDS[int(rng.choice(len(NOISE_KINDS), p=NOISE_WEIGHTS / NOISE_WEIGHTS.sum()))]
            truth = StudyTruth(
                index=index,
                patient_id=patient_id,
                study_id=f"{patient_id}-st{j}",
                study_index=j,
                age=min(traits.age + j, 99),
                sex=traits.sex,
                view="LATERAL" if noise == "lateral" else view,
                body=traits.body,
                findings=findings,
                noise=noise,
                prior=prior,
            )
            studies.append(truth)
            prior = truth
        patient += 1
    return studies
