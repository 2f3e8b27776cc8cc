"""Adapter: iu_xray (issue #4)."""

from __future__ import annotations


def prepare_iu_xray(root, out, size=128, seed=0, **kwargs):
    raise NotImplementedError("prepare iu_xray (issue #4)")
