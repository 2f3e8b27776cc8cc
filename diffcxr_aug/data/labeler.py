"""Offline rule-based CheXpert labeler and the CheXbert path."""

from __future__ import annotations


def label_reports_file(reports, out, text_col="report", id_col="ID", checkpoint=None, device="auto"):
    raise NotImplementedError("label (issue #4)")
