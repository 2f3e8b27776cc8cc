"""Radiology reports for phantom studies, and the CheXpert-style labels they carry.

A report is planned before it is written: for each of the 14 CheXpert observations the planner decides,
from the generating truth, whether the report states it (``1``), hedges it (``-1``), denies it (``0``)
or leaves it out (empty). Present findings are always mentioned, positively or hedged (mild findings
are hedged more often, pneumonia and atelectasis most of all, as in real reports); absent ones are
denied now and then ("no pneumothorax") and, where an opacity is present, a differential is sometimes
left open ("cannot exclude pneumonia"). The writer then phrases exactly that plan, so the labels are
the generating truth as a CheXpert-labelled dataset would record it.

Phrasing follows the CheXpert labeler's mention lists (``shared/chexpert_phrases``) so that a
rule-based labeler recognises it: findings are named with words from those lists ("pleural effusion",
"consolidation", "cardiomegaly", "endotracheal tube"); hedges use the labeler's uncertainty cues
("may represent", "possible", "cannot exclude", "borderline", "pulmonary vascular congestion");
negations use its negation cues ("no", "without", "normal"). Indications and comparisons use symptoms
and dates only, never a finding's name, so that a labeler reading the whole text is not misled.

Reports come in styles from a single impression line to long MIMIC-like reports with INDICATION,
TECHNIQUE, COMPARISON, FINDINGS and IMPRESSION sections, de-identification markers (``___``) and
text irrelevant to the labels (notification of the referring physician, signatures, old granulomas).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.phantom.findings import (
    HEALING_BELOW,
    LUNG_OPACITY_FINDINGS,
    THORAX_CM,
    Finding,
    StudyTruth,
    lesion_radius,
)

# Label name -> the finding whose presence makes it true (Lung Opacity is derived, No Finding too).
LABEL_FINDING: dict[str, str] = {
    "Enlarged Cardiomediastinum": "enlarged_cardiomediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Lesion": "lung_lesion",
    "Edema": "edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax",
    "Pleural Effusion": "pleural_effusion",
    "Pleural Other": "pleural_other",
    "Fracture": "fracture",
    "Support Devices": "support_devices",
}

# Chance that a present finding is hedged rather than stated (scaled up for mild findings).
HEDGE_P: dict[str, float] = {
    "Enlarged Cardiomediastinum": 0.2,
    "Cardiomegaly": 0.12,
    "Lung Opacity": 0.1,
    "Lung Lesion": 0.15,
    "Edema": 0.25,
    "Consolidation": 0.25,
    "Pneumonia": 0.5,
    "Atelectasis": 0.35,
    "Pneumothorax": 0.08,
    "Pleural Effusion": 0.12,
    "Pleural Other": 0.2,
    "Fracture": 0.15,
    "Support Devices": 0.0,
}

# Chance that an absent finding is explicitly denied, in a report of the "full" style (less in shorter ones).
NEGATE_P: dict[str, float] = {
    "Enlarged Cardiomediastinum": 0.45,
    "Cardiomegaly": 0.55,
    "Lung Opacity": 0.15,
    "Lung Lesion": 0.1,
    "Edema": 0.35,
    "Consolidation": 0.45,
    "Pneumonia": 0.2,
    "Atelectasis": 0.04,
    "Pneumothorax": 0.65,
    "Pleural Effusion": 0.65,
    "Pleural Other": 0.03,
    "Fracture": 0.12,
    "Support Devices": 0.02,
}

STYLES = ("line", "impression", "findings", "full")
STYLE_P = (0.1, 0.15, 0.35, 0.4)
NEGATION_SCALE = {"line": 0.0, "impression": 0.25, "findings": 0.8, "full": 1.0}


@dataclass
class Report:
    text: str
    labels: dict[str, float]  # CheXpert label -> 1, 0, -1 or NaN


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


def _size(sev: float, words=("small", "moderate", "large")) -> str:
    return words[0] if sev < 0.45 else (words[1] if sev < 0.75 else words[2])


def _degree(sev: float) -> str:
    return "mild" if sev < 0.45 else ("moderate" if sev < 0.75 else "severe")


def _side(side: str | None, bilateral: str = "bilateral") -> str:
    return bilateral if side == "bilateral" else (side or "")


def _location(f: Finding, rng: np.random.Generator) -> str:
    side = f.side or "right"
    zone = f.zone or "lower"
    if side == "bilateral":
        return _pick(
            rng,
            {
                "lower": ("lung bases bilaterally", "bibasilar regions", "lower lungs bilaterally"),
                "middle": ("mid lungs bilaterally", "perihilar regions bilaterally"),
                "upper": ("upper lobes bilaterally", "upper lungs bilaterally"),
            }[zone],
        )
    lobes = {
        ("right", "upper"): "right upper lobe",
        ("right", "middle"): "right middle lobe",
        ("right", "lower"): "right lower lobe",
        ("left", "upper"): "left upper lobe",
        ("left", "middle"): "lingula",
        ("left", "lower"): "left lower lobe",
    }
    zones = {"upper": "upper lung", "middle": "mid lung", "lower": "lung base"}
    if rng.random() < 0.6:
        return lobes[(side, zone)]
    return f"{side} {zones[zone]}"


def _ordinal(k: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(k, f"{k}th")


def plan_labels(truth: StudyTruth, style: str, rng: np.random.Generator) -> dict[str, float]:
    """Decide the status of every CheXpert label for this study's report (1, -1, 0 or NaN)."""
    status: dict[str, float] = {}
    neg_scale = NEGATION_SCALE[style]
    for label in CHEXPERT_LABELS[1:]:
        if label == "Lung Opacity":
            present = truth.lung_opacity
            sev = max(
                (truth.findings[n].severity for n in LUNG_OPACITY_FINDINGS if n in truth.findings),
                default=0.0,
            )
        else:
            present = truth.has(LABEL_FINDING[label])
            sev = truth.findings[LABEL_FINDING[label]].severity if present else 0.0
        if present:
            hedge = HEDGE_P[label] * (1.6 - sev)
            status[label] = -1.0 if rng.random() < hedge else 1.0
        elif rng.random() < NEGATE_P[label] * neg_scale:
            status[label] = 0.0
        else:
            status[label] = np.nan
    # An opacity called an opacity: consolidation and pneumonia are described as opacities, so when they are
    # stated Lung Opacity is stated too.
    if status["Consolidation"] == 1.0 or status["Pneumonia"] == 1.0:
        status["Lung Opacity"] = 1.0
    # Differentials left open around an opacity, as real reports do ("cannot exclude pneumonia").
    if truth.lung_opacity or truth.has("atelectasis"):
        if not truth.has("pneumonia") and rng.random() < 0.25:
            status["Pneumonia"] = -1.0
        if not truth.has("atelectasis") and truth.lung_opacity and rng.random() < 0.15:
            status["Atelectasis"] = -1.0
    status["No Finding"] = 1.0 if truth.no_finding else np.nan
    return status


