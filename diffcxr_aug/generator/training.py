"""Diff-CXR training loop."""

from __future__ import annotations


def train_generator(data, out, section, stage=1, resume=None, device="auto", seed=0):
    raise NotImplementedError("train-generator (issue #5)")
