"""The labeler's cues: the negation and uncertainty triggers (each a regex and how many words may separate it from
a mention) and the word patterns its special cases read, in CheXpert's order. The phrase lists of the observations
themselves are data files (``chexpert_phrases/``); these are the rules around them."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# --- cues --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cue:
    """A negation or uncertainty trigger: a regex and how many words may separate it from the mention."""

    pattern: re.Pattern
    max_gap: int
    name: str
    # Words that, between cue and mention, end the cue's reach ("normal heart size with small effusion").
    barrier: re.Pattern | None = None


_ADJECTIVE_BARRIER = re.compile(r"(?<![a-z])(?:with|without|except|plus|along with|as well as|associated)(?![a-z])")


def _cues(specs: Iterable[tuple]) -> tuple[Cue, ...]:
    cues = []
    for spec in specs:
        pattern, gap, barrier = (*spec, None) if len(spec) == 2 else spec
        cues.append(Cue(re.compile(rf"(?<![a-z0-9]){pattern}(?![a-z0-9])"), gap, pattern, barrier))
    return tuple(cues)


# Phrases that look like negation but are not ("no change in the effusion" keeps the effusion).
PSEUDO_NEGATION = _cues(
    (p, 0)
    for p in (
        r"no (?:significant |substantial |appreciable |definite |major |marked )?(?:interval )?change",
        r"not (?:significantly |substantially )?changed",
        r"no (?:significant )?(?:increase|decrease|worsening|progression)",
        r"not only",
        r"no further",
        r"gram negative",
        r"without (?:significant |interval )?change",
    )
)
# Matched first: these contain a negation word but mean "maybe".
PRE_NEGATION_UNCERTAINTY_BEFORE = _cues(
    [
        (
            r"(?:cannot|can ?not|can't|could not|couldn't|unable to|difficult to|hard to|may not|not) "
            r"(?:be )?(?:entirely |completely |totally |definitely |fully |confidently )?"
            r"(?:exclude|excluded|rule out|ruled out|r/o)",
            10,
        ),
        (r"no (?:definite )?new", 3),
        (r"no evidence to rule out", 6),
    ]
)
PRE_NEGATION_UNCERTAINTY_AFTER = _cues(
    [
        (
            r"(?:cannot|can ?not|can't|could not|may not|might not|not) (?:be )?"
            r"(?:entirely |completely |totally |definitely |fully |confidently )?(?:excluded|ruled out)",
            8,
        ),
    ]
)
NEGATION_BEFORE = _cues(
    [
        (r"no", 12),
        (r"without", 12),
        (r"negative for", 12),
        (r"free of", 10),
        (r"absence of", 10),
        (r"lack of", 8),
        (r"neither", 10),
        (r"nor", 8),
        (r"not", 4),
        (r"never", 4),
        (r"(?:rule|ruled|rules) out", 6),
        (r"r/o", 4),
        (r"exclude[sd]?", 4),
        (r"(?:resolution|resolving|clearing|removal|disappearance|interval resolution) of", 6),
        (r"(?:resolved|removed|cleared|resolving)", 2, _ADJECTIVE_BARRIER),
        (r"(?:normal|unremarkable|normal[- ]appearing|within normal limits)", 6, _ADJECTIVE_BARRIER),
        (r"(?:clear|clearing) of", 6),
    ]
)
NEGATION_AFTER = _cues(
    [
        (
            r"(?:is|are|was|were|appears?|remains?|seems?)(?: now| otherwise| again| also| essentially| grossly|"
            r" overall| still)? (?:normal|unremarkable|within normal limits|clear|negative|absent)",
            8,
        ),
        (r"(?:normal|unremarkable|within normal limits|wnl)", 8),
        (r"(?:at |within )?(?:the )?upper limits? of normal", 8),
        (r"top[- ]normal", 8),
        (
            r"(?:is|are|was|were|has|have|has been|have been)? ?(?:not|no longer) (?:been )?"
            r"(?:seen|identified|enlarged|present|evident|visualized|visualised|demonstrated|detected|noted|"
            r"appreciated|apparent|visible|included)",
            8,
        ),
        (
            r"(?:has|have)? ?(?:completely |nearly |almost |since )?(?:resolved|cleared|been removed|"
            r"been resolved|disappeared)",
            8,
        ),
        (r"(?:removed|resolved)", 6),
        (r"no longer", 6),
        (r"(?:is|are) absent", 6),
        (r"(?:is|are|was|were) excluded", 6),
    ]
)
UNCERTAINTY_BEFORE = _cues(
    [
        (r"possible", 8),
        (r"possibly", 8),
        (r"probable", 8),
        (r"probably", 8),
        (r"questionable", 6),
        (r"question of", 6),
        (r"questioned", 6),
        (r"suspect(?:ed)?", 8),
        (r"suspicious(?: for| of)?", 8),
        (r"suspicion(?: for| of)?", 8),
        (r"concern(?:ing)?(?: for| of)?", 8),
        (r"worrisome(?: for)?", 8),
        (
            r"(?:may|might|could|would|can) (?:be|represent|reflect|indicate|include|relate|be related|"
            r"be due|be secondary|be compatible|be consistent|have|signify|suggest)",
            10,
        ),
        (r"(?:may|might|could)", 6),
        (r"suggest(?:s|ing|ive|ive of|ed)?", 8),
        # CheXpert: "is / may be compatible with X" hedges; a bare "opacity, compatible with X" states X.
        (r"(?:is|are|be|being) compatible with", 6),
        (r"differential(?: diagnosis)?(?: includes?| of| considerations?)?", 10),
        (r"consider(?:ed|ation)?", 8),
        (r"(?:versus|vs)", 3),
        (r"presum(?:ed|ably|ptive)", 6),
        (r"equivocal", 6),
        (r"indeterminate", 6),
        (r"borderline", 3),
        (r"less likely", 6),
        (r"unlikely", 6),
        (r"cannot be (?:assessed|evaluated)", 6),
        (r"(?:correlate|correlation)(?: clinically)?(?: for| with)?", 8),
        (r"(?:evaluate|evaluation|assess|assessment) for", 6),
        (r"(?:atypical|early|developing|underlying|superimposed|superimposition of)", 2),
    ]
)
UNCERTAINTY_AFTER = _cues(
    [
        (r"(?:is|are)? ?(?:possible|possibly|suspected|questioned|questionable|probable|likely not|unlikely)", 6),
        (r"(?:may|might|could|can) (?:be|also be) (?:present|seen|considered)", 6),
        (r"(?:not well|poorly|incompletely|suboptimally|not) (?:seen|visualized|visualised|evaluated|assessed)", 8),
        (r"(?:is|are)? ?(?:partially |partly )?obscured", 6),
        (r"(?:is|are)? ?borderline", 6),
        (r"(?:versus|vs)", 3),
        (r"cannot be (?:assessed|evaluated)", 8),
        (r"\?", 4),
    ]
)
# "stable heart size" says nothing about whether the heart is large: CheXpert calls it uncertain.
STABLE_RE = re.compile(r"(?<![a-z])(?:stable|unchanged|similar|no (?:significant )?change|not changed|again)(?![a-z])")
ENLARGED_RE = re.compile(r"(?<![a-z])(?:enlarge|large|cardiomegaly|prominen|widen|increas)")
# Mentions that describe the heart or mediastinum without saying it is abnormal.
DIRECT_FINDINGS = ("cardiomegaly", "cardiac enlargement", "enlarged heart")
# Edema mentions that CheXpert's uncertainty patterns always hedge when they are not negated.
HEDGED_EDEMA_PHRASES = ("vascular congestion", "pulmonary congestion", "indistinctness", "vascular prominence")
WORD_TAIL_RE = re.compile(r"[a-z0-9]*")
LIST_NEGATION_RE = re.compile(r"(?<![a-z])(?:no|not|without|negative for|free of)(?![a-z])|#")
OR_RE = re.compile(r"(?<![a-z])(?:or|versus|vs)(?![a-z])")
