"""How well the report labeler agrees with reference labels: MeSH on real IU X-ray reports, and truth.

Two references:

* **MeSH on IU X-ray** (real reports). Open-i indexers coded each IU report with MeSH ``<major>`` terms
  such as ``Opacity/lung/base/left`` or ``normal``. :data:`MESH_TO_CHEXPERT` maps the terms whose
  meaning matches a CheXpert observation; MeSH lists only what is present, so the reference is binary
  (term present = positive, absent = negative) and a labeler's ``1`` counts as positive (``-1``, ``0`` and
  blank as not positive; :func:`mesh_agreement` can also count ``-1`` as positive). The score is
  macro-F1 over the observations MeSH covers.
* **Truth** (phantom reports, whose findings are known): per-label agreement of the 4 classes
  (1 / 0 / -1 / blank) and F1 of the positive class.

Run: ``python bench/labeler_eval.py iu [--reports NLMCXR_reports.tgz]``, ``python bench/labeler_eval.py phantom
--n 2000`` (reports only, no images rendered) and ``python bench/labeler_eval.py truth --manifest DIR`` (any
manifest with labels).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, precision_score, recall_score

from diffcxr_aug.data.labels import CHEXPERT_LABELS
from diffcxr_aug.errors import MissingInputError

logger = logging.getLogger(__name__)

# MeSH major term (before the first "/", qualifiers after it) -> CheXpert observation. Only terms whose
# meaning matches are mapped; a qualifier regex narrows a term that is broader than the observation.
# Deliberately left out: Calcified Granuloma / Granulomatous Disease (CheXpert's unmention list
# excludes calcified nodules), Surgical Instruments (mostly clips and sternotomy wires, not in the
# CheXpert device list), Density (used for lung, mediastinum and soft tissue alike), Pulmonary Fibrosis
# (CheXpert files "fibrosis" under Pleural Other, MeSH means the lung).
MESH_TO_CHEXPERT: tuple[tuple[str, str | None, str], ...] = (
    ("normal", None, "No Finding"),
    ("Cardiomegaly", None, "Cardiomegaly"),
    ("Cardiac Shadow", r"enlarged", "Cardiomegaly"),
    ("Mediastinum", r"^(?!.*lymph).*(enlarged|prominent|widen)", "Enlarged Cardiomediastinum"),
    ("Opacity", r"lung", "Lung Opacity"),
    ("Airspace Disease", None, "Lung Opacity"),
    ("Infiltrate", None, "Lung Opacity"),
    ("Cicatrix", r"lung", "Lung Opacity"),
    ("Markings", r"interstitial", "Lung Opacity"),
    ("Nodule", r"^(?!.*calcified)", "Lung Lesion"),
    ("Mass", r"lung|^$", "Lung Lesion"),
    ("Pulmonary Edema", None, "Edema"),
    ("Pulmonary Congestion", None, "Edema"),
    ("Heart Failure", None, "Edema"),
    ("Consolidation", None, "Consolidation"),
    ("Pneumonia", None, "Pneumonia"),
    ("Pulmonary Atelectasis", None, "Atelectasis"),
    ("Pneumothorax", None, "Pneumothorax"),
    ("Hydropneumothorax", None, "Pneumothorax"),
    ("Hemopneumothorax", None, "Pneumothorax"),
    ("Pleural Effusion", None, "Pleural Effusion"),
    ("Hydropneumothorax", None, "Pleural Effusion"),
    ("Thickening", r"pleura", "Pleural Other"),
    ("Cicatrix", r"pleura", "Pleural Other"),
    ("Fractures, Bone", None, "Fracture"),
    ("Catheters, Indwelling", None, "Support Devices"),
    ("Implanted Medical Device", None, "Support Devices"),
    ("Medical Device", None, "Support Devices"),
    ("Tube, Inserted", None, "Support Devices"),
    ("Stents", None, "Support Devices"),
)


def mesh_to_chexpert(terms: Sequence[str]) -> dict[str, int]:
    """CheXpert observations (1 = present) that a report's MeSH major terms state; all others 0."""
    out = dict.fromkeys(CHEXPERT_LABELS, 0)
    for term in terms:
        head, _, qualifiers = term.strip().partition("/")
        for mesh, pattern, observation in MESH_TO_CHEXPERT:
            if head.strip().lower() == mesh.lower() and (pattern is None or re.search(pattern, qualifiers.lower())):
                out[observation] = 1
    return out


