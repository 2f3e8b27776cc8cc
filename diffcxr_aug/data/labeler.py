"""Offline rule-based CheXpert labeler, and the ``label`` command's entry point.

The labeler follows the CheXpert labeler's three stages (Irvin et al., 2019), with the dependency
parser replaced by sentence and clause scope so that it runs anywhere, offline and fast:

1. **Mention extraction.** The CheXpert mention / unmention phrase lists (shipped in
   ``chexpert_phrases/``, MIT) are matched in each sentence of the cleaned, lowercased report.
2. **Classification** of each mention, in CheXpert's order: *pre-negation uncertainty* ("cannot
   exclude", "no new"), then *negation* ("no", "without", "... is normal", "... has resolved"), then
   *uncertainty* ("possible", "may represent", "X or Y", "stable heart size"). A cue reaches a mention
   only inside the same clause (sentences are split at ``.;:`` and clauses at "but", "however",
   "which", ", there is", ...) and within a cue-specific number of words.
3. **Aggregation** per observation exactly as CheXpert does: positive beats uncertain beats negative
   (but negative and uncertain give uncertain); "chf" / "heart failure" adds an uncertain Cardiomegaly;
   No Finding is 1 when no observation other than Support Devices (nor any "other finding" of the
   No Finding phrase list) is positive or uncertain, and blank otherwise.

Labels are ``1`` positive, ``0`` negative, ``-1`` uncertain and NaN for not mentioned.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from diffcxr_aug.data.labeler_cues import (
    DIRECT_FINDINGS,
    ENLARGED_RE,
    HEDGED_EDEMA_PHRASES,
    LIST_NEGATION_RE,
    NEGATION_AFTER,
    NEGATION_BEFORE,
    OR_RE,
    PRE_NEGATION_UNCERTAINTY_AFTER,
    PRE_NEGATION_UNCERTAINTY_BEFORE,
    PSEUDO_NEGATION,
    STABLE_RE,
    UNCERTAINTY_AFTER,
    UNCERTAINTY_BEFORE,
    WORD_TAIL_RE,
    Cue,
)
from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.data.reports import clean_text
from diffcxr_aug.errors import MissingInputError
from diffcxr_aug.io import atomic_path

logger = logging.getLogger(__name__)

PHRASES_DIR = Path(__file__).resolve().parent / "chexpert_phrases"
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
NO_FINDING = "No Finding"
SUPPORT_DEVICES = "Support Devices"
CARDIOMEGALY = "Cardiomegaly"
ENLARGED_CARDIOMEDIASTINUM = "Enlarged Cardiomediastinum"
EDEMA = "Edema"

# --- text preparation --------------------------------------------------------------------------------

_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.?!;:])\s+|\n+")
_CLAUSE_BREAK_RE = re.compile(
    r"\b(?:but|however|although|though|except|aside from|apart from|other than|which|whereas|while|yet|"
    r"nevertheless|nonetheless|with the exception of)\b|,\s+(?=(?:there|the|this|these|it)\b)|"
    r"\band\s+(?=(?:there|the|this|these|it)\b)"
)
_WORD_RE = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")


def prepare_text(text: str) -> str:
    """Lowercase and normalise a report the way the CheXpert loader does, de-identification removed."""
    text = clean_text(text).lower()
    text = text.replace("and/or", "or")
    text = re.sub(r"(?<=[a-z])/(?=[a-z])", " or ", text)  # "atelectasis/pneumonia" -> "... or ..."
    text = re.sub(r"\.{2,}", ".", text)
    text = re.sub(r"([.,;:])(?=[a-z])", r"\1 ", text)  # space after punctuation, not inside "1.5"
    return " ".join(text.split())


def split_sentences(text: str) -> list[tuple[int, str]]:
    """``(offset, sentence)`` pairs of prepared text; numbered items ("1. ...") become sentences too."""
    out = []
    pos = 0
    for piece in _SENTENCE_SPLIT_RE.split(text):
        start = text.find(piece, pos)
        pos = start + len(piece)
        if piece.strip():
            out.append((start, piece))
    return out


def _n_words(text: str) -> int:
    return len(_WORD_RE.findall(text))


# --- phrases -----------------------------------------------------------------------------------------


def _observation_from_stem(stem: str) -> str:
    name = stem.replace("_", " ").title()
    if name not in CHEXPERT_LABELS:
        raise ValueError(f"phrase file {stem}.txt names no CheXpert observation; expected one of {CHEXPERT_LABELS}")
    return name


def _phrase_regex(phrase: str) -> re.Pattern:
    # CheXpert: "_" marks a word boundary ("_mediastinum" must not match "pneumomediastinum"); otherwise a
    # phrase is a lowercase substring, so "atelecta" matches "atelectasis" and "atelectatic".
    core = re.escape(phrase.strip("_").replace("_", " "))
    start = r"(?<![a-z0-9])" if phrase.startswith("_") else ""
    end = r"(?![a-z0-9])" if phrase.endswith("_") else ""
    return re.compile(start + core + end)


def load_phrases(phrases_dir: str | os.PathLike = PHRASES_DIR) -> tuple[dict, dict]:
    """Mention and unmention regexes per observation: upstream ``phrases/`` plus project ``additions/``."""
    phrases_dir = Path(phrases_dir)
    mention: dict[str, list[tuple[str, re.Pattern]]] = {}
    unmention: dict[str, list[re.Pattern]] = {}
    for sub in ("phrases", "additions"):
        for kind, target in (("mention", mention), ("unmention", unmention)):
            for path in sorted((phrases_dir / sub / kind).glob("*.txt")):
                observation = _observation_from_stem(path.stem)
                for line in path.read_text(encoding="utf-8").splitlines():
                    phrase = line.strip().lower()
                    if not phrase:
                        continue
                    regex = _phrase_regex(phrase)
                    target.setdefault(observation, []).append((phrase, regex) if kind == "mention" else regex)
    if not mention:
        raise MissingInputError(f"{phrases_dir}: no phrases/mention/*.txt")
    # CheXpert's positional unmentions: "tip in the right heart" is a place, not cardiomegaly.
    positions = [f"{a}{b}" for a in ("over the", "overly the", "in the") for b in ("", " superior", " left", " right")]
    for observation, drop_direct in ((CARDIOMEGALY, True), (ENLARGED_CARDIOMEDIASTINUM, False)):
        for phrase, _ in mention.get(observation, []):
            if drop_direct and phrase in DIRECT_FINDINGS:
                continue
            noun = phrase.strip("_").replace("_", " ").replace("the ", "")
            for position in positions:
                unmention.setdefault(observation, []).append(re.compile(re.escape(f"{position} {noun}")))
    return mention, unmention


# --- the labeler -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mention:
    """One phrase match: the observation, its character span in the prepared text, and its label."""

    observation: str
    start: int
    end: int
    text: str
    label: float
    cue: str


def _clause_bounds(sentence: str, start: int, end: int) -> tuple[int, int]:
    left, right = 0, len(sentence)
    for match in _CLAUSE_BREAK_RE.finditer(sentence):
        if match.end() <= start:
            left = max(left, match.end())
        elif match.start() >= end:
            right = min(right, match.start())
            break
    return left, right


def _masked(sentence: str) -> str:
    for cue in PSEUDO_NEGATION:
        sentence = cue.pattern.sub(lambda m: "#" * len(m.group(0)), sentence)
    return sentence


def _find_before(cues: Sequence[Cue], text: str, start: int, left: int) -> str | None:
    window = text[left:start]
    for cue in cues:
        for match in cue.pattern.finditer(window):
            between = window[match.end() :]
            if _n_words(between) <= cue.max_gap and not (cue.barrier and cue.barrier.search(between)):
                return cue.name
    return None


def _find_after(cues: Sequence[Cue], text: str, end: int, right: int) -> str | None:
    window = text[end:right]
    for cue in cues:
        match = cue.pattern.search(window)
        if match is None:
            continue
        between = window[: match.start()]
        if _n_words(between) <= cue.max_gap and not (cue.barrier and cue.barrier.search(between)):
            return cue.name
    return None


class RuleLabeler:
    """Offline CheXpert-style labeler: phrase mentions, negation and uncertainty in sentence/clause scope.

    Args:
        phrases_dir: folder with ``phrases/{mention,unmention}/*.txt`` (and optional ``additions/``);
            defaults to the lists shipped with the package.

    Example:
        >>> labeler = RuleLabeler()
        >>> labels = labeler("Cardiomegaly without overt edema. Possible small left effusion.")
        >>> labels["Cardiomegaly"], labels["Edema"], labels["Pleural Effusion"]
        (1.0, 0.0, -1.0)
    """

    def __init__(self, phrases_dir: str | os.PathLike = PHRASES_DIR) -> None:
        self.mention_phrases, self.unmention_phrases = load_phrases(phrases_dir)

    def mentions(self, report: str) -> list[Mention]:
        """Every mention in the report with its label and the cue that decided it."""
        text = prepare_text(report)
        found: list[Mention] = []
        for offset, sentence in split_sentences(text):
            masked = _masked(sentence)
            for observation, phrases in self.mention_phrases.items():
                blocked = [
                    m.span() for rx in self.unmention_phrases.get(observation, []) for m in rx.finditer(sentence)
                ]
                seen: set[tuple[int, int]] = set()
                for phrase, regex in phrases:
                    for match in regex.finditer(sentence):
                        start, end = match.span()
                        # Cue distances count from the whole word ("atelecta" -> "atelectasis").
                        start -= len(WORD_TAIL_RE.match(sentence[::-1], len(sentence) - start).group(0))
                        end += len(WORD_TAIL_RE.match(sentence, end).group(0))
                        if (start, end) in seen or any(start < b_end and end > b_start for b_start, b_end in blocked):
                            continue
                        seen.add((start, end))
                        label, cue = self._classify(masked, start, end, observation, phrase)
                        found.append(Mention(observation, offset + start, offset + end, match.group(0), label, cue))
        return found

    def _classify(self, sentence: str, start: int, end: int, observation: str, phrase: str) -> tuple[float, str]:
        left, right = _clause_bounds(sentence, start, end)
        # 1. Pre-negation uncertainty ("cannot exclude pneumonia", "no new consolidation").
        cue = _find_before(PRE_NEGATION_UNCERTAINTY_BEFORE, sentence, start, left) or _find_after(
            PRE_NEGATION_UNCERTAINTY_AFTER, sentence, end, right
        )
        if cue:
            return UNCERTAIN, cue
        descriptor = observation in (CARDIOMEGALY, ENLARGED_CARDIOMEDIASTINUM) and phrase not in DIRECT_FINDINGS
        after = sentence[end:right]
        # 2. Negation.
        cue = _find_before(NEGATION_BEFORE, sentence, start, left) or _find_after(NEGATION_AFTER, sentence, end, right)
        if cue:
            return NEGATIVE, cue
        # 3. Uncertainty, including "X or Y" and CheXpert's "stable cardiac silhouette".
        cue = _find_before(UNCERTAINTY_BEFORE, sentence, start, left) or _find_after(
            UNCERTAINTY_AFTER, sentence, end, right
        )
        if cue:
            return UNCERTAIN, cue
        before = sentence[left:start]
        or_after = OR_RE.search(after)
        or_before = list(OR_RE.finditer(before))
        # "X or Y" is a hedge, except in a list under a negation or "no change in" ("no change in A or B").
        listed = LIST_NEGATION_RE.search(before)
        if not listed and (
            (or_after and _n_words(after[: or_after.start()]) == 0)
            or (or_before and _n_words(before[or_before[-1].end() :]) <= 2)
        ):
            return UNCERTAIN, "or"
        soon_after = " ".join(_WORD_RE.findall(after)[:4])
        if observation == EDEMA and phrase in HEDGED_EDEMA_PHRASES:
            return UNCERTAIN, "congestion"  # CheXpert: congestion and vascular prominence only suggest edema
        if descriptor and not ENLARGED_RE.search(soon_after) and STABLE_RE.search(sentence[left:right]):
            return UNCERTAIN, "stable"
        return POSITIVE, ""

    def __call__(self, report: str) -> dict[str, float]:
        """The 14 labels of one report (NaN = not mentioned)."""
        per_observation: dict[str, list[float]] = {}
        no_finding = True
        for mention in self.mentions(report if isinstance(report, str) else ""):
            if mention.observation != SUPPORT_DEVICES and mention.label in (POSITIVE, UNCERTAIN):
                no_finding = False
            if mention.observation == NO_FINDING:
                continue  # the No Finding list holds "other findings": they only block No Finding
            if mention.label in (POSITIVE, UNCERTAIN) and mention.text in ("chf", "heart failure"):
                per_observation.setdefault(CARDIOMEGALY, []).append(UNCERTAIN)
            per_observation.setdefault(mention.observation, []).append(mention.label)
        labels = {
            name: _aggregate(per_observation[name]) if name in per_observation else np.nan for name in CHEXPERT_LABELS
        }
        labels[NO_FINDING] = POSITIVE if no_finding else np.nan
        return labels

    def label(self, reports: Sequence[str], progress: bool = True) -> pd.DataFrame:
        """A frame of the 14 CheXpert labels, one row per report, in :data:`CHEXPERT_LABELS` order."""
        rows = [self(r) for r in tqdm(reports, desc="labelling reports", unit="report", disable=not progress)]
        return pd.DataFrame(rows, columns=list(CHEXPERT_LABELS), dtype="float32")


def _aggregate(labels: list[float]) -> float:
    """CheXpert's rule for several mentions of one observation: 1 beats -1 beats 0, but 0 with -1 is -1."""
    if POSITIVE in labels:
        return POSITIVE
    if UNCERTAIN in labels:
        return UNCERTAIN
    return NEGATIVE


class KeywordLabeler(RuleLabeler):
    """The plain baseline: every mention is positive (no negation, no uncertainty handling).

    No Finding follows the same CheXpert rule, so it is 1 only for reports that mention nothing. It
    exists to show what the negation and uncertainty handling of :class:`RuleLabeler` is worth.
    """

    def _classify(self, sentence: str, start: int, end: int, observation: str, phrase: str) -> tuple[float, str]:
        return POSITIVE, ""


def label_reports(
    reports: Sequence[str], checkpoint: str | os.PathLike | None = None, device: str = "auto", **kwargs
) -> pd.DataFrame:
    """Label report texts: the rule-based labeler, or CheXbert when ``checkpoint`` is given."""
    if checkpoint is None:
        return RuleLabeler().label(list(reports), progress=kwargs.get("progress", True))
    from diffcxr_aug.data.chexbert import CheXbertLabeler

    return CheXbertLabeler.from_checkpoint(checkpoint, device=device, bert=kwargs.get("bert")).label(
        list(reports), batch_size=kwargs.get("batch_size", 16), progress=kwargs.get("progress", True)
    )


def _format_label(value: float) -> str:
    return "" if pd.isna(value) else str(int(value))


def label_reports_file(
    reports: str | os.PathLike,
    out: str | os.PathLike,
    text_col: str = "report",
    id_col: str = "ID",
    checkpoint: str | os.PathLike | None = None,
    device: str = "auto",
    bert: str | None = None,
) -> Path:
    """Label the reports of a CSV and write ``out``: the id column plus 14 CheXpert columns (1/0/-1/blank).

    Args:
        reports: CSV with a text column and an id column.
        out: output CSV, written atomically.
        text_col: column of report text (empty or missing text gives an all-blank row, No Finding 1
            for the rule labeler as CheXpert does).
        id_col: column of report ids, copied to the output.
        checkpoint: CheXbert checkpoint (``.pth`` with ``model_state_dict``); default: the rule labeler.
        device: ``auto``, ``cpu`` or ``cuda[:N]`` (CheXbert only).
        bert: CheXbert only: config and tokenizer source (local folder or hub id).
    """
    from diffcxr_aug.data.tables import read_table, require_columns

    reports = Path(reports)
    if not reports.is_file():
        raise MissingInputError(f"{reports}: no such file")
    table = read_table(reports)
    require_columns(table, (id_col, text_col), str(reports), hint="Name them with --id-col and --text-col.")
    labels = label_reports(table[text_col].tolist(), checkpoint=checkpoint, device=device, bert=bert)
    frame = pd.DataFrame({id_col: table[id_col]})
    for name in CHEXPERT_LABELS:
        frame[name] = labels[name].map(_format_label).to_numpy()
    out = Path(out)
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False, encoding="utf-8")
    logger.info("Labelled %d reports into %s", len(frame), out)
    return out
