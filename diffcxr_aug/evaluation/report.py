"""Fidelity, faithfulness, privacy and compute report."""

from __future__ import annotations


def evaluate(real, synthetic, out, device="auto", seed=0):
    raise NotImplementedError("evaluate")
