"""Radiology reports for phantom studies, and the CheXpert-style labels they carry.

A report is planned before it is written: for each of the 14 CheXpert observations the planner decides,
from the generating truth, whether the report states it (``1``), hedges it (``-1``), denies it (``0``)
or leaves it out (empty). Present findings are always mentioned, positively or hedged (mild findings
are hedged more often, pneumonia and atelectasis most of all, as in real reports); absent ones are
denied now and then ("no pneumothorax") and, where an opacity is present, a differential is sometimes
left open ("cannot exclude pneumonia"). The writer then phrases exactly that plan, so the labels are
the generating truth as a CheXpert-labelled dataset would record it.

This module holds the logic (planning, choosing which entry says what, assembling sections); the words, and
the per-label hedge and denial rates, live in ``phrases.yaml`` next to it: a list there is a random choice
between alternatives, a string is fixed text, and both are filled in with ``str.format``. Every draw from the
report's random stream happens here, in a fixed order, so that the world is reproducible; the file's header
says which edits change it.

Phrasing follows the CheXpert labeler's mention lists (``data/chexpert_phrases``) so that a
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

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.phantom.findings import (
    HEALING_BELOW,
    LUNG_OPACITY_FINDINGS,
    THORAX_CM,
    Finding,
    StudyTruth,
    lesion_radius,
)

PHRASES_PATH = Path(__file__).resolve().parent / "phrases.yaml"

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

# How often each style is written, and how often, relative to the "full" style, it denies absent findings (the
# per-label hedge and denial rates are in ``phrases.yaml``).
STYLES = ("line", "impression", "findings", "full")
STYLE_P = (0.1, 0.15, 0.35, 0.4)
NEGATION_SCALE = {"line": 0.0, "impression": 0.25, "findings": 0.8, "full": 1.0}


@dataclass
class Report:
    text: str
    labels: dict[str, float]  # CheXpert label -> 1, 0, -1 or NaN


@functools.cache
def phrases() -> dict[str, Any]:
    """The phrase bank, ``phrases.yaml``, read once per process."""
    with PHRASES_PATH.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def _entry(key: str) -> Any:
    """The entry of the phrase bank at a dotted key, e.g. ``"devices.ett"``."""
    node = phrases()
    for part in key.split("."):
        node = node[part]
    return node


def _say(rng: np.random.Generator, key: str, **values: Any) -> str:
    """The phrase at ``key`` filled with ``values``: one draw if it lists alternatives, none if it is fixed text."""
    entry = _entry(key)
    text = entry if isinstance(entry, str) else entry[int(rng.integers(len(entry)))]
    # A placeholder with a capital first letter ({New}) takes the value capitalised, so templates can open a
    # sentence with a value without case logic here.
    capitals = {name[:1].upper() + name[1:]: _cap(v) for name, v in values.items() if isinstance(v, str)}
    return text.format(**{**values, **capitals})


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


def _spaced(word: str) -> str:
    return word + " " if word else ""


def _graded(sev: float, scale: str) -> str:
    """The word of a three-step scale (``words.size``: small, moderate, large) for a severity."""
    words = _entry(f"words.{scale}")
    return words[0] if sev < 0.45 else (words[1] if sev < 0.75 else words[2])


def _sides(side: str | None) -> str:
    """The key of phrases that differ between a bilateral finding and a one-sided one."""
    return "bilateral" if side == "bilateral" else "one_side"


def _location(f: Finding, rng: np.random.Generator) -> str:
    side = f.side or "right"
    zone = f.zone or "lower"
    if side == "bilateral":
        return _say(rng, f"location.bilateral.{zone}")
    if rng.random() < 0.6:
        return _say(rng, f"location.lobe.{side}.{zone}")
    return _say(rng, f"location.zone.{zone}", side=side)


def _ordinal(k: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(k, f"{k}th")


def plan_labels(truth: StudyTruth, style: str, rng: np.random.Generator) -> dict[str, float]:
    """Decide the status of every CheXpert label for this study's report (1, -1, 0 or NaN)."""
    status: dict[str, float] = {}
    rates = _entry("rates")
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
            hedge = rates[label]["hedge"] * (1.6 - sev)
            status[label] = -1.0 if rng.random() < hedge else 1.0
        elif rng.random() < rates[label]["deny"] * neg_scale:
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
    """Phrases one planned report; every sentence it writes matches the plan's status for its labels.

    Values that draw from the random stream (``change``, ``new``, locations) are computed before the phrase
    they go into is picked, in the order the report has always drawn them.
    """

    def __init__(self, truth: StudyTruth, status: dict[str, float], rng: np.random.Generator) -> None:
        self.t, self.s, self.rng = truth, status, rng
        self.f = truth.findings
        self.prior = truth.prior.findings if truth.prior is not None else None

    def say(self, key: str, **values: Any) -> str:
        return _say(self.rng, key, **values)

    def change(self, name: str) -> str:
        """A comparison word for a finding also present on the prior study, or ''."""
        if self.prior is None or name not in self.prior or self.rng.random() < 0.4:
            return ""
        delta = self.f[name].severity - self.prior[name].severity
        if delta > 0.12:
            return self.say("words.increased")
        if delta < -0.12:
            return self.say("words.decreased")
        return self.say("words.stable") if name not in ("cardiomegaly", "enlarged_cardiomediastinum") else ""

    def new(self, name: str) -> str:
        if self.prior is not None and name not in self.prior and self.rng.random() < 0.5:
            return self.say("words.new")
        return ""

    # -- positive and hedged statements, one per label group ---------------------------------------
    def devices(self) -> list[str]:
        if self.s["Support Devices"] != 1.0:
            return []
        out = []
        for device in self.f["support_devices"].items:
            if device == "ett":
                values = {"cm": self.f["support_devices"].extra["ett_cm"]}
            elif device == "chest_tube":
                values = {"side": self._chest_tube_side()}
            else:
                values = {}
            out.append(self.say(f"devices.{device}", **values))
        prior = self.prior.get("support_devices") if self.prior is not None else None
        if prior is not None and prior.items == self.f["support_devices"].items and self.rng.random() < 0.3:
            out = [self.say("devices.unchanged")]
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
            deg = _graded(self.f["cardiomegaly"].severity, "degree")
            change = _spaced(self.change("cardiomegaly"))
            adverb = _entry("words.degree_adverb")[deg]
            out.append(self.say("heart.cardiomegaly", deg=deg, adverb=adverb, change=change))
        elif cm == -1.0:
            out.append(self.say("heart.cardiomegaly_hedged"))
        if ecm == 1.0:
            out.append(self.say("heart.mediastinum"))
        elif ecm == -1.0:
            out.append(self.say("heart.mediastinum_hedged"))
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
                said_pneumonia = pna == 1.0 and "pneumonia" in f
                key = "consolidation.with_pneumonia" if said_pneumonia else "consolidation.stated"
                out.append(self.say(key, loc=loc, new=new))
            else:
                out.append(self.say("consolidation.hedged", loc=loc, new=new))
        if "pneumonia" in f and not said_pneumonia:
            loc = _location(f["pneumonia"], self.rng)
            patchy = self.say("pneumonia.patchy")
            if pna == 1.0:
                new = self.new("pneumonia")
                out.append(self.say("pneumonia.stated", patchy=patchy, loc=loc, new=new))
            else:
                out.append(self.say("pneumonia.hedged", patchy=patchy, loc=loc))
        if "opacity" in f:
            loc = _location(f["opacity"], self.rng)
            hazy = self.say("opacity.hazy")
            if lo == 1.0:
                new = self.new("opacity")
                out.append(self.say("opacity.stated", hazy=hazy, loc=loc, new=new))
            else:
                out.append(self.say("opacity.hedged", hazy=hazy, loc=loc))
        if pna == -1.0 and "pneumonia" not in f:
            out.append(self.say("pneumonia.not_excluded"))
        return out

    def _edema(self) -> list[str]:
        """Pulmonary edema."""
        if "edema" not in self.f:
            return []
        sev = self.f["edema"].severity
        if self.s["Edema"] != 1.0:
            return [self.say("edema.hedged")]
        change = _spaced(self.change("edema"))
        kerley = self.say("edema.kerley") if sev > 0.4 and self.rng.random() < 0.6 else ""
        return [self.say("edema.stated", deg=_graded(sev, "degree"), change=change, kerley=kerley)]

    def _atelectasis(self) -> list[str]:
        """Atelectasis, lobar or plate-like."""
        if "atelectasis" not in self.f:
            return [self.say("atelectasis.not_excluded")] if self.s["Atelectasis"] == -1.0 else []
        fa = self.f["atelectasis"]
        place = {k: v.format(side=fa.side) for k, v in _entry(f"atelectasis.places.{_sides(fa.side)}").items()}
        if self.s["Atelectasis"] != 1.0:
            return [self.say("atelectasis.hedged", **place)]
        if fa.kind == "lobar":
            return [self.say("atelectasis.lobar", side=fa.side)]
        return [self.say("atelectasis.plate", **place)]

    def _lung_lesion(self) -> list[str]:
        """A nodule or a mass."""
        if "lung_lesion" not in self.f:
            return []
        fl = self.f["lung_lesion"]
        loc = _location(fl, self.rng)
        cm = 2.0 * lesion_radius(fl) / (2.0 * (self.t.body.half_width + 0.03)) * THORAX_CM
        if self.s["Lung Lesion"] != 1.0:
            return [self.say("lung_lesion.hedged", loc=loc)]
        return [self.say("lung_lesion.mass" if fl.kind == "mass" else "lung_lesion.nodule", cm=cm, loc=loc)]

    def pleura(self) -> list[str]:
        out = []
        s, f = self.s, self.f
        if "pleural_effusion" in f:
            fe = f["pleural_effusion"]
            size = _graded(fe.severity, "size")
            # Drawn whether or not the effusion is stated.
            pre = _spaced(self.change("pleural_effusion")) + self.new("pleural_effusion")
            if s["Pleural Effusion"] == 1.0:
                out.append(self.say(f"pleural_effusion.{_sides(fe.side)}", pre=pre, size=size, side=fe.side))
            else:
                angle = _entry(f"pleural_effusion.angle.{_sides(fe.side)}").format(side=fe.side)
                out.append(self.say("pleural_effusion.hedged", angle=angle, side=fe.side))
        if "pneumothorax" in f:
            fp = f["pneumothorax"]
            size = _graded(fp.severity, "size")
            if s["Pneumothorax"] == 1.0:
                change = _spaced(self.change("pneumothorax"))
                new = self.new("pneumothorax")
                out.append(self.say("pneumothorax.stated", change=change, new=new, size=size, side=fp.side))
            else:
                out.append(self.say("pneumothorax.hedged", side=fp.side))
        if "pleural_other" in f:
            fo = f["pleural_other"]
            kind = "apical" if fo.kind == "apical" else "lateral"
            where, wall = _entry(f"pleural_other.where.{kind}"), _entry(f"pleural_other.wall.{kind}")
            key = "pleural_other.stated" if s["Pleural Other"] == 1.0 else "pleural_other.hedged"
            out.append(self.say(key, side=fo.side, where=where, wall=wall))
        return out

    def bones(self) -> list[str]:
        if "fracture" not in self.f:
            return []
        fr = self.f["fracture"]
        bone = _entry("fracture.bone")
        if fr.kind == "clavicle":
            what = short = bone["clavicle"].format(side=fr.side)
            plural = False
        else:
            ribs = [_ordinal(k) for k in fr.items]
            numbers = ribs[0] if len(ribs) == 1 else f"{', '.join(ribs[:-1])} and {ribs[-1]}"
            plural = len(ribs) > 1
            what = bone["ribs" if plural else "rib"].format(side=fr.side, numbers=numbers)
            short = bone["rib"].format(side=fr.side, numbers=numbers)
        if self.s["Fracture"] != 1.0:
            return [self.say("fracture.hedged", what=what)]
        count = "many" if plural else "one"
        if fr.kind == "rib" and fr.severity < HEALING_BELOW:
            return [self.say(f"fracture.healing.{count}", what=what, short=short)]
        displaced = _entry(f"fracture.displacement.{'marked' if fr.severity > 0.5 else 'minimal'}")
        return [self.say(f"fracture.acute.{count}", displaced=displaced, what=what, short=short)]

    # -- denials ---------------------------------------------------------------------------------------
    def negatives(self) -> list[str]:
        neg = {k for k, v in self.s.items() if v == 0.0}
        out = []
        if "Cardiomegaly" in neg and "Enlarged Cardiomediastinum" in neg:
            out.append(self.say("negatives.heart_and_mediastinum"))
        elif "Cardiomegaly" in neg:
            out.append(self.say("negatives.heart"))
        elif "Enlarged Cardiomediastinum" in neg:
            out.append(self.say("negatives.mediastinum"))
        names = [name for label, name in _entry("negatives.lung_names").items() if label in neg]
        if len(names) == 1:
            out.append(self.say("negatives.lung_one", name=names[0]))
        elif names:
            out.append(self.say("negatives.lung_many", names=", ".join(names[:-1]), last=names[-1]))
        pleural = [name for label, name in _entry("negatives.pleural_names").items() if label in neg]
        if len(pleural) == 2:
            out.append(self.say("negatives.pleural_both"))
        elif pleural:
            out.append(self.say("negatives.pleural_one", name=pleural[0]))
        for label in ("Lung Lesion", "Atelectasis", "Pleural Other", "Fracture", "Support Devices"):
            if label in neg:
                out.append(self.say(f"negatives.{LABEL_FINDING[label]}"))
        return out

    def filler(self, normal: bool) -> list[str]:
        """Sentences irrelevant to the 14 labels (anatomy described as normal, incidental notes)."""
        out = []
        lungs_involved = any(n in self.f for n in ("atelectasis", "pneumothorax", "pleural_effusion", "edema"))
        if self.rng.random() < 0.5:
            if normal:
                out.append(self.say("filler.clear_lungs"))
            elif not lungs_involved:
                out.append(self.say("filler.otherwise_clear"))
        if "fracture" not in self.f and self.rng.random() < 0.3:
            out.append(self.say("filler.bones_and_abdomen"))
        if not normal and self.rng.random() < 0.2:
            out.append(self.say("filler.incidental"))
        return out


