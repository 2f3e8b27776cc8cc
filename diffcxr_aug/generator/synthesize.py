"""``synthesize``: generate labelled CXRs from a trained pipeline."""

from __future__ import annotations


def synthesize(generator, out, section, device="auto", seed=0):
    raise NotImplementedError("synthesize (issue #5)")
