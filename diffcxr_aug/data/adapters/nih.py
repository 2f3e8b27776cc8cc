"""Adapter: nih (issue #4)."""

from __future__ import annotations


def prepare_nih(root, out, size=128, seed=0, **kwargs):
    raise NotImplementedError("prepare nih (issue #4)")