def _indication(truth: StudyTruth, rng: np.random.Generator) -> str:
    f = truth.findings
    who = ("man" if truth.sex == "M" else "woman") if rng.random() < 0.7 else "anonymous"
    if any(n in f for n in ("pneumonia", "consolidation", "opacity")):
        reason = "infection"
    elif any(n in f for n in ("edema", "cardiomegaly", "pleural_effusion")):
        reason = "cardiac"
    elif "fracture" in f:
        reason = "trauma"
    elif "pneumothorax" in f:
        reason = "pneumothorax"
    elif "support_devices" in f:
        reason = "devices"
    else:
        reason = "other"
    why = _say(rng, f"indication.why.{reason}")
    return _say(rng, "indication.text", who=_say(rng, f"indication.who.{who}"), why=why)


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
    summary = [_say(rng, "impression.normal")] if normal and not any(v == -1.0 for v in status.values()) else []
    clinical = positives
    if style == "line":
        # A one-liner still carries every stated or hedged label (and a line style plans no denials).
        return Report(" ".join(clinical) if clinical else summary[0], status)
    if style == "impression":
        return Report("IMPRESSION: " + " ".join((clinical or summary) + negatives), status)
    findings = clinical + negatives + w.filler(normal)
    if not findings:
        findings = [_say(rng, "empty_findings")]
    # Impressions restate the pathology in fewer words and often leave routine devices out (the findings
    # section already carries every stated label).
    if pathology:
        kept = pathology if rng.random() < 0.5 else clinical
        impression = _impression([_condense(c) for c in kept], summary, rng)
    else:
        shown = [_condense(d) for d in devices] if devices and rng.random() < 0.6 else []
        impression = " ".join(shown + (summary or [_say(rng, "impression.default")]))
    parts = []
    if style == "full":
        views = "portable" if truth.view == "AP" else "two_views"
        parts.append("EXAMINATION: " + _say(rng, f"examination.{views}"))
        parts.append("INDICATION: " + _indication(truth, rng))
        parts.append("TECHNIQUE: " + _say(rng, f"technique.{views}"))
        parts.append("COMPARISON: " + _say(rng, "comparison.prior" if truth.prior is not None else "comparison.none"))
    elif truth.prior is not None and rng.random() < 0.5:
        parts.append("COMPARISON: " + _say(rng, "comparison.short"))
    parts.append("FINDINGS: " + " ".join(findings))
    parts.append("IMPRESSION: " + impression)
    if style == "full" and rng.random() < 0.35:
        parts.append(_say(rng, "signoff"))
    sep = "\n\n" if style == "full" else "\n"
    return Report(sep.join(parts), status)


def _condense(sentence: str) -> str:
    for opening in _entry("impression.strip_openings"):
        if sentence.startswith(opening):
            return _cap(sentence[len(opening) :])
    return sentence


def _impression(clinical: list[str], summary: list[str], rng: np.random.Generator) -> str:
    if not clinical:
        return summary[0] if summary else _say(rng, "impression.default")
    if len(clinical) > 1 and rng.random() < 0.5:
        return " ".join(f"{i + 1}. {c}" for i, c in enumerate(clinical))
    return " ".join(clinical)
