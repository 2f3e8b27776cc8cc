"""Adapter: mimic (issue #4)."""

from __future__ import annotations


def prepare_mimic(root, out, size=128, seed=0, **kwargs):
    raise NotImplementedError("prepare mimic (issue #4)")
