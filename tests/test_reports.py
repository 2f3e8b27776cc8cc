from __future__ import annotations

from diffcxr_aug.data.reports import (
    clean_text,
    extract_sections,
    format_report,
    normalize_whitespace,
    report_from_text,
)

# A report in MIMIC-CXR's free-text layout (wording made up; the layout is MIMIC's).
MIMIC_STYLE = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def test_mimic_layout_sections():
    sections = extract_sections(MIMIC_STYLE)
    assert set(sections) == {"technique", "indication", "comparison", "findings", "impression"}
    assert sections["indication"] == "F with new onset ascites // eval for infection"  # "___" removed
    assert sections["findings"].startswith("There is no focal consolidation, pleural effusion or pneumothorax. Bilat")
    assert "\n" not in sections["findings"] and "  " not in sections["findings"]
    assert sections["impression"] == "No acute cardiopulmonary process."
    assert report_from_text(MIMIC_STYLE) == (
        "Findings: There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular opacities "
        "that most likely represent nipple shadows. Impression: No acute cardiopulmonary process."
    )


def test_inline_headers_and_synonyms():
    text = "CLINICAL HISTORY: cough. Findings: Heart normal. CONCLUSION: No pneumonia."
    assert extract_sections(text) == {
        "indication": "cough.",
        "findings": "Heart normal.",
        "impression": "No pneumonia.",
    }
    # "impression:" inside a sentence is not a header
    assert extract_sections("The overall impression: stable.") == {"findings": "The overall impression: stable."}


def test_no_header_is_findings_and_preamble_is_kept():
    assert extract_sections("Heart normal.\nNo effusion.") == {"findings": "Heart normal. No effusion."}
    sections = extract_sections("Portable film. IMPRESSION: Normal.")
    assert sections == {"preamble": "Portable film.", "impression": "Normal."}
    assert extract_sections(None) == {} and extract_sections(float("nan")) == {}


def test_deid_markers_removed():
    assert clean_text("Clear lung XXXX bilaterally.") == "Clear lung bilaterally."
    assert clean_text("Normal chest x-XXXX. Dated XXXX-XXXX , at ___ .") == "Normal chest x. Dated, at."
    assert clean_text("Seen by Dr. [**Last Name 123**] today") == "Seen by Dr. today"
    assert clean_text("EXTRA (XXXX) words") == "EXTRA words"
    # ordinary capitals and underscores inside words survive
    assert clean_text("XR of T_2 spine") == "XR of T_2 spine"


def test_whitespace_and_format():
    assert normalize_whitespace("  a\n\tb   c \n") == "a b c"
    assert format_report({"findings": "A.", "impression": "", "indication": "x"}) == "Findings: A."
    assert format_report({"impression": "B.", "findings": "A."}) == "Findings: A. Impression: B."
    assert report_from_text("INDICATION: cough.") == "cough."  # no findings/impression: keep the text