class _Writer:
    """Phrases one planned report; every sentence it writes matches the plan's status for its labels."""

    def __init__(self, truth: StudyTruth, status: dict[str, float], rng: np.random.Generator) -> None:
        self.t, self.s, self.rng = truth, status, rng
        self.f = truth.findings
        self.prior = truth.prior.findings if truth.prior is not None else None

    def pick(self, options) -> str:
        return _pick(self.rng, options)

    def change(self, name: str) -> str:
        """A comparison word for a finding also present on the prior study, or ''."""
        if self.prior is None or name not in self.prior or self.rng.random() < 0.4:
            return ""
        delta = self.f[name].severity - self.prior[name].severity
        if delta > 0.12:
            return self.pick(("increased", "worsening", "interval increase in the"))
        if delta < -0.12:
            return self.pick(("decreased", "improving", "interval decrease in the"))
        return "unchanged" if name not in ("cardiomegaly", "enlarged_cardiomediastinum") else ""

    def new(self, name: str) -> str:
        if self.prior is not None and name not in self.prior and self.rng.random() < 0.5:
            return "new "
        return ""

    # -- positive and hedged statements, one per label group ---------------------------------------
    def devices(self) -> list[str]:
        if self.s["Support Devices"] != 1.0:
            return []
        out = []
        items = self.f["support_devices"].items
        for device in items:
            if device == "ett":
                cm = self.f["support_devices"].extra["ett_cm"]
                out.append(
                    self.pick(
                        (
                            "Endotracheal tube terminates approximately {cm:.1f} cm above the carina.",
                            "The endotracheal tube is in standard position, {cm:.0f} cm above the carina.",
                            "ET tube tip is {cm:.1f} cm above the carina.",
                        )
                    ).format(cm=cm)
                )
            elif device == "enteric_tube":
                out.append(
                    self.pick(
                        (
                            "Enteric tube courses below the diaphragm with the tip in the stomach.",
                            "A nasogastric tube terminates in the stomach.",
                            "The NG tube extends into the stomach.",
                        )
                    )
                )
            elif device == "cvc_rij":
                out.append(
                    self.pick(
                        (
                            "Right internal jugular central venous catheter terminates in the mid SVC.",
                            "Right IJ line with tip at the cavoatrial junction.",
                            "A right internal jugular catheter is in place, tip in the SVC.",
                        )
                    )
                )
            elif device == "cvc_lsc":
                out.append(
                    self.pick(
                        (
                            "Left subclavian central venous catheter terminates in the SVC.",
                            "Left subclavian line tip projects over the SVC.",
                        )
                    )
                )
            elif device == "picc":
                out.append(
                    self.pick(
                        (
                            "Right PICC line terminates in the lower SVC.",
                            "A right-sided PICC terminates at the cavoatrial junction.",
                        )
                    )
                )
            elif device == "pacemaker":
                out.append(
                    self.pick(
                        (
                            "Left-sided pacemaker with leads terminating in the right atrium and right ventricle.",
                            "A left chest wall pacemaker is present with leads in standard position.",
                            "Dual-chamber pacer device overlies the left chest.",
                        )
                    )
                )
            elif device == "chest_tube":
                side = self._chest_tube_side()
                out.append(
                    self.pick(
                        (
                            f"A {side} chest tube is in place with the tip at the apex.",
                            f"{_cap(side)}-sided pleural drain in place.",
                        )
                    )
                )
        prior = self.prior.get("support_devices") if self.prior is not None else None
        if prior is not None and prior.items == self.f["support_devices"].items and self.rng.random() < 0.3:
            out = [_cap(self.pick(("unchanged position of the", "stable position of the"))) + " support devices."]
        return out

    def _chest_tube_side(self) -> str:
        for name in ("pneumothorax", "pleural_effusion"):
            if name in self.f and self.f[name].side in ("left", "right"):
                return self.f[name].side
        return "right"

    def heart(self) -> list[str]:
        out = []
        cm, ecm = self.s["Cardiomegaly"], self.s["Enlarged Cardiomediastinum"]
        if cm == 1.0:
            deg = _degree(self.f["cardiomegaly"].severity)
            word = self.change("cardiomegaly")
            out.append(
                self.pick(
                    (
                        f"There is {deg} cardiomegaly.",
                        f"The heart is {deg}ly enlarged." if deg != "severe" else "The heart is markedly enlarged.",
                        f"{_cap(deg)} enlargement of the cardiac silhouette.",
                        f"{_cap(word + ' ' if word else '')}{deg} cardiomegaly.",
                    )
                )
            )
        elif cm == -1.0:
            out.append(
                self.pick(
                    (
                        "Borderline heart size.",
                        "The heart size may be mildly enlarged.",
                        "Possible mild cardiomegaly, accentuated by technique.",
                    )
                )
            )
        if ecm == 1.0:
            out.append(
                self.pick(
                    (
                        "The mediastinum is widened.",
                        "There is widening of the superior mediastinum.",
                        "The mediastinal contours are widened.",
                        "Widened mediastinum.",
                    )
                )
            )
        elif ecm == -1.0:
            out.append(
                self.pick(
                    (
                        "Apparent widening of the mediastinum may be due to AP technique.",
                        "The mediastinal contour is possibly widened.",
                    )
                )
            )
        return out

    def lungs(self) -> list[str]:
        # In this order: each group draws from the report's random stream.
        return self._airspace() + self._edema() + self._atelectasis() + self._lung_lesion()

    def _airspace(self) -> list[str]:
        """Consolidation, pneumonia and lung opacity, which share their sentences."""
        out = []
        s, f = self.s, self.f
        cons, pna, lo = s["Consolidation"], s["Pneumonia"], s["Lung Opacity"]
        said_pneumonia = False
        if "consolidation" in f:
            loc = _location(f["consolidation"], self.rng)
            new = self.new("consolidation")
            if cons == 1.0:
                if pna == 1.0 and "pneumonia" in f:
                    out.append(
                        self.pick(
                            (
                                f"{_cap(new)}consolidative opacity in the {loc}, consistent with pneumonia.",
                                f"Dense consolidation and opacification of the {loc} compatible with pneumonia.",
                            )
                        )
                    )
                    said_pneumonia = True
                else:
                    out.append(
                        self.pick(
                            (
                                f"There is {new}consolidation in the {loc} with air bronchograms, a dense opacity.",
                                f"{_cap(new)}focal consolidative opacity in the {loc}.",
                                f"Opacification of the {loc} with consolidation.",
                            )
                        )
                    )
            else:
                out.append(
                    self.pick(
                        (
                            f"Opacity in the {loc} may represent consolidation.",
                            f"{_cap(new)}opacity in the {loc}, possibly consolidation.",
                        )
                    )
                )
        if "pneumonia" in f and not said_pneumonia:
            loc = _location(f["pneumonia"], self.rng)
            patchy = self.pick(("patchy opacities", "patchy airspace opacities", "multifocal patchy opacities"))
            if pna == 1.0:
                out.append(
                    self.pick(
                        (
                            f"{_cap(patchy)} in the {loc}, consistent with pneumonia.",
                            f"{_cap(self.new('pneumonia'))}{patchy} in the {loc}, compatible with pneumonia.",
                        )
                    )
                )
            else:
                out.append(
                    self.pick(
                        (
                            f"{_cap(patchy)} in the {loc}, concerning for pneumonia.",
                            f"{_cap(patchy)} in the {loc} may represent pneumonia.",
                            f"{_cap(patchy)} in the {loc}; infection cannot be excluded.",
                        )
                    )
                )
        if "opacity" in f:
            loc = _location(f["opacity"], self.rng)
            hazy = self.pick(("hazy opacity", "ill-defined opacity", "patchy opacity", "increased opacity"))
            if lo == 1.0:
                out.append(
                    self.pick(
                        (
                            f"There is {self.new('opacity')}{hazy} in the {loc}.",
                            f"{_cap(hazy)} projects over the {loc}.",
                        )
                    )
                )
            else:
                out.append(
                    self.pick(
                        (
                            f"Possible subtle {hazy} in the {loc}.",
                            f"Questionable {hazy} in the {loc}.",
                        )
                    )
                )
        if pna == -1.0 and "pneumonia" not in f:
            out.append(
                self.pick(
                    (
                        "Infection cannot be excluded in the appropriate clinical setting.",
                        "Early pneumonia cannot be excluded.",
                        "Superimposed pneumonia is not excluded.",
                    )
                )
            )
        return out

    def _edema(self) -> list[str]:
        """Pulmonary edema."""
        out = []
        s, f = self.s, self.f
        if "edema" in f:
            sev = f["edema"].severity
            deg = _degree(sev)
            if s["Edema"] == 1.0:
                word = self.change("edema")
                kerley = " with Kerley B lines" if sev > 0.4 and self.rng.random() < 0.6 else ""
                out.append(
                    self.pick(
                        (
                            f"{_cap(word + ' ' if word else '')}{deg} pulmonary edema{kerley}.",
                            f"There is {deg} interstitial pulmonary edema{kerley}.",
                            f"Perihilar haziness consistent with {deg} pulmonary edema.",
                        )
                    )
                )
            else:
                out.append(
                    self.pick(
                        (
                            "Mild pulmonary vascular congestion.",
                            "Perihilar haziness may reflect mild pulmonary edema.",
                            "Possible mild interstitial edema.",
                        )
                    )
                )
        return out

    def _atelectasis(self) -> list[str]:
        """Atelectasis, lobar or plate-like."""
        out = []
        s, f = self.s, self.f
        if "atelectasis" in f:
            fa = f["atelectasis"]
            where = "bibasilar" if fa.side == "bilateral" else f"{fa.side} basilar"
            base = "lung bases" if fa.side == "bilateral" else f"{fa.side} base"
            lower = "lower lungs" if fa.side == "bilateral" else f"{fa.side} lower lung"
            if s["Atelectasis"] == 1.0:
                if fa.kind == "lobar":
                    out.append(
                        self.pick(
                            (
                                f"{_cap(fa.side)} lower lobe collapse with elevation of the {fa.side} hemidiaphragm.",
                                f"Volume loss in the {fa.side} lower lobe consistent with atelectasis.",
                                f"{_cap(fa.side)} lower lobe atelectasis with volume loss.",
                            )
                        )
                    )
                else:
                    out.append(
                        self.pick(
                            (
                                f"Plate-like atelectasis at the {base}.",
                                f"{_cap(where)} subsegmental atelectasis.",
                                f"Linear atelectasis in the {lower}.",
                            )
                        )
                    )
            else:
                out.append(
                    self.pick(
                        (
                            f"{_cap(where)} linear densities may represent atelectasis.",
                            f"Streaky {where} densities, likely atelectasis.",
                            f"{_cap(where)} atelectasis is possible.",
                        )
                    )
                )
        elif s["Atelectasis"] == -1.0:
            out.append(self.pick(("This may partly represent atelectasis.", "Atelectasis is also possible.")))
        return out

    def _lung_lesion(self) -> list[str]:
        """A nodule or a mass."""
        out = []
        s, f = self.s, self.f
        if "lung_lesion" in f:
            fl = f["lung_lesion"]
            loc = _location(fl, self.rng)
            cm = 2.0 * lesion_radius(fl) / (2.0 * (self.t.body.half_width + 0.03)) * THORAX_CM
            if s["Lung Lesion"] == 1.0:
                if fl.kind == "mass":
                    out.append(
                        self.pick(
                            (
                                f"A {cm:.1f} cm lobulated mass in the {loc}.",
                                f"There is a {cm:.0f} cm mass in the {loc}.",
                            )
                        )
                    )
                else:
                    out.append(
                        self.pick(
                            (
                                f"A {cm:.1f} cm nodule in the {loc}.",
                                f"Well-circumscribed {cm:.1f} cm pulmonary nodule in the {loc}.",
                            )
                        )
                    )
            else:
                out.append(
                    self.pick(
                        (
                            f"Possible nodule in the {loc}; recommend chest CT for further evaluation.",
                            f"A rounded nodular density in the {loc} may represent a nipple shadow versus a nodule.",
                        )
                    )
                )
        return out

    def pleura(self) -> list[str]:
        out = []
        s, f = self.s, self.f
        if "pleural_effusion" in f:
            fe = f["pleural_effusion"]
            size = _size(fe.severity)
            word = self.change("pleural_effusion")
            pre = (word + " " if word else "") + self.new("pleural_effusion")
            if s["Pleural Effusion"] == 1.0:
                if fe.side == "bilateral":
                    out.append(
                        self.pick(
                            (
                                f"{_cap(pre)}{size} bilateral pleural effusions.",
                                f"Bilateral {size} pleural effusions.",
                            )
                        )
                    )
                else:
                    out.append(
                        self.pick(
                            (
                                f"{_cap(pre)}{size} {fe.side} pleural effusion.",
                                f"There is a {pre}{size} {fe.side}-sided pleural effusion.",
                                f"{_cap(size)} {fe.side} pleural effusion with a meniscus laterally.",
                            )
                        )
                    )
            else:
                where = "both costophrenic angles" if fe.side == "bilateral" else f"the {fe.side} costophrenic angle"
                out.append(
                    self.pick(
                        (
                            f"Blunting of {where} may reflect a small effusion.",
                            f"Possible small {_side(fe.side)} pleural effusion.",
                        )
                    )
                )
        if "pneumothorax" in f:
            fp = f["pneumothorax"]
            size = _size(fp.severity)
            if s["Pneumothorax"] == 1.0:
                word = self.change("pneumothorax")
                out.append(
                    self.pick(
                        (
                            f"There is a {(word + ' ') if word else ''}{size} {fp.side} pneumothorax.",
                            f"{_cap(size)} {fp.side} apical pneumothorax with a visible pleural line.",
                            f"{_cap(self.new('pneumothorax'))}{size} {fp.side}-sided pneumothorax.",
                        )
                    )
                )
            else:
                out.append(
                    self.pick(
                        (
                            f"Possible tiny {fp.side} apical pneumothorax.",
                            f"Questionable small {fp.side} apical pneumothorax; consider repeat radiograph.",
                        )
                    )
                )
        if "pleural_other" in f:
            fo = f["pleural_other"]
            where = "apical" if fo.kind == "apical" else "lateral"
            wall = "apex" if fo.kind == "apical" else "lateral chest wall"
            side = "bilateral" if fo.side == "bilateral" else fo.side
            if s["Pleural Other"] == 1.0:
                out.append(
                    self.pick(
                        (
                            f"{_cap(side)} {where} pleural thickening.",
                            f"Smooth pleural thickening along the {side} {wall}.",
                            f"Chronic {side} {where} pleural thickening.",
                        )
                    )
                )
            else:
                out.append(f"Possible {side} {where} pleural thickening.")
        return out

    def bones(self) -> list[str]:
        if "fracture" not in self.f:
            return []
        fr = self.f["fracture"]
        if fr.kind == "clavicle":
            what = short = f"{fr.side} clavicle"
            plural = False
        else:
            ribs = [_ordinal(k) for k in fr.items]
            numbers = ribs[0] if len(ribs) == 1 else f"{', '.join(ribs[:-1])} and {ribs[-1]}"
            plural = len(ribs) > 1
            what = f"{fr.side} {numbers} rib{'s' if plural else ''}"
            short = f"{fr.side} {numbers} rib"
        if self.s["Fracture"] == 1.0:
            many = "s" if plural else ""
            if fr.kind == "rib" and fr.severity < HEALING_BELOW:
                return [
                    self.pick(
                        (
                            f"Healing fracture{many} of the {what} with callus formation.",
                            f"Subacute {short} fracture{many} with surrounding callus.",
                        )
                    )
                ]
            disp = "displaced" if fr.severity > 0.5 else "minimally displaced"
            return [
                self.pick(
                    (
                        f"{_cap(disp)} fracture{many} of the {what}.",
                        f"There {'are' if plural else 'is an'} acute fracture{many} of the {what}.",
                        f"{_cap(short)} fracture{many}.",
                    )
                )
            ]
        return [
            self.pick(
                (
                    f"Possible nondisplaced fracture of the {what}.",
                    f"Questionable fracture of the {what}; correlate with point tenderness.",
                )
            )
        ]

    # -- denials ---------------------------------------------------------------------------------------
    def negatives(self) -> list[str]:
        s = self.s
        neg = {k for k, v in s.items() if v == 0.0}
        out = []
        if "Cardiomegaly" in neg and "Enlarged Cardiomediastinum" in neg:
            out.append(
                self.pick(
                    (
                        "Normal heart size and mediastinal contours.",
                        "The heart size and mediastinal contours are normal.",
                        "Heart size is normal. The mediastinal silhouette is unremarkable.",
                    )
                )
            )
        elif "Cardiomegaly" in neg:
            out.append(
                self.pick(
                    (
                        "Heart size is normal.",
                        "The heart is normal in size.",
                        "No cardiomegaly.",
                        "The cardiac silhouette is within normal limits.",
                    )
                )
            )
        elif "Enlarged Cardiomediastinum" in neg:
            out.append(
                self.pick(
                    (
                        "The mediastinal contours are normal.",
                        "Normal cardiomediastinal silhouette.",
                        "Mediastinal and hilar contours are unremarkable.",
                    )
                )
            )
        lung_neg = [
            ("Consolidation", "focal consolidation"),
            ("Lung Opacity", "airspace opacity"),
            ("Pneumonia", "pneumonia"),
            ("Edema", "pulmonary edema"),
        ]
        names = [n for label, n in lung_neg if label in neg]
        if names:
            if len(names) == 1:
                out.append(self.pick((f"No {names[0]}.", f"There is no {names[0]}.", f"No evidence of {names[0]}.")))
            else:
                out.append(f"No {', '.join(names[:-1])} or {names[-1]}.")
        pl = [
            n
            for label, n in (("Pleural Effusion", "pleural effusion"), ("Pneumothorax", "pneumothorax"))
            if label in neg
        ]
        if len(pl) == 2:
            out.append(
                self.pick(
                    (
                        "No pleural effusion or pneumothorax.",
                        "There is no pneumothorax or pleural effusion.",
                        "No effusion or pneumothorax is seen.",
                    )
                )
            )
        elif pl:
            out.append(self.pick((f"No {pl[0]}.", f"There is no {pl[0]}.")))
        if "Lung Lesion" in neg:
            out.append(self.pick(("No suspicious pulmonary nodules or masses.", "No pulmonary nodule.")))
        if "Atelectasis" in neg:
            out.append("No atelectasis.")
        if "Pleural Other" in neg:
            out.append("No pleural thickening.")
        if "Fracture" in neg:
            out.append(self.pick(("No displaced rib fractures.", "No acute fracture is identified.")))
        if "Support Devices" in neg:
            out.append("No lines or tubes.")
        return out

    def filler(self, normal: bool) -> list[str]:
        """Sentences irrelevant to the 14 labels (anatomy described as normal, incidental notes)."""
        out = []
        lungs_involved = any(n in self.f for n in ("atelectasis", "pneumothorax", "pleural_effusion", "edema"))
        if self.rng.random() < 0.5:
            if normal:
                out.append(self.pick(("The lungs are clear.", "Lungs are well expanded and clear.")))
            elif not lungs_involved:
                out.append(self.pick(("The lungs are otherwise clear.", "Otherwise clear lungs.")))
        if "fracture" not in self.f and self.rng.random() < 0.3:
            out.append(
                self.pick(
                    (
                        "The visualized upper abdomen is unremarkable.",
                        "Osseous structures are intact.",
                        "Visualized osseous structures are unremarkable.",
                    )
                )
            )
        if not normal and self.rng.random() < 0.2:
            out.append(
                self.pick(
                    (
                        "Degenerative changes of the thoracic spine.",
                        "Calcification of the aortic knob.",
                        "A calcified granuloma is noted in the left upper lobe.",
                    )
                )
            )
        return out


