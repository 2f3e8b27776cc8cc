"""Adapter: csv_folder (issue #4)."""

from __future__ import annotations


def prepare_csv(root, out, size=128, seed=0, **kwargs):
    raise NotImplementedError("prepare csv_folder (issue #4)")