def mesh_agreement(
    predicted: pd.DataFrame, mesh_terms: Sequence[Sequence[str]], uncertain_as_positive: bool = False
) -> pd.DataFrame:
    """Per-observation precision, recall, F1 and support against MeSH, plus a ``macro`` row.

    Only observations with at least one MeSH positive are scored ("the observations MeSH covers").
    """
    reference = pd.DataFrame([mesh_to_chexpert(t) for t in mesh_terms])
    rows = []
    for name in CHEXPERT_LABELS:
        truth = reference[name].to_numpy()
        if truth.sum() == 0:
            continue
        values = predicted[name].to_numpy(dtype=float)
        pred = (values == 1) | (uncertain_as_positive & (values == -1))
        rows.append(
            {
                "observation": name,
                "support": int(truth.sum()),
                "precision": precision_score(truth, pred, zero_division=0),
                "recall": recall_score(truth, pred, zero_division=0),
                "f1": f1_score(truth, pred, zero_division=0),
            }
        )
    table = pd.DataFrame(rows)
    macro = {"observation": "macro", "support": int(table["support"].sum())}
    macro.update({k: float(table[k].mean()) for k in ("precision", "recall", "f1")})
    return pd.concat([table, pd.DataFrame([macro])], ignore_index=True)


def truth_agreement(predicted: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """Per-label agreement with known labels: exact 4-class agreement (1/0/-1/blank) and positive-class F1."""
    rows = []
    for name in CHEXPERT_LABELS:
        if name not in truth.columns:
            continue
        t = truth[name].to_numpy(dtype=float)
        p = predicted[name].to_numpy(dtype=float)
        t_cls, p_cls = np.nan_to_num(t, nan=9), np.nan_to_num(p, nan=9)  # blank is its own class
        rows.append(
            {
                "label": name,
                "n_positive": int((t == 1).sum()),
                "n_negative": int((t == 0).sum()),
                "n_uncertain": int((t == -1).sum()),
                "agreement": float((t_cls == p_cls).mean()),
                "f1_positive": f1_score(t == 1, p == 1, zero_division=0),
            }
        )
    table = pd.DataFrame(rows)
    mean = {"label": "mean", "agreement": table["agreement"].mean(), "f1_positive": table["f1_positive"].mean()}
    return pd.concat([table, pd.DataFrame([mean])], ignore_index=True)


def iu_report_texts(reports: pd.DataFrame) -> list[str]:
    from diffcxr_aug.data.reports import format_report

    return [format_report(r) for r in reports[["findings", "impression"]].to_dict("records")]


def default_iu_archive() -> Path:
    """``NLMCXR_reports.tgz`` as shipped inside the torchxrayvision wheel."""
    import torchxrayvision

    path = Path(torchxrayvision.__file__).parent / "data" / "NLMCXR_reports.tgz"
    if not path.is_file():
        raise MissingInputError(f"{path}: torchxrayvision does not ship NLMCXR_reports.tgz; pass --reports")
    return path


def evaluate_iu(archive: str | Path | None = None, progress: bool = False) -> dict[str, pd.DataFrame]:
    """MeSH agreement of the rule labeler and of the keyword baseline on every IU report with findings or
    impression text, on all reports and on the two halves by report id parity (even ids were the ones
    read while writing the rules; odd ids were held out)."""
    from diffcxr_aug.data.adapters.iu_xray import read_iu_reports
    from diffcxr_aug.data.labeler import KeywordLabeler, RuleLabeler

    reports = read_iu_reports(archive if archive is not None else default_iu_archive())
    texts = iu_report_texts(reports)
    keep = np.array([bool(t) for t in texts])
    reports, texts = reports.loc[keep].reset_index(drop=True), [t for t, k in zip(texts, keep, strict=True) if k]
    ids = reports["uid"].str.extract(r"(\d+)")[0].astype(int)
    results = {}
    for name, labeler in (("rule", RuleLabeler()), ("keyword", KeywordLabeler())):
        predicted = labeler.label(texts, progress=progress)
        for subset, mask in (
            ("all", ids >= 0),
            ("dev (even ids)", ids % 2 == 0),
            ("held-out (odd ids)", ids % 2 == 1),
        ):
            m = mask.to_numpy()
            results[(name, subset)] = mesh_agreement(
                predicted.loc[m].reset_index(drop=True), reports.loc[m, "mesh_major"].tolist()
            )
        results[(name, "all, -1 as positive")] = mesh_agreement(
            predicted, reports["mesh_major"].tolist(), uncertain_as_positive=True
        )
    return results


def iu_markdown(results: dict) -> str:
    """The README table: per observation, the rule labeler's P/R/F1 and the keyword baseline's F1."""
    rule = results[("rule", "all")].set_index("observation")
    rule_u = results[("rule", "all, -1 as positive")].set_index("observation")
    keyword = results[("keyword", "all")].set_index("observation")
    lines = [
        "| observation | MeSH positives | rule P | rule R | rule F1 | rule F1 (-1 counted +) | keyword F1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in rule.index:
        label = "**macro**" if name == "macro" else name
        lines.append(
            f"| {label} | {rule.at[name, 'support']} | {rule.at[name, 'precision']:.2f} | "
            f"{rule.at[name, 'recall']:.2f} | {rule.at[name, 'f1']:.2f} | {rule_u.at[name, 'f1']:.2f} | "
            f"{keyword.at[name, 'f1']:.2f} |"
        )
    halves = ", ".join(
        f"{subset}: rule {results[('rule', subset)]['f1'].iloc[-1]:.3f} / keyword "
        f"{results[('keyword', subset)]['f1'].iloc[-1]:.3f}"
        for subset in ("dev (even ids)", "held-out (odd ids)")
    )
    return "\n".join(lines) + f"\n\nmacro-F1 by half: {halves}\n"


def phantom_reports(n: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The reports and labels ``prepare phantom --n N --seed S`` writes, without rendering the images."""
    from diffcxr_aug.data.phantom.findings import sample_world
    from diffcxr_aug.data.phantom.world import phantom_rows

    return pd.DataFrame(phantom_rows(sample_world(n, seed=seed), seed))


def evaluate_phantom(n: int = 2000, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Per-label agreement of the rule labeler and the keyword baseline with the phantom truth labels."""
    from diffcxr_aug.data.labeler import KeywordLabeler, RuleLabeler

    frame = phantom_reports(n, seed)
    texts = frame["report"].tolist()
    return {
        name: truth_agreement(lab.label(texts, progress=False), frame)
        for name, lab in (("rule", RuleLabeler()), ("keyword", KeywordLabeler()))
    }


def phantom_markdown(results: dict[str, pd.DataFrame]) -> str:
    rule, keyword = results["rule"].set_index("label"), results["keyword"].set_index("label")
    lines = [
        "| label | truth 1 / 0 / -1 | rule agreement (4 classes) | rule F1 (positive) "
        "| keyword agreement | keyword F1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name in rule.index:
        counts = (
            ""
            if name == "mean"
            else (
                f"{int(rule.at[name, 'n_positive'])} / {int(rule.at[name, 'n_negative'])} / "
                f"{int(rule.at[name, 'n_uncertain'])}"
            )
        )
        label = "**mean**" if name == "mean" else name
        lines.append(
            f"| {label} | {counts} | {rule.at[name, 'agreement']:.3f} | {rule.at[name, 'f1_positive']:.3f} | "
            f"{keyword.at[name, 'agreement']:.3f} | {keyword.at[name, 'f1_positive']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def evaluate_manifest_truth(manifest: str | Path, n: int | None = None) -> dict[str, pd.DataFrame]:
    """Agreement of the rule labeler and of the keyword baseline with the labels of a manifest (e.g. phantom),
    over its distinct reports (the first ``n`` only, when given)."""
    from diffcxr_aug.data.labeler import KeywordLabeler, RuleLabeler
    from diffcxr_aug.data.manifest import read_manifest

    frame = read_manifest(manifest).frame.drop_duplicates("report")
    if n:
        frame = frame.iloc[:n]
    reports = frame["report"].tolist()
    return {
        name: truth_agreement(labeler.label(reports, progress=False), frame)
        for name, labeler in (("rule", RuleLabeler()), ("keyword", KeywordLabeler()))
    }