def _indication(truth: StudyTruth, rng: np.random.Generator) -> str:
    f = truth.findings
    who = f"___-year-old {'man' if truth.sex == 'M' else 'woman'}" if rng.random() < 0.7 else "___"
    if any(n in f for n in ("pneumonia", "consolidation", "opacity")):
        why = _pick(rng, ("fever and cough", "productive cough", "fever, hypoxia", "cough and leukocytosis"))
    elif any(n in f for n in ("edema", "cardiomegaly", "pleural_effusion")):
        why = _pick(rng, ("shortness of breath", "dyspnea on exertion", "worsening dyspnea and leg swelling"))
    elif "fracture" in f:
        why = _pick(rng, ("s/p fall, chest wall pain", "trauma, left-sided chest pain", "motor vehicle collision"))
    elif "pneumothorax" in f:
        why = _pick(rng, ("sudden chest pain", "acute dyspnea", "s/p procedure, assess"))
    elif "support_devices" in f:
        why = _pick(rng, ("intubated patient, assess position", "ICU patient, daily film", "post procedure"))
    else:
        why = _pick(rng, ("chest pain", "cough", "pre-operative evaluation", "shortness of breath", "weakness"))
    return _pick(
        rng, (f"{who} with {why}", f"{who} with {why}. Evaluate.", f"{_cap(why)}.", f"History: {who} with {why}.")
    )


