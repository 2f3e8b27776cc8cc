"""Classifier training over real fractions x modes x seeds."""

from __future__ import annotations


def run_sweep(data, out, section, synthetic=None, device="auto"):
    raise NotImplementedError("train-classifier (issue #7)")
