"""The embedded phantom CXR world (issue #3)."""

from __future__ import annotations


def prepare_phantom(out, n=2000, size=128, seed=0, **kwargs):
    raise NotImplementedError("prepare phantom (issue #3)")