def write_report(truth: StudyTruth, rng: np.random.Generator) -> Report:
    """Write the report of one study and return it with its 14 CheXpert labels."""
    style = STYLES[int(rng.choice(len(STYLES), p=STYLE_P))]
    status = plan_labels(truth, style, rng)
    w = _Writer(truth, status, rng)
    devices = [_cap(x) for x in w.devices()]
    pathology = [_cap(x) for x in w.heart() + w.lungs() + w.pleura() + w.bones()]
    positives = devices + pathology
    negatives = w.negatives()
    normal = truth.no_finding
    if normal and not any(v == -1.0 for v in status.values()):
        summary = [
            _pick(
                rng,
                (
                    "No acute cardiopulmonary process.",
                    "No acute cardiopulmonary abnormality.",
                    "No acute intrathoracic process.",
                    "Normal chest radiograph.",
                ),
            )
        ]
    else:
        summary = []
    clinical = positives
    if style == "line":
        # A one-liner still carries every stated or hedged label (and a line style plans no denials).
        return Report(" ".join(clinical) if clinical else summary[0], status)
    if style == "impression":
        return Report("IMPRESSION: " + " ".join((clinical or summary) + negatives), status)
    findings = clinical + negatives + w.filler(normal)
    if not findings:
        findings = ["The lungs are clear."]
    # Impressions restate the pathology in fewer words and often leave routine devices out (the findings
    # section already carries every stated label).
    if pathology:
        kept = pathology if rng.random() < 0.5 else clinical
        impression = _impression([_condense(c) for c in kept], summary, rng)
    else:
        shown = [_condense(d) for d in devices] if devices and rng.random() < 0.6 else []
        impression = " ".join(shown + (summary or ["No acute cardiopulmonary process."]))
    parts = []
    if style == "full":
        portable = truth.view == "AP"
        exam = (
            ("CHEST (PORTABLE AP)", "Portable chest radiograph")
            if portable
            else ("CHEST (PA AND LAT)", "CHEST (PA AND LATERAL)", "Chest radiograph, two views")
        )
        technique = (
            ("Single portable AP view of the chest.", "Portable semi-upright AP radiograph of the chest.")
            if portable
            else ("Frontal and lateral views of the chest.", "PA and lateral chest radiographs.")
        )
        parts.append("EXAMINATION: " + _pick(rng, exam))
        parts.append("INDICATION: " + _indication(truth, rng))
        parts.append("TECHNIQUE: " + _pick(rng, technique))
        if truth.prior is not None:
            parts.append(
                "COMPARISON: " + _pick(rng, ("___.", "Chest radiograph from ___.", "Prior study of ___ at ___."))
            )
        else:
            parts.append("COMPARISON: " + _pick(rng, ("None.", "None available.", "___")))
    elif truth.prior is not None and rng.random() < 0.5:
        parts.append("COMPARISON: ___.")
    parts.append("FINDINGS: " + " ".join(findings))
    parts.append("IMPRESSION: " + impression)
    if style == "full" and rng.random() < 0.35:
        parts.append(
            _pick(
                rng,
                (
                    "Findings were discussed with Dr. ___ by telephone at ___ on ___.",
                    "Dr. ___ was notified of the findings at ___.",
                    "Recommendation: clinical follow-up as indicated. Electronically signed by ___.",
                    "The study was reviewed with the attending radiologist, Dr. ___.",
                ),
            )
        )
    sep = "\n\n" if style == "full" else "\n"
    return Report(sep.join(parts), status)


def _condense(sentence: str) -> str:
    for prefix in ("There is an ", "There is a ", "There are ", "There is "):
        if sentence.startswith(prefix):
            return _cap(sentence[len(prefix) :])
    return sentence


def _impression(clinical: list[str], summary: list[str], rng: np.random.Generator) -> str:
    if not clinical:
        return summary[0] if summary else "No acute cardiopulmonary process."
    if len(clinical) > 1 and rng.random() < 0.5:
        return " ".join(f"{i + 1}. {c}" for i, c in enumerate(clinical))
    return " ".join(clinical)
