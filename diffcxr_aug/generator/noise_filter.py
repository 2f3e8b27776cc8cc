"""Latent Noise Filtering (LNFS)."""

from __future__ import annotations


def run_filter(data, out, section, vae=None, device="auto", seed=0):
    raise NotImplementedError("filter (issue #6)")
