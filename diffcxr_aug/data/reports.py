"""Radiology report text: section extraction, de-identification markers removed, whitespace normalised.

Reports reach the project in three shapes: MIMIC-CXR free text with ``FINDINGS:`` / ``IMPRESSION:``
headers (and ``___`` where PHI was removed), IU X-ray XML whose sections are already separate (with
``XXXX`` for removed PHI), and plain text from a CSV. :func:`extract_sections` turns any of them into a
``{section: text}`` dict with canonical names; :func:`format_report` writes the sections the project
uses back into one line of text for the manifest's ``report`` column.
"""

from __future__ import annotations

import re

# Canonical section name -> header spellings met in MIMIC-CXR, IU X-ray and hospital exports.
SECTION_HEADERS: dict[str, tuple[str, ...]] = {
    "findings": ("findings", "finding", "findings and impression", "report"),
    "impression": ("impression", "impressions", "conclusion", "conclusions", "summary", "opinion"),
    "indication": (
        "indication",
        "indications",
        "history",
        "clinical history",
        "clinical indication",
        "clinical information",
        "reason for exam",
        "reason for examination",
        "reason for study",
    ),
    "comparison": ("comparison", "comparisons", "prior", "prior studies"),
    "technique": ("technique", "examination", "exam", "procedure", "study", "type of examination"),
    "recommendation": ("recommendation", "recommendations", "recommendation(s)", "notification", "addendum"),
    "wet_read": ("wet read",),
}
_HEADER_TO_SECTION = {h: name for name, headers in SECTION_HEADERS.items() for h in headers}
# Longest first, so "clinical history" wins over "history" and "findings and impression" over "findings".
_HEADER_ALTERNATION = "|".join(re.escape(h) for h in sorted(_HEADER_TO_SECTION, key=len, reverse=True))
# A header starts a line, or follows the end of a sentence; it ends with a colon. Mid-sentence words
# such as "no acute findings: ..." are rare enough that requiring a boundary before them is enough.
_HEADER_RE = re.compile(rf"(?:^|(?<=\n)|(?<=[.:]\s)|(?<=[.:]))\s*({_HEADER_ALTERNATION})\s*:", re.IGNORECASE)
# "FINAL REPORT" stands alone on MIMIC-CXR's first line and is not a section.
_BANNER_RE = re.compile(r"^\s*final report\s*$", re.IGNORECASE | re.MULTILINE)

# De-identification placeholders: MIMIC-CXR "___", IU X-ray "XXXX" (also "XXXX-XXXX"), MIMIC-III "[** ... **]".
_DEID_RE = re.compile(r"_{2,}|\bX{3,}(?:[-/]X{3,})*\b|\[\*\*.*?\*\*\]", re.IGNORECASE)
_SPACE_BEFORE_PUNCT_RE = re.compile(r"\s+([.,;:?!)])")
_REPEATED_PUNCT_RE = re.compile(r"([.,;:])(?:\s*\1)+")
_EMPTY_PARENS_RE = re.compile(r"\(\s*\)")
# "x-XXXX" (IU's de-identified "x-ray") leaves a dangling hyphen behind.
_DANGLING_HYPHEN_RE = re.compile(r"(?<=\w)-(?=[\s.,;:]|$)")


def normalize_whitespace(text: str) -> str:
    """Collapse every run of whitespace (newlines and tabs included) into one space and strip the ends."""
    return " ".join(str(text).split())


def remove_deid(text: str) -> str:
    """Remove de-identification placeholders (``___``, ``XXXX``, ``[**...**]``) and the gaps they leave."""
    text = _DEID_RE.sub(" ", str(text))
    text = _EMPTY_PARENS_RE.sub(" ", text)
    text = _DANGLING_HYPHEN_RE.sub("", text)
    text = normalize_whitespace(text)
    text = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", text)
    return _REPEATED_PUNCT_RE.sub(r"\1", text).strip(" ,;:")


def clean_text(text: str | None) -> str:
    """De-identification markers removed and whitespace normalised; ``None``/NaN become ``""``."""
    if text is None or (isinstance(text, float) and text != text):
        return ""
    return remove_deid(str(text))


def extract_sections(text: str | None) -> dict[str, str]:
    """Split a free-text report into canonical sections, each cleaned.

    Text before the first header is returned under ``"preamble"``; a report with no header at all comes
    back whole under ``"findings"`` (most header-less reports in CSV exports are the findings). Repeated
    sections (MIMIC addenda) are joined in order.

    Example:
        >>> extract_sections("FINDINGS: No effusion. IMPRESSION: Normal ___.")
        {'findings': 'No effusion.', 'impression': 'Normal.'}
    """
    if text is None or (isinstance(text, float) and text != text):
        return {}
    text = _BANNER_RE.sub(" ", str(text))
    matches = list(_HEADER_RE.finditer(text))
    if not matches:
        body = clean_text(text)
        return {"findings": body} if body else {}
    sections: dict[str, list[str]] = {}
    preamble = clean_text(text[: matches[0].start()])
    if preamble:
        sections["preamble"] = [preamble]
    for match, following in zip(matches, matches[1:] + [None], strict=True):
        name = _HEADER_TO_SECTION[normalize_whitespace(match.group(1)).lower()]
        body = clean_text(text[match.end() : following.start() if following is not None else len(text)])
        if body:
            sections.setdefault(name, []).append(body)
    return {name: " ".join(parts) for name, parts in sections.items()}


def format_report(sections: dict[str, str], keys: tuple[str, ...] = ("findings", "impression")) -> str:
    """Join the chosen sections into one line, ``"Findings: ... Impression: ..."``, skipping empty ones.

    The headers are kept so that :func:`extract_sections` can split the manifest's text again (the
    labeler, for one, may read the impression alone).
    """
    parts = [f"{key.replace('_', ' ').capitalize()}: {sections[key]}" for key in keys if sections.get(key)]
    return " ".join(parts)


def report_from_text(text: str | None, keys: tuple[str, ...] = ("findings", "impression")) -> str:
    """Free text -> the manifest's report: the chosen sections if the report has headers, else all of it."""
    sections = extract_sections(text)
    chosen = format_report(sections, keys)
    if chosen:
        return chosen
    # No findings or impression header (e.g. a report that is only "INDICATION: ... Normal chest."):
    # keep whatever text there is rather than an empty report.
    return " ".join(sections.values())
